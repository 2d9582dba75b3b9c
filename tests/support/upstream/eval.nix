# Evaluates rendered mariner flakes through the real module system: nixpkgs' lib.evalModules
# with nix-mariner's nixosModules.default and microvm.nix's guest module, taken from the
# pinned sources in `src` (../shared/upstream/src). Debian's Nix 2.8 has no flakes, so each
# flake's `outputs` function is called by hand with inputs built from the source directories,
# the way a real `nix build` would wire them (nix-mariner's own inputs: its nixpkgs and
# microvm.nix; the rendered flake's: mariner). Only what nixpkgs itself would add is stood in
# for: ./nixos.nix declares the NixOS options the modules set, ./pkgs.nix stands in for packages.
#
# `flakes` maps a name to a rendered flake directory; the result maps it to the values mariner
# relies on, read from the evaluated configuration.
{ src, flakes, system ? "x86_64-linux" }:
let
  lib = import (src + "/nixpkgs-lib/lib");
  pkgs = import ./pkgs.nix { inherit lib system; };
  nixpkgs = {
    outPath = "/nix/store/stub-nixpkgs";
    lib = lib // {
      # nixpkgs' nixosSystem is eval-config.nix over all of NixOS; here: the declarations only.
      nixosSystem = args: lib.evalModules {
        modules = args.modules ++ [
          ./nixos.nix
          {
            _module.args.pkgs = pkgs;
            nixpkgs.system = args.system or system;
            # The runner is built from nixpkgs, which is not here: a stand-in (read only for
            # the tap scripts' queue flag).
            microvm.declaredRunner = pkgs.qemu // { passthru.tapMultiQueue = false; };
          }
        ];
        specialArgs = args.specialArgs or { };
      };
    };
  };
  microvm = (import (src + "/microvm.nix/flake.nix")).outputs {
    self = microvm;
    inherit nixpkgs;
    spectrum = { };
  } // { outPath = src + "/microvm.nix"; };
  mariner = (import (src + "/nix-mariner/flake.nix")).outputs {
    self = mariner;
    inherit nixpkgs microvm;
  } // { inputs = { inherit nixpkgs microvm; }; outPath = src + "/nix-mariner"; };

  evalFlake = dir:
    let
      flake = import (dir + "/flake.nix");
      out = flake.outputs { self = { outPath = dir; }; inherit mariner; };
      names = builtins.attrNames out.nixosConfigurations;
      c = (out.nixosConfigurations.${builtins.head names}).config;
      username = c.mariner.username;
      u = c.users.users.${username};
      pick = keys: set: lib.getAttrs keys set;
      # A freeform value under a false mkIf exists but throws when read: null instead.
      defined = value: let r = builtins.tryEval value; in if r.success then r.value else null;
      lan = c.systemd.network.networks."10-lan";
    in {
      inherit names username;
      hostName = c.networking.hostName;
      user = pick [ "name" "uid" "group" "extraGroups" "isNormalUser" "home" ] u // {
        shell = if u.shell == null then null else lib.getName u.shell;
        keys = u.openssh.authorizedKeys.keys;
      };
      rootKeys = c.users.users.root.openssh.authorizedKeys.keys;
      groups = lib.mapAttrs (_: g: g.gid) c.users.groups;
      shares = map (pick [ "tag" "source" "mountPoint" "proto" "readOnly" "socket" ])
        c.microvm.shares;
      mounts = lib.mapAttrs (_: fs: pick [ "device" "fsType" ] fs)
        (lib.filterAttrs (_: fs: fs ? device && fs ? fsType) c.fileSystems);
      volumes = map (pick [ "image" "mountPoint" "size" ]) c.microvm.volumes;
      interfaces = map (pick [ "type" "id" "mac" ]) c.microvm.interfaces;
      forwardPorts = c.microvm.forwardPorts;
      cid = c.microvm.vsock.cid;
      vsockSsh = c.microvm.vsock.ssh.enable;
      inherit (c.microvm) mem vcpu hypervisor;
      network = pick [ "address" "gateway" "dns" "mac" ] c.mariner.network;
      lan = {
        mac = lan.matchConfig.MACAddress;
        address = lan.networkConfig.Address;
        gateway = lan.networkConfig.Gateway;
        dns = defined lan.networkConfig.DNS;
      };
      docker = c.mariner.docker.enable;
      tmpfiles = c.systemd.tmpfiles.rules;
      failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
      warnings = c.warnings;
      # supervisord's command line, with the generated config and scripts inside (./pkgs.nix)
      virtiofsdRun = c.microvm.binScripts.virtiofsd-run or null;
    };
in
builtins.mapAttrs (_: evalFlake) flakes
