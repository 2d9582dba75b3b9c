"""Which host backend serves this user: the one place that decides.

`MARINER_BACKEND` wins over `[host] backend` of the per-user config; both take `auto`,
`microvm` or `runner`. `auto` picks `microvm` where the microvm.nix host module is there and
usable (the `microvm` command, the `microvm@.service` unit, and a way to run them with
privilege), else `runner` where Nix and a read-write /dev/kvm are, else says what is missing.
Every check here is a stat or a PATH lookup: config loading runs it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from ..errors import HostError, UsageError

BACKENDS = ("auto", "microvm", "runner")
ENV = "MARINER_BACKEND"
# Where a systemd host keeps unit files (NixOS links its units into /etc/systemd/system).
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system",
             "/lib/systemd/system")
MICROVM_UNIT = "microvm@.service"


@dataclass(frozen=True)
class Choice:
    """The backend chosen (`microvm` or `runner`), what was asked for and why this one."""

    name: str
    requested: str
    reason: str


def requested(user_setting: str | None) -> tuple[str, str]:
    """(the backend asked for, where it was asked): MARINER_BACKEND, else the per-user
    config's [host] backend, else "auto". An unknown MARINER_BACKEND is a UsageError."""
    value = os.environ.get(ENV)
    if value:
        if value not in BACKENDS:
            raise UsageError(f"{ENV}={value!r} is not a host backend: use one of "
                             f"{', '.join(BACKENDS)}")
        return value, ENV
    if user_setting:
        return user_setting, "[host] backend"
    return "auto", "default"


def user_setting() -> str | None:
    """[host] backend of the per-user config, read on its own (for commands without a
    project); a broken file is reported by the config loader, not here."""
    import tomllib

    from .. import paths

    try:
        with open(paths.user_config_file(), "rb") as fh:
            value = (tomllib.load(fh).get("host") or {}).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return value if value in BACKENDS else None


def microvm_missing() -> list[str]:
    """What the microvm backend lacks on this host (empty when it looks usable)."""
    missing = []
    if shutil.which("microvm") is None:
        missing.append("the microvm command")
    if not any(os.path.exists(os.path.join(d, MICROVM_UNIT)) for d in UNIT_DIRS):
        missing.append(f"the {MICROVM_UNIT} unit")
    if shutil.which("systemctl") is None:
        missing.append("systemctl")
    if os.geteuid() != 0:
        prefix = (os.environ.get("MARINER_SUDO", "sudo -n").split() or [""])[0]
        if prefix and shutil.which(prefix) is None:
            missing.append(f"{prefix} (to run microvm and systemctl as root)")
    return missing


def kvm_device() -> str:
    """/dev/kvm (MARINER_KVM names another path, for tests on machines without KVM)."""
    return os.environ.get("MARINER_KVM") or "/dev/kvm"


def runner_missing() -> list[str]:
    """What the runner backend lacks on this host (empty when it looks usable)."""
    missing = []
    if shutil.which("nix") is None:
        missing.append("Nix (`nix` on PATH)")
    kvm = kvm_device()
    if not os.path.exists(kvm):
        missing.append(kvm)
    elif not os.access(kvm, os.R_OK | os.W_OK):
        missing.append(f"read-write access to {kvm}")
    return missing


def vhost_vsock_device() -> str:
    """/dev/vhost-vsock (MARINER_VHOST_VSOCK names another path, for tests)."""
    return os.environ.get("MARINER_VHOST_VSOCK") or "/dev/vhost-vsock"


def vhost_vsock_usable() -> bool:
    """True when this user can open /dev/vhost-vsock (QEMU needs it for a vsock device)."""
    return os.access(vhost_vsock_device(), os.R_OK | os.W_OK)


def choose(user_setting: str | None = None, *, strict: bool = True) -> Choice:
    """The backend for this user on this host. With `strict`, an `auto` that finds neither
    backend usable raises HostError naming what each lacks; without, it answers `runner`
    (what a machine without the host module would use), for rendering and validation."""
    want, source = requested(user_setting)
    if want != "auto":
        return Choice(want, want, f"{source} = {want}")
    lacking = microvm_missing()
    if not lacking:
        return Choice("microvm", "auto", "auto: the microvm.nix host module is installed")
    runner_lacks = runner_missing()
    if not runner_lacks or not strict:
        return Choice("runner", "auto", "auto: no usable microvm.nix host module (missing: "
                      + ", ".join(lacking) + "), so VMs run as you, built with Nix")
    raise HostError("no host backend can run VMs here: the microvm backend needs "
                    + ", ".join(lacking) + "; the runner backend needs "
                    + ", ".join(runner_lacks),
                    hint="`mariner doctor` says what to install for each")


def make(name: str):
    """A backend instance by name (`microvm` or `runner`)."""
    if name == "microvm":
        from .microvm import MicrovmHost

        return MicrovmHost()
    if name == "runner":
        from .userhost import RunnerHost

        return RunnerHost()
    raise HostError(f"unknown host backend {name!r}")
