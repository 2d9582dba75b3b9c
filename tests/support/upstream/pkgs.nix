# Stand-in packages: derivation-shaped records (no builds). Script writers keep their text in
# the record and in the store path they pretend to have, so the test can read the scripts that
# the modules generate (the virtiofsd command lines) out of the evaluation.
{ lib, system }:
let
  package = name: rec {
    type = "derivation";
    inherit name;
    pname = name;
    outPath = "/nix/store/stub-${name}";
    out = self;
    outputs = [ "out" ];
    meta.mainProgram = name;
    self = { inherit type name pname outPath; meta.mainProgram = name; };
  };
  script = kind: name: text: (package name) // {
    inherit text;
    outPath = "/nix/store/stub-${name}#" + builtins.toJSON { inherit kind name text; };
  };
  platform = { inherit system; isDarwin = false; isLinux = true; };
in
lib.genAttrs [ "bash" "git" "lf" "vim" "virtiofsd" "iproute2" "coreutils-full" "kmod"
  "coreutils" "util-linux" "systemd"
  "qemu" "crosvm" "cloud-hypervisor" "firecracker" "kvmtool" "stratovirt" "alioth" "vfkit" ] package
// {
  _type = "pkgs";
  inherit system;
  path = "/nix/store/stub-nixpkgs";
  stdenv = { hostPlatform = platform; targetPlatform = platform; buildPlatform = platform; };
  python3Packages.supervisor = package "supervisor";
  writeShellScript = script "shell";
  writeText = script "text";
  writers.writePython3 = name: _: script "python3" name;
  replaceVars = file: vars: { inherit file vars; };
}
