"""The host backend interface: what mariner asks of the machine that runs the VMs.

A backend knows how to build a VM from a rendered flake directory, start and stop it, report
its state and show its console log. `MicrovmHost` (microvm.py) is the implementation for a
NixOS host with the microvm.nix host module; another backend (plain Nix, a remote host over
SSH) implements the same methods and nothing above this layer changes.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from ..errors import HostError

if TYPE_CHECKING:
    from ..doctor import Check

# Unit states as systemd's ActiveState names them. "reloading" and "maintenance" are folded
# into these by the backends (a VM unit never reloads).
UNIT_STATES = ("active", "activating", "deactivating", "inactive", "failed")

# Safe as a directory name, a systemd instance name and a command-line argument: no slash,
# no leading dash (it would read as a flag), no "." / "..".
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_vm_name(name: str) -> str:
    """Return `name` if it can be used as a VM name on the host; raise HostError otherwise."""
    if not _NAME.match(name) or ".." in name:
        raise HostError(f"{name!r} is not a usable VM name (letters, digits, '-', '_', '.'; "
                        f"at most 64 characters, starting with a letter or digit)")
    return name


# Characters a `path:` flake reference carries through Nix's URL parser unchanged.
_FLAKE_PATH = re.compile(r"^/[A-Za-z0-9._+,@~/-]*$")


def check_flake_dir(flake_dir: Path) -> Path:
    """`flake_dir` if a VM can be built from it (absolute, nameable in a `path:` flake
    reference, holding flake.nix); ValueError for a relative one, HostError otherwise."""
    flake_dir = Path(flake_dir)
    if not flake_dir.is_absolute():
        raise ValueError(f"the flake directory must be absolute, not {str(flake_dir)!r}")
    if not _FLAKE_PATH.match(str(flake_dir)):
        raise HostError(f"{flake_dir}: a `path:` flake reference cannot carry this directory "
                        f"name (use letters, digits and . _ + , @ ~ / - only)")
    if not (flake_dir / "flake.nix").is_file():
        raise HostError(f"{flake_dir / 'flake.nix'} does not exist")
    return flake_dir


class VsockCidInUse(HostError):
    """The VM could not start because another VM on this host (another user's, which mariner
    cannot see) holds its vsock cid."""

    def __init__(self, name: str, cid: int):
        super().__init__(f"VM {name} could not start: another VM on this host holds vsock cid "
                         f"{cid}", hint="set [vm] cid to a free one, or remove it to have "
                                        "mariner pick another")
        self.cid = cid


@dataclass(frozen=True)
class HostVmStatus:
    """What the host says about one VM, read without changing anything."""

    name: str
    exists: bool               # the VM's state directory exists (created, `microvm -c` done)
    unit: str                  # one of UNIT_STATES
    flakeref: str | None       # the flake the VM is built from (its `flake` file)
    current: str | None        # what the VM was last built to (target of `current`)
    booted: str | None         # what the running VM booted from (target of `booted`)
    since: datetime | None     # when the unit last became active (aware, UTC); None if not active
    uptime: float | None       # seconds since then; None if not active
    substate: str = ""         # systemd's SubState, e.g. "running", "auto-restart" (crashed,
                               # restarting), "dead"

    @property
    def running(self) -> bool:
        return self.unit == "active"

    @property
    def restart_pending(self) -> bool:
        """Built again since it booted: a restart would run a different system."""
        return self.booted is not None and self.current is not None and self.booted != self.current

    def to_json(self) -> dict:
        return {"name": self.name, "exists": self.exists, "unit": self.unit,
                "flakeref": self.flakeref, "current": self.current, "booted": self.booted,
                "since": self.since.isoformat() if self.since else None,
                "uptime": self.uptime, "substate": self.substate,
                "restart_pending": self.restart_pending}


class HostBackend(ABC):
    """Creates, builds, starts, stops and removes VMs on one host. Every method is synchronous."""

    #: a short name for messages and `doctor`
    name = "host"

    _usable: bool = False

    def check_usable(self) -> None:
        """Raise HostUnavailable, one line naming what this machine lacks for this backend
        (its hint: the next step, `mariner doctor` by default), when the backend cannot work
        here. Cheap: at most a command or two. The default checks nothing."""

    def preflight(self) -> None:
        """check_usable() once per backend object. Everything above `host/` calls this before
        a backend's first host command, so a host that is not ready gets one clear line
        instead of a failed `systemctl` or `microvm` call."""
        if not self._usable:
            self.check_usable()
            self._usable = True

    @property
    @abstractmethod
    def vms_dir(self) -> Path:
        """The directory that holds one directory per VM (the backend's state directory)."""

    def vm_dir(self, name: str) -> Path:
        """The VM's own directory in vms_dir (HostError for a name that cannot be one)."""
        return self.vms_dir / check_vm_name(name)

    @abstractmethod
    def create(self, name: str, flake_dir: Path, *, timeout: float | None = None) -> None:
        """Build the VM `name` from the flake in the absolute directory `flake_dir` and register it.

        The flake must define `nixosConfigurations.<name>`. Raises HostError if the VM already
        exists, and a NixBuildError (a HostError) when Nix fails to build it.
        """

    @abstractmethod
    def update(self, name: str, *, timeout: float | None = None) -> None:
        """Rebuild an existing VM from the flake it was created from; a running VM keeps running
        the old system until it is restarted (see HostVmStatus.restart_pending)."""

    @abstractmethod
    def start(self, name: str) -> None:
        """Start the VM's unit (a no-op if it is active). Returns once the unit is started,
        not when the guest has booted."""

    @abstractmethod
    def stop(self, name: str, *, wait: bool = True, timeout: float = 120.0) -> None:
        """Stop the VM's unit; with `wait`, return only once it is inactive (HostError after
        `timeout` seconds). Stopping a stopped VM is a no-op."""

    def restart(self, name: str) -> None:
        """Stop the VM if it runs and start it again, so that it boots what was built last."""
        self.stop(name)
        self.start(name)

    @abstractmethod
    def destroy(self, name: str) -> None:
        """Stop the VM and remove everything the host keeps for it: its state directory
        (volumes included) and its GC roots. Destroying an absent VM is a no-op."""

    @abstractmethod
    def status(self, name: str) -> HostVmStatus:
        """The VM's state on the host (an absent VM gives exists=False, unit "inactive")."""

    def statuses(self, names: Iterable[str]) -> dict[str, HostVmStatus]:
        """status() of several VMs; backends may answer them all with one host command."""
        return {name: self.status(name) for name in names}

    @abstractmethod
    def logs(self, name: str, *, follow: bool = False, lines: int | None = None) -> Iterator[str]:
        """The VM's console/unit log, oldest first; the last `lines` lines if given. With
        `follow`, keeps yielding new lines until the iterator is closed."""

    def log_tail(self, name: str, lines: int = 20) -> list[str]:
        """The last `lines` lines of the VM's log (for error messages)."""
        return list(self.logs(name, lines=lines))

    def list_vms(self) -> list[str]:
        """The names of every VM the host has, created by mariner or not, sorted: the
        directories in vms_dir (not hidden ones, not symlinks)."""
        directory = self.vms_dir
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return []
        except PermissionError:
            raise HostError(f"cannot list {directory}: permission denied") from None
        return sorted(e.name for e in entries
                      if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))

    def exists(self, name: str) -> bool:
        """True when the host has a VM called `name` (its directory in vms_dir)."""
        return self.vm_dir(name).is_dir()

    def doctor_checks(self, network_mode: str | None = None) -> list[Check]:
        """Checks of this host's readiness for `mariner doctor` (none by default). With
        `network_mode` ("bridge" | "user"), checks that mode does not need are advisory."""
        return []
