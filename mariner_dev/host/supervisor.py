"""mariner's own supervisor of one VM on the runner backend: a detached process per running VM.

    python -m mariner_dev.host.supervisor <state dir> <vm name> [<socket timeout, s>]

It detaches (fork, setsid), records itself in `<state>/supervisor.json` (pid and kernel start
time, so a recycled pid is never mistaken for it, plus the boot id), then, with `<state>` as
the working directory of every runner script (microvm.nix creates volumes and sockets
relative to it):

1. restarts virtiofsd: `current/bin/virtiofsd-run -u <user>` when the VM has virtiofs shares
   (its supervisord config says `user = "root"`; `-u` makes it run as us), and waits for every
   share's socket, since its readiness notification goes to systemd, which is not there;
2. runs `current/bin/microvm-run` with stdin from /dev/null and the console appended to
   `<state>/console.log`;
3. when QEMU exits, stops virtiofsd (it outlives QEMU), removes `booted`, and records
   `stopped` (a requested stop, or the guest powered off) or `failed` with the exit status.

Everything it does is written to the console log as `mariner: ...` lines, so `mariner logs`
and the tail shown by a failed `up` tell the whole story. SIGTERM (e.g. the session ends)
shuts the guest down cleanly through `microvm-shutdown` before anything is killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

RECORD = "supervisor.json"
STOP_REQUEST = "stop-requested"
CONSOLE_LOG = "console.log"
VIRTIOFSD_LOG = "virtiofsd.log"
SUPERVISOR_LOG = "supervisor.log"
CONSOLE_ROTATE_BYTES = 8 * 1024 * 1024
SOCKET_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 60.0
FINAL = ("stopped", "failed")


# -- facts about processes (shared with the backend) ------------------------------------------

def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None
    when it does not exist: with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    fields = data[data.rfind(b")") + 2:].split()
    try:
        if fields[0] == b"Z":  # a zombie has exited; only its parent has not reaped it yet
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int | None, started: int | None) -> bool:
    """True when process `pid` runs and is the one that started at `started`."""
    return bool(pid) and started is not None and start_time(pid) == started


def read_record(state: str) -> dict:
    try:
        with open(os.path.join(state, RECORD)) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_record(state: str, record: dict) -> None:
    path = os.path.join(state, RECORD)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def virtiofs_sockets(runner: str) -> list[str]:
    """The socket paths of the runner's virtiofs shares (relative ones are relative to the
    state directory), from `share/microvm/virtiofs/<tag>/socket` as microvm.nix writes it."""
    base = os.path.join(runner, "share", "microvm", "virtiofs")
    try:
        tags = sorted(os.listdir(base))
    except OSError:
        return []
    sockets = []
    for tag in tags:
        try:
            with open(os.path.join(base, tag, "socket")) as fh:
                sockets.append(fh.read().strip())
        except OSError:
            continue
    return [s for s in sockets if s]


def qmp_socket(name: str) -> str:
    """QEMU's control socket, relative to the state directory: microvm.socket's default."""
    return f"{name}.sock"


# -- the supervisor process ----------------------------------------------------------------------

class Supervisor:
    def __init__(self, state: str, name: str, socket_timeout: float = SOCKET_TIMEOUT):
        self.state = state
        self.name = name
        self.socket_timeout = socket_timeout
        self.sockets: list[str] = []  # virtiofsd's, removed with it (a killed one leaves them)
        self.record: dict = {}
        self.console = None
        self.terminating = False

    def say(self, message: str) -> None:
        """One line in the console log, where `mariner logs` shows it."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.console.write(f"[{stamp}] mariner: {message}\n".encode())
        self.console.flush()

    def save(self, **changes) -> None:
        self.record.update(changes)
        write_record(self.state, self.record)

    def open_console(self) -> None:
        path = os.path.join(self.state, CONSOLE_LOG)
        try:
            if os.path.getsize(path) > CONSOLE_ROTATE_BYTES:
                os.replace(path, path + ".1")
        except OSError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.console = os.fdopen(fd, "ab", buffering=0)

    def on_term(self, signum, frame) -> None:
        self.terminating = True

    def run(self) -> int:
        from . import commands

        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.open_console()
        self.save(pid=os.getpid(), start=start_time(os.getpid()), boot_id=boot_id(),
                  state="starting", since=time.time(), qemu_pid=None, qemu_start=None,
                  virtiofsd_pid=None, result=None)
        current = os.path.join(self.state, "current")
        runner = os.path.realpath(current)
        booted = os.path.join(self.state, "booted")
        target = os.readlink(current)
        try:
            same = os.readlink(booted) == target
        except OSError:
            same = False
        if not same:
            # Replaced atomically, never missing for a moment: `booted` is a GC root (the
            # backend registered it), and Nix drops a root whose link it finds gone.
            tmp = f"{booted}.new-{os.getpid()}"
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            os.symlink(target, tmp)
            os.replace(tmp, booted)
        self.say(f"starting VM {self.name} from {runner}")
        virtiofsd = None
        try:
            virtiofsd = self.start_virtiofsd(runner)
            if virtiofsd is False:
                return self.finish(None, "failed", "virtiofsd did not start")
            if self.terminating:
                return self.finish(virtiofsd, "stopped", "stopped before QEMU started")
            qemu = commands.spawn(commands.built_argv(os.path.join(runner, "bin", "microvm-run")),
                                  cwd=self.state, stdout=self.console.fileno(),
                                  new_session=False)
            self.save(state="running", qemu_pid=qemu.pid, qemu_start=start_time(qemu.pid),
                      since=time.time())
            status = self.wait_qemu(qemu)
        except Exception as exc:  # noqa: BLE001 - recorded as the VM's failure, never lost
            return self.finish(virtiofsd, "failed", f"{exc.__class__.__name__}: {exc}")
        requested = os.path.exists(os.path.join(self.state, STOP_REQUEST)) or self.terminating
        if status == 0 or requested:
            return self.finish(virtiofsd, "stopped", f"QEMU exited with status {status}")
        how = (f"killed by signal {-status}" if status < 0 else f"exited with status {status}")
        return self.finish(virtiofsd, "failed", f"QEMU {how}")

    def start_virtiofsd(self, runner: str):
        """virtiofsd-run, freshly started, once every share's socket exists; None when the VM
        has no virtiofs share, False when it failed (said in the console log)."""
        import getpass

        from . import commands

        sockets = self.sockets = virtiofs_sockets(runner)
        program = os.path.join(runner, "bin", "virtiofsd-run")
        if not sockets:
            return None
        if not os.path.exists(program):
            self.say(f"the VM has virtiofs shares but its runner has no bin/virtiofsd-run")
            return False
        for sock in sockets:  # a stale socket would look ready before virtiofsd listens
            try:
                os.unlink(os.path.join(self.state, sock))
            except FileNotFoundError:
                pass
        log = os.open(os.path.join(self.state, VIRTIOFSD_LOG),
                      os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            proc = commands.spawn(commands.built_argv(program, ["-u", getpass.getuser()]),
                                  cwd=self.state, stdout=log, new_session=True)
        finally:
            os.close(log)
        self.save(virtiofsd_pid=proc.pid, virtiofsd_start=start_time(proc.pid))
        self.say(f"virtiofsd-run started (pid {proc.pid}); waiting for {', '.join(sockets)}")
        deadline = time.monotonic() + self.socket_timeout
        while True:
            missing = [s for s in sockets if not _is_socket(os.path.join(self.state, s))]
            if not missing:
                return proc
            status = proc.poll()
            if status is not None:
                self.say(f"virtiofsd-run exited with status {status} before "
                         f"{', '.join(missing)} appeared; its last lines:")
                for line in _tail(os.path.join(self.state, VIRTIOFSD_LOG), 10):
                    self.say(f"  virtiofsd: {line}")
                return False
            if time.monotonic() > deadline or self.terminating:
                self.say(f"virtiofsd-run did not create {', '.join(missing)} within "
                         f"{self.socket_timeout:g} s; see {VIRTIOFSD_LOG}")
                _stop_group(proc)
                return False
            time.sleep(0.05)

    def wait_qemu(self, qemu) -> int:
        shutdown_sent = None
        while True:
            status = qemu.poll()
            if status is not None:
                return status
            if self.terminating and shutdown_sent is None:
                self.say("asked to stop: shutting the guest down")
                shutdown_sent = time.monotonic()
                self.shutdown_guest()
            elif shutdown_sent is not None and time.monotonic() - shutdown_sent > SHUTDOWN_TIMEOUT:
                self.say(f"the guest did not power off within {SHUTDOWN_TIMEOUT:g} s: "
                         f"terminating QEMU")
                qemu.terminate()
                try:
                    return qemu.wait(10)
                except Exception:  # noqa: BLE001
                    qemu.kill()
                    return qemu.wait()
            time.sleep(0.1)

    def shutdown_guest(self) -> None:
        from . import commands

        program = os.path.join(self.state, "booted", "bin", "microvm-shutdown")
        if not os.path.exists(program):
            return
        try:
            commands.spawn(commands.built_argv(program), cwd=self.state,
                           stdout=self.console.fileno(), new_session=True)
        except Exception as exc:  # noqa: BLE001
            self.say(f"microvm-shutdown did not run: {exc}")

    def finish(self, virtiofsd, state: str, result: str) -> int:
        if virtiofsd:
            _stop_group(virtiofsd)
        for sock in [qmp_socket(self.name), *self.sockets]:
            try:
                os.unlink(os.path.join(self.state, sock))
            except OSError:
                pass
        try:
            os.unlink(os.path.join(self.state, "booted"))
        except FileNotFoundError:
            pass
        self.say(f"VM {self.name} {state}: {result}")
        self.save(state=state, result=result, qemu_pid=None, virtiofsd_pid=None,
                  since=time.time(), ended=time.time())
        return 0


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _tail(path: str, lines: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _stop_group(proc, timeout: float = 10.0) -> None:
    """SIGTERM a process started in its own session and all it started; SIGKILL after
    `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait)
            # supervisord's programs are in the group too: they may outlive it by a moment
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(proc.pid):
                time.sleep(0.05)
            if not _group_alive(proc.pid):
                return
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            continue


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m mariner_dev.host.supervisor <state dir> <vm name> "
              "[<socket timeout>]", file=sys.stderr)
        return 2
    state, name = os.path.abspath(argv[0]), argv[1]
    socket_timeout = float(argv[2]) if len(argv) == 3 else SOCKET_TIMEOUT
    # Detach: the parent returns at once (the caller waits for the record instead), the
    # child leads its own session, so the caller's terminal and process group cannot take it.
    if os.fork() > 0:
        return 0
    os.setsid()
    return Supervisor(state, name, socket_timeout).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
