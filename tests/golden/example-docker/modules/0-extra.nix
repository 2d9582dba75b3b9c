# An extra NixOS module for the guest: anything NixOS accepts goes here.
{ pkgs, ... }:
{
  virtualisation.docker.autoPrune.enable = true;
  programs.bash.shellAliases.dc = "docker compose";
}
