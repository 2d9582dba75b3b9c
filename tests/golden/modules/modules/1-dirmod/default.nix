{ ... }:
{
  imports = [ ./helper.nix ];
}
