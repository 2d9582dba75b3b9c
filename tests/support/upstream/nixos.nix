# Minimal declarations of the NixOS options that nix-mariner's and microvm.nix's guest modules
# (and a project's own modules) set or read, for lib.evalModules where no nixpkgs exists.
#
# The options mariner relies on are declared with NixOS's types and the defaults that matter
# (a normal user's group is `users`, its home /home/<name>). Every other NixOS namespace is
# declared freeform: its values are accepted as they are defined and stay unevaluated unless
# read. `mariner.*` and `microvm.*` are not covered here: they are declared by the upstream
# modules themselves, so a misspelt or removed option there fails the evaluation, as it would
# in a real build.
{ lib, ... }:
let
  inherit (lib) mkOption types;

  # Like types.anything, but attribute sets stay lazy at every depth (as declared options
  # would be): reading one value never forces the conditions of its neighbours.
  lazyAnything = types.mkOptionType {
    name = "lazyAnything";
    description = "anything";
    check = _: true;
    merge = loc: defs:
      if builtins.all (def: builtins.isAttrs def.value && !lib.isStringLike def.value) defs
      then (types.lazyAttrsOf lazyAnything).merge loc defs
      else types.anything.merge loc defs;
  };
  free = types.lazyAttrsOf lazyAnything;
  freeOption = mkOption { type = free; default = { }; };
  # A namespace with a few declared options and anything else beside them.
  namespace = options: mkOption {
    type = types.submodule { freeformType = free; inherit options; };
    default = { };
  };

  # NixOS's top-level namespaces (nixos/modules/module-list.nix), apart from the ones below.
  freeNamespaces = [
    "appstream" "boot" "console" "containers" "documentation" "environment" "fileSystems"
    "fonts" "gtk" "hardware" "i18n" "image" "krb5" "location" "meta" "nixpkgs" "power"
    "powerManagement" "programs" "qt" "security" "services" "specialisation" "swapDevices"
    "system" "systemd" "time" "virtualisation" "xdg" "zramSwap"
  ];
in
{
  options = lib.genAttrs freeNamespaces (_: freeOption) // {
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };

    networking = namespace {
      hostName = mkOption { type = types.str; default = "nixos"; };
    };

    nix = namespace {
      enable = mkOption { type = types.bool; default = true; };
      optimise.automatic = mkOption { type = types.bool; default = false; };
      settings = mkOption {
        type = types.submodule {
          freeformType = free;
          options.auto-optimise-store = mkOption { type = types.bool; default = false; };
        };
        default = { };
      };
    };

    users = namespace {
      users = mkOption {
        default = { };
        type = types.attrsOf (types.submodule ({ name, config, ... }: {
          freeformType = free;
          options = {
            name = mkOption { type = types.str; default = name; };
            uid = mkOption { type = types.nullOr types.int; default = null; };
            group = mkOption { type = types.str; default = ""; };
            isNormalUser = mkOption { type = types.bool; default = false; };
            extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
            home = mkOption { type = types.str; default = "/var/empty"; };
            shell = mkOption {
              type = types.nullOr (types.either types.package types.path);
              default = null;
            };
            openssh.authorizedKeys.keys = mkOption {
              type = types.listOf types.singleLineStr;
              default = [ ];
            };
          };
          # As NixOS does for a normal user: the `users` group and a home under /home.
          config = lib.mkIf config.isNormalUser {
            group = lib.mkDefault "users";
            home = lib.mkDefault "/home/${name}";
          };
        }));
      };
      groups = mkOption {
        default = { };
        type = types.attrsOf (types.submodule ({ name, ... }: {
          freeformType = free;
          options = {
            name = mkOption { type = types.str; default = name; };
            gid = mkOption { type = types.nullOr types.int; default = null; };
          };
        }));
      };
    };
  };
}
