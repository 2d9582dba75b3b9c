"""explain_build_error: a Nix failure becomes a short message and, when known, a config key."""

from __future__ import annotations

import pytest

from mariner_dev.host.microvm import explain_build_error, option_config_key

STORE = "/nix/store/0f6jwmlz0rknhsw5qgv3f2wi1jb1xgcy-source"

# Nix 2.8 (this machine's nix-instantiate), nixpkgs' getAttrFromPath aborting
ABORT_28 = "error: evaluation aborted with the following error message: 'cannot find attribute `ripgrepp''\n"

# Newer Nix: a bare "error:" line, the trace, then the innermost error last
ABORT_NEW = f"""\
error:
       … while calling the 'head' builtin
         at {STORE}/lib/attrsets.nix:1575:11:
         1574|         if attrPath == [ ] then
         1575|           head attrPath
             |           ^
       … while evaluating the option `environment.systemPackages':

       (stack trace truncated; use '--show-trace' to show the full, detailed trace)

       error: cannot find attribute 'python312Packages.pipp'
"""

MISSING_IN_MODULE = f"""\
error:
       … while evaluating the option `environment.systemPackages':

       error: attribute 'ripgrepp' missing

       at {STORE}/modules/0-extra.nix:3:34:

            2| {{
            3|   environment.systemPackages = [ pkgs.ripgrepp ];
             |                                  ^
            4| }}
"""

MISSING_IN_PACKAGES = f"""\
error:
       … while evaluating the option `environment.systemPackages':

       error: attribute 'ripgrepp' missing

       at {STORE}/vm.nix:40:3:
"""

UNDEFINED_IN_MODULE = """\
error: undefined variable 'pkgs'

       at /home/me/.local/state/mariner/vms/api/flake/modules/1-db.nix:2:33:

            1| { ... }:
            2| { environment.systemPackages = [ pkgs.git ]; }
"""

NO_OPTION_FROM_VM_NIX = f"""\
error: The option `mariner.ssh.authorizedKey' does not exist. Definition values:
       - In `{STORE}/vm.nix': "ssh-ed25519 AAAA mariner"
"""

NO_OPTION_FROM_MODULE = f"""\
error: The option `services.postgress' does not exist. Definition values:
       - In `{STORE}/modules/0-extra.nix':
           {{
             enable = true;
           }}
"""

REMOVED_OPTION = """\
error: The option `microvm.balloonMem' can no longer be used since it's been removed. Use microvm.balloon
"""

WRONG_TYPE = f"""\
error: A definition for option `microvm.hypervisor' is not of type `one of "qemu", "cloud-hypervisor", "firecracker"'. Definition values:
       - In `{STORE}/vm.nix': "qemuu"
"""

CONFLICT = f"""\
error: The option `users.users.vm.uid' has conflicting definition values:
       - In `{STORE}/modules/user.nix': 1000
       - In `{STORE}/vm.nix': 1001
       Use `lib.mkForce value` or `lib.mkDefault value` to change the priority on any of these definitions.
"""

ASSERTIONS = """\
error:
       Failed assertions:
       - MicroVM api: `config.microvm.forwardPorts` works only with qemu and one network interface with `type = "user"`
"""

HASH = """\
error: hash mismatch in fixed-output derivation '/nix/store/8q1z-source.drv':
         specified: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
            got:    sha256-0b6Jf1iRqyKj+6pTiOtWPlOn9zxVAmPlXUZkB/VOQgU=
"""

NETWORK = """\
warning: error: unable to download 'https://api.github.com/repos/mksafavi/nix-mariner/commits/HEAD': Couldn't resolve host name (6); retrying in 281 ms
error: unable to download 'https://api.github.com/repos/mksafavi/nix-mariner/commits/HEAD': Couldn't resolve host name (6)
"""

BUILDER = """\
error: builder for '/nix/store/xyz-hello-2.12.drv' failed with exit code 2;
       last 3 log lines:
       > checking for gcc... no
       > configure: error: no acceptable C compiler found in $PATH
       > See `config.log' for more details
       For full logs, run 'nix log /nix/store/xyz-hello-2.12.drv'.
error: 1 dependencies of derivation '/nix/store/abc-system-path.drv' failed to build
"""

GENERIC = """\
warning: Git tree '/etc/nixos' is dirty
error: flake 'path:/tmp/f' does not provide attribute 'packages.x86_64-linux.nixosConfigurations.api.config.microvm.declaredRunner', 'legacyPackages.x86_64-linux.nixosConfigurations.api.config.microvm.declaredRunner' or 'nixosConfigurations.api.config.microvm.declaredRunner'
"""


@pytest.mark.parametrize("stderr, message, key", [
    (ABORT_28, "nixpkgs has no package `ripgrepp`", "nix.packages"),
    (ABORT_NEW, "nixpkgs has no package `python312Packages.pipp`", "nix.packages"),
    (MISSING_IN_PACKAGES, "nixpkgs has no package `ripgrepp`", "nix.packages"),
    (MISSING_IN_MODULE, "undefined attribute `ripgrepp` in module 0-extra.nix", "nix.modules"),
    (UNDEFINED_IN_MODULE, "undefined variable `pkgs` in module 1-db.nix", "nix.modules"),
    (NO_OPTION_FROM_VM_NIX, "the option `mariner.ssh.authorizedKey` does not exist in the "
                            "nix-mariner/microvm.nix revision the flake uses", "nix.mariner"),
    (NO_OPTION_FROM_MODULE, "the option `services.postgress` does not exist (set in module "
                            "0-extra.nix)", "nix.modules"),
    (REMOVED_OPTION, "the option `microvm.balloonMem` does not exist", "nix.modules"),
    (WRONG_TYPE, "A definition for option `microvm.hypervisor' is not of type `one of "
                 "\"qemu\", \"cloud-hypervisor\", \"firecracker\"'", "vm.hypervisor"),
    (CONFLICT, "The option `users.users.vm.uid' has conflicting definition values", "vm.uid"),
    (ASSERTIONS, "failed assertions: MicroVM api: `config.microvm.forwardPorts` works only "
                 "with qemu and one network interface with `type = \"user\"`", "network"),
])
def test_recognised_causes(stderr, message, key):
    assert explain_build_error(stderr) == (message, key)


def test_hash_mismatch_is_a_plain_message():
    message, key = explain_build_error(HASH)
    assert key is None
    assert message.startswith("hash mismatch in fixed-output derivation /nix/store/8q1z-source.drv")
    assert "got sha256-0b6Jf1iRqyKj" in message


def test_network_failure_is_a_plain_message():
    message, key = explain_build_error(NETWORK)
    assert key is None
    assert message.startswith("Nix could not download what the VM needs (unable to download "
                              "'https://api.github.com/")
    assert "network" in message


def test_builder_failure_keeps_the_build_log_tail():
    message, key = explain_build_error(BUILDER)
    assert key is None
    assert message.splitlines()[0] == ("builder for '/nix/store/xyz-hello-2.12.drv' failed "
                                       "with exit code 2; last log lines:")
    assert "configure: error: no acceptable C compiler found in $PATH" in message


def test_unknown_error_is_its_last_error_line():
    assert explain_build_error(GENERIC) == (
        "flake 'path:/tmp/f' does not provide attribute 'packages.x86_64-linux.nixosConfigurations"
        ".api.config.microvm.declaredRunner', 'legacyPackages.x86_64-linux.nixosConfigurations.api"
        ".config.microvm.declaredRunner' or 'nixosConfigurations.api.config.microvm."
        "declaredRunner'", None)


def test_colours_and_empty_output():
    assert explain_build_error("\x1b[31;1merror:\x1b[0m something broke\n") == \
        ("something broke", None)
    assert explain_build_error("") == ("the build failed without a message", None)
    assert explain_build_error("just some text\n") == ("just some text", None)


def test_trace_lines_stay_out_of_the_message():
    message, _ = explain_build_error(MISSING_IN_MODULE + "       … while evaluating x\n")
    assert "\n" not in message and "…" not in message


@pytest.mark.parametrize("option, key", [
    ("microvm.vcpu", "vm.cpus"), ("microvm.mem", "vm.memory"),
    ("mariner.network.address", "network"), ("microvm.forwardPorts", "network"),
    ("users.users.vm.uid", "vm.uid"), ("users.users.\"vm\".group", "vm.gid"),
    ("environment.variables.FOO", "env"), ("mariner.storage.persistSizeMiB", "storage"),
    ("microvm.shares", "shares"), ("mariner.cid", "vm.cid"), ("services.nginx.enable", None),
    ("microvm.memory", None),
])
def test_option_config_key(option, key):
    assert option_config_key(option) == key
