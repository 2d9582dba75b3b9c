"""The host backend for a NixOS host with the microvm.nix host module.

Upstream facts this relies on (see shared/upstream/README.md): `microvm -c <name> -f <flake>`
creates `<state dir>/<name>/` with `flake` and `current`, `microvm -u <name>` rebuilds it,
`microvm@<name>.service` runs it (its ExecStartPre links `booted` to `current`, its
ExecStopPost removes `booted`), and `-c` adds GC roots `<gcroots>/<name>`, `booted-<name>`.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator

from .. import paths
from ..errors import HostError, HostUnavailable
from . import commands
from .backend import HostBackend, HostVmStatus, check_flake_dir, check_vm_name
from .nixerror import (NixBuildError, build_failure, explain_build_error,
                       option_config_key)

__all__ = ["MicrovmHost", "NixBuildError", "explain_build_error", "option_config_key",
           "gcroots_dir", "unit_name"]

DEFAULT_GCROOTS_DIR = "/nix/var/nix/gcroots/microvm"

_SHOW_PROPERTIES = ("Id", "ActiveState", "SubState", "ActiveEnterTimestampMonotonic")
_STATE_FOLD = {"reloading": "active", "refreshing": "active", "maintenance": "deactivating"}


def gcroots_dir() -> Path:
    """Where `microvm -c` puts the VMs' GC roots (MARINER_GCROOTS_DIR overrides, for tests)."""
    return Path(os.environ.get("MARINER_GCROOTS_DIR") or DEFAULT_GCROOTS_DIR)


def unit_name(name: str) -> str:
    """The VM's systemd unit as mariner names it on command lines (systemd adds .service)."""
    return f"microvm@{name}"


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except PermissionError:
        raise HostError(f"cannot read {path}: permission denied") from None


def _parse_show(output: str) -> list[dict[str, str]]:
    """`systemctl show` output: one block of KEY=VALUE lines per unit, blank-line separated."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in output.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, _, value = line.partition("=")
        current[key] = value
    if current:
        blocks.append(current)
    return blocks


class MicrovmHost(HostBackend):
    """VMs managed with the `microvm` CLI and `microvm@<name>` systemd units."""

    name = "microvm"

    def __init__(self, microvms_dir: Path | None = None):
        self._microvms_dir = microvms_dir

    @property
    def microvms_dir(self) -> Path:
        """The state directory (MARINER_MICROVMS_DIR at the time of the call, unless given)."""
        return self._microvms_dir or paths.microvms_dir()

    @property
    def vms_dir(self) -> Path:
        return self.microvms_dir

    # An instance name for asking systemd whether the microvm@ template is installed: an
    # instance of an installed template loads ("loaded"), a template cannot be asked directly.
    _PROBE_UNIT = "microvm@mariner-preflight.service"

    def check_usable(self) -> None:
        """The `microvm` command, a running systemd and the microvm@ unit, in that order:
        the first one missing is what the user hears about."""
        import shutil

        if shutil.which("microvm") is None:
            raise HostUnavailable(
                "this host has no `microvm` command: the microvm backend needs a NixOS host "
                "with the microvm.nix host module (microvm.nixosModules.host)")
        if shutil.which("systemctl") is None:
            raise HostUnavailable("this host has no systemd (`systemctl` is not on PATH): the "
                                  "microvm backend runs each VM as the unit microvm@NAME")
        result = commands.run("systemctl", ["show", "--property=LoadState", self._PROBE_UNIT],
                            ok_codes=None, timeout=15)
        if result.returncode != 0:
            detail = commands.tail_lines(result.stderr or result.stdout, 1) or \
                f"exit status {result.returncode}"
            raise HostUnavailable(f"systemd is not running on this host ({detail}): the "
                                  f"microvm backend runs each VM as the unit microvm@NAME")
        load_state = _parse_show(result.stdout)[0].get("LoadState", "") if result.stdout.strip() \
            else ""
        if load_state != "loaded":
            raise HostUnavailable(
                "systemd has no microvm@ unit: enable the microvm.nix host module "
                "(microvm.nixosModules.host) in this host's NixOS configuration")

    # -- building -------------------------------------------------------------------------

    def create(self, name: str, flake_dir: Path, *, timeout: float | None = None) -> None:
        check_vm_name(name)
        flake_dir = check_flake_dir(flake_dir)
        if os.path.lexists(self.vm_dir(name)):
            raise HostError(f"VM {name} already exists on this host ({self.vm_dir(name)})",
                            hint="`mariner destroy` removes it")
        self._build(name, ["-c", name, "-f", f"path:{flake_dir}"], timeout)

    def update(self, name: str, *, timeout: float | None = None) -> None:
        directory = self.vm_dir(name)
        if not directory.is_dir():
            raise HostError(f"VM {name} does not exist on this host ({directory})")
        if os.path.lexists(directory / "toplevel"):
            raise HostError(f"VM {name} is declared in the host's NixOS configuration "
                            f"(microvm.vms.{name}); mariner cannot rebuild it")
        self._build(name, ["-u", name], timeout)

    def _build(self, name: str, args: list[str], timeout: float | None) -> None:
        result = commands.run("microvm", args, privileged=True, ok_codes=None, timeout=timeout)
        if result.returncode == 0:
            return
        if "already exists" in result.stdout:
            raise HostError(f"VM {name} already exists on this host ({self.vm_dir(name)})",
                            argv=result.argv, returncode=result.returncode,
                            hint="`mariner destroy` removes it")
        raise build_failure(name, result)

    # -- running --------------------------------------------------------------------------

    def start(self, name: str) -> None:
        directory = self.vm_dir(name)
        if not os.path.lexists(directory / "current"):
            raise HostError(f"VM {name} has not been built ({directory / 'current'} is missing)",
                            hint="`mariner up` creates it")
        commands.run("systemctl", ["start", unit_name(name)], privileged=True)

    def stop(self, name: str, *, wait: bool = True, timeout: float = 120.0) -> None:
        check_vm_name(name)
        deadline = time.monotonic() + timeout
        args = ["stop", unit_name(name)] if wait else ["stop", "--no-block", unit_name(name)]
        commands.run("systemctl", args, privileged=True, timeout=timeout)
        if wait:  # `systemctl stop` waits for the job; a unit can still be on its way down
            self.wait_for_unit(name, ("inactive", "failed"),
                               timeout=max(1.0, deadline - time.monotonic()))

    def restart(self, name: str) -> None:
        if self.status(name).unit == "inactive":
            self.start(name)  # start() checks that the VM was built
        else:
            commands.run("systemctl", ["restart", unit_name(name)], privileged=True)

    def wait_for_unit(self, name: str, states: Iterable[str], *, timeout: float) -> str:
        """Poll the unit until its state is one of `states`; return it (HostError on timeout)."""
        wanted = tuple(states)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            unit = self.status(name).unit
            if unit in wanted:
                return unit
            if time.monotonic() >= deadline:
                raise HostError(f"VM {name} is still {unit} after {timeout:g} s "
                                f"(waiting for {' or '.join(wanted)})")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def destroy(self, name: str) -> None:
        directory = self.vm_dir(name)
        unit = self.status(name).unit
        if unit in ("active", "activating", "deactivating"):
            self.stop(name)
            unit = self.status(name).unit
        if unit == "failed":
            commands.run("systemctl", ["reset-failed", unit_name(name)], privileged=True)
        if directory.is_symlink() or directory.is_file():
            commands.run("rm", ["-f", "--", str(directory)], privileged=True)
        elif directory.exists():
            commands.run("rm", ["-rf", "--one-file-system", "--", str(directory)], privileged=True)
        roots = [gcroots_dir() / name, gcroots_dir() / f"booted-{name}"]
        present = [str(root) for root in roots if os.path.lexists(root)]
        if present:
            commands.run("rm", ["-f", "--", *present], privileged=True)

    # -- reading --------------------------------------------------------------------------

    def status(self, name: str) -> HostVmStatus:
        return self.statuses([name])[name]

    def statuses(self, names: Iterable[str]) -> dict[str, HostVmStatus]:
        names = [check_vm_name(n) for n in names]
        if not names:
            return {}
        units = [unit_name(n) for n in names]
        result = commands.run("systemctl", ["show", "--property=" + ",".join(_SHOW_PROPERTIES),
                                          *units])
        blocks = _parse_show(result.stdout)
        by_id = {block.get("Id", "").removesuffix(".service"): block for block in blocks}
        statuses = {}
        for index, name in enumerate(names):
            block = by_id.get(units[index]) or (blocks[index] if index < len(blocks) else {})
            statuses[name] = self._status_from(name, block)
        return statuses

    def _status_from(self, name: str, show: dict[str, str]) -> HostVmStatus:
        directory = self.vm_dir(name)
        unit = show.get("ActiveState") or "inactive"
        unit = _STATE_FOLD.get(unit, unit)
        since = uptime = None
        if unit == "active":
            try:
                entered = int(show.get("ActiveEnterTimestampMonotonic") or 0)
            except ValueError:
                entered = 0
            if entered > 0:
                uptime = max(0.0, time.monotonic() - entered / 1_000_000)
                since = datetime.now(timezone.utc) - timedelta(seconds=uptime)
        return HostVmStatus(
            name=name, exists=directory.is_dir(), unit=unit,
            flakeref=_read_text(directory / "flake"),
            current=_readlink(directory / "current"), booted=_readlink(directory / "booted"),
            since=since, uptime=uptime, substate=show.get("SubState", ""))

    def logs(self, name: str, *, follow: bool = False, lines: int | None = None) -> Iterator[str]:
        args = ["-u", unit_name(check_vm_name(name)), "--no-pager"]
        if lines is not None:
            args += ["-n", str(int(lines))]
        if follow:
            args.append("-f")
        return commands.stream("journalctl", args)

    def doctor_checks(self, network_mode: str | None = None):
        from ..doctor import microvm_host_checks

        return microvm_host_checks(network_mode)
