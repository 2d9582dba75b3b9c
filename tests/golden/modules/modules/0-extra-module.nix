{ pkgs, ... }:
{
  programs.git.enable = true;
}
