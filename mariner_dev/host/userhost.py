"""The runner backend: any Linux with Nix and KVM, VMs run as the user, no host module, no root.

What microvm.nix's host module does around a VM (nixos-modules/host/default.nix), done for one
user: `nix build <flake>#nixosConfigurations.<name>.config.microvm.declaredRunner` into
`<state>/current`, where `<state>` is `$XDG_DATA_HOME/mariner/vms/<name>` (mode 0700: the
volumes, sockets and console log live there, and microvm.nix's runner creates volume images and
sockets relative to its working directory), and mariner's own detached supervisor
(supervisor.py) in place of `microvm@<name>.service`. No sudo anywhere.

Layout of `<state>`, beside what the runner creates (volumes, sockets):

    flake            the flake reference the VM is built from (as the microvm backend keeps it)
    current          -> the runner the last build produced (the out-link of `nix build`, which
                     Nix also registers as a GC root)
    booted           -> the runner the running VM started from (removed when it stops), a
                     GC root too (`nix-store --add-root`): after a rebuild, a garbage
                     collection must not take the runner whose microvm-shutdown `down` runs
    supervisor.json  the supervisor's pid and start time, the QEMU pid, the state, the result
    console.log      the serial console and the supervisor's own `mariner:` lines
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

from ..errors import HostError
from . import commands, supervisor
from .backend import (HostBackend, HostVmStatus, VsockCidInUse, check_flake_dir,
                      check_vm_name)
from .nixerror import build_failure

NIX_FEATURES = ["--extra-experimental-features", "nix-command flakes"]
_UNIT_OF = {"starting": "activating", "running": "active", "stopping": "deactivating",
            "stopped": "inactive", "failed": "failed"}
START_TIMEOUT = 15.0
VSOCK_WATCH = 3.0  # QEMU refuses a taken vsock cid while it sets up its devices
_VSOCK_IN_USE = re.compile(r"vhost-vsock.*(unable to set guest cid|Address already in use)")
SHUTDOWN_SCRIPT_TIMEOUT = 30.0


def state_root() -> Path:
    """$XDG_DATA_HOME/mariner/vms, else ~/.local/share/mariner/vms."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return (base / "mariner" / "vms").absolute()


def declared_runner(flakeref: str, name: str) -> str:
    """The installable microvm.nix's own CLI builds for a VM."""
    return f"{flakeref}#nixosConfigurations.{name}.config.microvm.declaredRunner"


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


class RunnerHost(HostBackend):
    """VMs built with `nix build` and run as the user under mariner's own supervisor."""

    name = "runner"
    #: how long a start waits for virtiofsd's sockets before the VM is `failed`
    socket_timeout = supervisor.SOCKET_TIMEOUT

    def __init__(self, root: Path | None = None):
        self._root = root

    @property
    def root(self) -> Path:
        return self._root or state_root()

    @property
    def vms_dir(self) -> Path:
        return self.root

    def check_usable(self) -> None:
        """Nix on PATH and /dev/kvm read-write for this user: what every runner-mode VM needs
        (`mariner doctor` checks the rest: user namespaces, newuidmap, disk space)."""
        from ..errors import HostUnavailable
        from .choice import runner_missing

        missing = runner_missing()
        if missing:
            raise HostUnavailable(f"the runner backend cannot run VMs here: no "
                                  f"{', '.join(missing)}")

    # -- building -------------------------------------------------------------------------

    def create(self, name: str, flake_dir: Path, *, timeout: float | None = None) -> None:
        check_vm_name(name)
        flake_dir = check_flake_dir(flake_dir)
        directory = self.vm_dir(name)
        if os.path.lexists(directory / "current"):
            raise HostError(f"VM {name} already exists on this host ({directory})",
                            hint="`mariner destroy` removes it")
        for path in (self.root.parent, self.root):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fresh = not directory.exists()
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        flakeref = f"path:{flake_dir}"
        (directory / "flake").write_text(flakeref + "\n")
        try:
            self._build(name, flakeref, timeout)
        except BaseException:
            if fresh:  # a VM that never built is not a VM: leave no half-created one behind
                shutil.rmtree(directory, ignore_errors=True)
            raise

    def update(self, name: str, *, timeout: float | None = None) -> None:
        directory = self.vm_dir(name)
        try:
            flakeref = (directory / "flake").read_text().strip()
        except FileNotFoundError:
            raise HostError(f"VM {name} does not exist on this host ({directory})") from None
        self._build(name, flakeref, timeout)

    def _build(self, name: str, flakeref: str, timeout: float | None) -> None:
        out = self.vm_dir(name) / "current"
        result = commands.run("nix", [*NIX_FEATURES, "build", "-o", str(out),
                                      declared_runner(flakeref, name)],
                              ok_codes=None, timeout=timeout)
        if result.returncode == 0:
            return
        raise build_failure(name, result)

    # -- running --------------------------------------------------------------------------

    def start(self, name: str) -> None:
        directory = self.vm_dir(name)
        if not (directory / "current" / "bin" / "microvm-run").exists():
            raise HostError(f"VM {name} has not been built ({directory / 'current'} is missing)",
                            hint="`mariner up` creates it")
        if self.status(name).unit in ("active", "activating"):
            return
        try:
            (directory / supervisor.STOP_REQUEST).unlink()
        except FileNotFoundError:
            pass
        self._root_booted(directory)
        try:
            self._spawn_supervisor(name, directory)
        except BaseException:
            # No VM runs from `booted`: its GC root must not pin that runner in the store.
            record = supervisor.read_record(str(directory))
            if not supervisor.alive(record.get("pid"), record.get("start")):
                try:
                    os.unlink(directory / "booted")
                except FileNotFoundError:
                    pass
            raise
        self._check_vsock_cid(name, directory)

    def _spawn_supervisor(self, name: str, directory: Path) -> None:
        import sys

        before = supervisor.read_record(str(directory))
        log = os.open(directory / supervisor.SUPERVISOR_LOG,
                      os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            proc = commands.spawn([sys.executable, "-m", "mariner_dev.host.supervisor",
                                   str(directory), name, f"{self.socket_timeout:g}"],
                                  cwd=directory, stdout=log, new_session=True)
        finally:
            os.close(log)
        if proc.wait(START_TIMEOUT) != 0:
            raise HostError(f"the supervisor of VM {name} did not start (exit status "
                            f"{proc.returncode}); see {directory / supervisor.SUPERVISOR_LOG}")
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # until the detached supervisor has recorded itself
            record = supervisor.read_record(str(directory))
            if record.get("pid") and record.get("pid") != before.get("pid"):
                return
            if time.monotonic() > deadline:
                raise HostError(f"the supervisor of VM {name} did not report within "
                                f"{START_TIMEOUT:g} s; see {directory / supervisor.SUPERVISOR_LOG}")
            time.sleep(0.02)

    def _root_booted(self, directory: Path) -> None:
        """`booted`, pointing at the runner `current` names, registered as a GC root before the
        supervisor starts from it (the supervisor re-links the same target; the root is the
        link's path, so it holds while the VM runs and lapses once the link is removed)."""
        runner = os.readlink(directory / "current")
        commands.run("nix-store", ["--realise", runner, "--add-root", str(directory / "booted"),
                                   "--indirect"], timeout=START_TIMEOUT)

    def _check_vsock_cid(self, name: str, directory: Path) -> None:
        """QEMU fails at once when another VM on the host (another user's: mariner cannot see
        their registry) holds the vsock cid: watch the first seconds for it."""
        try:
            cid = int((directory / "booted" / "share" / "microvm" / "vsock-cid").read_text())
        except (OSError, ValueError):
            return  # no vsock device
        deadline = time.monotonic() + VSOCK_WATCH
        while time.monotonic() < deadline:
            record = supervisor.read_record(str(directory))
            if record.get("state") in supervisor.FINAL:
                tail = "\n".join(self.log_tail(name, 30))
                if _VSOCK_IN_USE.search(tail):
                    raise VsockCidInUse(name, cid)
                return
            time.sleep(0.05)

    def stop(self, name: str, *, wait: bool = True, timeout: float = 120.0) -> None:
        directory = self.vm_dir(name)
        state = str(directory)
        record = supervisor.read_record(state)
        if self._unit(record) in ("inactive", "failed") and not self._qemu_alive(record):
            return
        deadline = time.monotonic() + timeout
        (directory / supervisor.STOP_REQUEST).write_text("")
        shutdown = directory / "booted" / "bin" / "microvm-shutdown"
        if self._qemu_alive(record) and shutdown.exists():
            # Ctrl-Alt-Del over QMP through <hostName>.sock; it blocks until QEMU closes the
            # socket, and does nothing at all when the socket is not there (yet).
            try:
                commands.run_built(shutdown, cwd=directory, ok_codes=None,
                                   timeout=min(SHUTDOWN_SCRIPT_TIMEOUT,
                                               max(1.0, deadline - time.monotonic())))
            except HostError:
                pass  # QEMU is terminated below
        if not wait:
            return
        self._wait(lambda: not self._qemu_alive(supervisor.read_record(state)),
                   max(1.0, deadline - time.monotonic() - 10))
        record = supervisor.read_record(state)
        if self._qemu_alive(record):
            self._signal(record.get("qemu_pid"), record.get("qemu_start"), signal.SIGTERM)
            if not self._wait(lambda: not self._qemu_alive(supervisor.read_record(state)), 10):
                self._signal(record.get("qemu_pid"), record.get("qemu_start"), signal.SIGKILL)
        # the supervisor stops virtiofsd, records the end and exits; if it is gone, do it
        # ourselves
        def ended() -> bool:
            record = supervisor.read_record(state)
            return self._unit(record) in ("inactive", "failed") and \
                not supervisor.alive(record.get("pid"), record.get("start"))

        if not self._wait(ended, 15):
            record = supervisor.read_record(state)
            for pid, start in ((record.get("virtiofsd_pid"), record.get("virtiofsd_start")),
                               (record.get("pid"), record.get("start"))):
                if supervisor.alive(pid, start):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            if self._unit(supervisor.read_record(state)) not in ("inactive", "failed"):
                raise HostError(f"VM {name} did not stop within {timeout:g} s")

    @staticmethod
    def _wait(predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    @staticmethod
    def _signal(pid, start, sig) -> None:
        if supervisor.alive(pid, start):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    @staticmethod
    def _qemu_alive(record: dict) -> bool:
        return supervisor.alive(record.get("qemu_pid"), record.get("qemu_start"))

    @staticmethod
    def _unit(record: dict) -> str:
        """The VM's state in systemd's words, from the supervisor's record and the live pids."""
        state = record.get("state")
        if not state:
            return "inactive"
        if state in supervisor.FINAL:
            return _UNIT_OF[state]
        if supervisor.alive(record.get("pid"), record.get("start")):
            return _UNIT_OF.get(state, "active")
        if RunnerHost._qemu_alive(record):
            return "active"  # the supervisor was killed, QEMU runs on
        if record.get("boot_id") and record.get("boot_id") != supervisor.boot_id():
            return "inactive"  # the machine rebooted: the VM is simply not running
        return "failed"  # the supervisor died without recording an end

    def destroy(self, name: str) -> None:
        directory = self.vm_dir(name)
        if self.status(name).unit in ("active", "activating", "deactivating"):
            self.stop(name)
        if directory.is_symlink() or directory.is_file():
            directory.unlink()
        elif directory.exists():
            shutil.rmtree(directory)

    # -- reading --------------------------------------------------------------------------

    def status(self, name: str) -> HostVmStatus:
        directory = self.vm_dir(name)
        record = supervisor.read_record(str(directory))
        unit = self._unit(record)
        since = uptime = None
        if unit == "active" and isinstance(record.get("since"), (int, float)):
            since = datetime.fromtimestamp(record["since"], timezone.utc)
            uptime = max(0.0, (datetime.now(timezone.utc) - since) / timedelta(seconds=1))
        try:
            flakeref = (directory / "flake").read_text().strip()
        except OSError:
            flakeref = None
        substate = {"active": "running", "activating": "start", "deactivating": "stop",
                    "failed": "failed"}.get(unit, "dead")
        return HostVmStatus(name=name, exists=directory.is_dir(), unit=unit, flakeref=flakeref,
                            current=_readlink(directory / "current"),
                            booted=_readlink(directory / "booted") if unit != "inactive" else None,
                            since=since, uptime=uptime, substate=substate)

    def logs(self, name: str, *, follow: bool = False, lines: int | None = None) -> Iterator[str]:
        path = self.vm_dir(name) / supervisor.CONSOLE_LOG
        return _read_log(path, follow=follow, lines=lines)

    def doctor_checks(self, network_mode: str | None = None):
        from ..doctor import runner_host_checks

        return runner_host_checks(self.root)


# C0 controls but tab, DEL and C1 controls: the console is the guest's output, and an escape
# sequence printed to the developer's terminal could rewrite what it shows or what it sends.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0a, 0x20), 0x7f,
                                       *range(0x80, 0xa0))}


def printable(line: str) -> str:
    """A console line with its control characters shown as \\xNN (a trailing CR dropped)."""
    return line.rstrip("\r").translate(_CONTROL)


def _read_log(path: Path, *, follow: bool, lines: int | None) -> Iterator[str]:
    """The log's lines (the last `lines`), then with `follow` new ones as they come; control
    characters escaped (printable())."""
    return map(printable, _raw_log(path, follow=follow, lines=lines))


def _raw_log(path: Path, *, follow: bool, lines: int | None) -> Iterator[str]:
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        if not follow:
            return
        while not path.exists():
            time.sleep(0.2)
        fh = open(path, "rb")
    with fh:
        text = fh.read().decode(errors="replace")
        existing = text.split("\n")
        partial = existing.pop()  # "" after a final newline
        if not follow and partial:
            existing.append(partial)  # the last line, even unfinished
            partial = ""
        yield from (existing[-lines:] if lines else [] if lines == 0 else existing)
        if not follow:
            return
        while True:
            chunk = fh.read()
            if not chunk:
                try:
                    if os.path.getsize(path) < fh.tell():  # rotated at a new start
                        fh.seek(0)
                except OSError:
                    pass
                time.sleep(0.2)
                continue
            partial += chunk.decode(errors="replace")
            *complete, partial = partial.split("\n")
            yield from complete
