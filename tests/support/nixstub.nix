# A stand-in for the nixpkgs `lib` functions that mariner's rendered vm.nix uses, so that the
# module can be evaluated offline with `nix-instantiate --eval --strict --json` (no nixpkgs here).
# mkForce keeps the shape the real lib gives (an override record), so tests can assert it.
{
  mkForce = content: { _type = "override"; priority = 50; inherit content; };
  mkDefault = content: { _type = "override"; priority = 1000; inherit content; };
  mkBefore = content: { _type = "order"; priority = 500; inherit content; };
  # Real lib looks the attribute up in pkgs; the stub returns the dotted path it would look up.
  getAttrFromPath = attrPath: set: builtins.concatStringsSep "." attrPath;
}
