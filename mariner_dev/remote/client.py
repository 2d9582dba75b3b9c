"""The client side of the per-VM agent: find it, check it, hand it our stdio, relay signals;
ask it for a sync or for the forwards it holds.

Imports only the standard library and mariner's light modules (no asyncssh), so that `exec`
served by the agent starts in a few tens of milliseconds, and `status` and `sync` through the
agent never load asyncssh.
"""

from __future__ import annotations

import os
import sys
import time

try:
    # The C modules beneath `socket` and `signal`: their Python layers turn every constant into
    # an enum member at import time, which costs the exec fast path ~8 ms of start-up here
    # (most of what Python itself takes to start); nothing in this module needs the enums.
    import _signal as signal
    import _socket
except ImportError:  # not CPython
    import signal
    import socket as _socket

from .. import paths
from . import proto

TYPE_CHECKING = False
if TYPE_CHECKING:  # the fast path imports none of these
    from pathlib import Path

    from .command import ExecRequest
    from .target import GuestTarget


def _printable(text) -> str:
    from ..termsafe import printable

    return printable(text)


def _unreachable(message: str) -> Exception:
    from ..errors import GuestUnreachable

    return GuestUnreachable(message)

START_TIMEOUT = 15.0
EXEC_HANDSHAKE_TIMEOUT = 40.0   # the agent waits up to 15 s for a reconnect, then starts the command


class AgentUnavailable(Exception):
    """No usable agent (absent, dead, stale): the caller may start one or go direct.
    `hung`: it accepted the connection but did not answer in time."""

    def __init__(self, reason: str, stale: bool = False, hung: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.stale = stale
        self.hung = hung


def socket_file(name: str) -> str:
    """The agent socket of VM `name`, as a string (the exec fast path does not import pathlib)."""
    return proto.socket_file(name, paths.runtime_dir_str())


def socket_path(name: str) -> Path:
    from pathlib import Path

    return Path(socket_file(name))


def lock_path(name: str) -> Path:
    return socket_path(name).with_suffix(".lock")


def log_path(name: str) -> Path:
    return socket_path(name).with_suffix(".log")


def agent_process(name: str) -> tuple[int, int | None] | None:
    """(pid, start time) of the live agent of VM `name` (it holds a flock on its lock file
    and wrote both there), else None. The start time is None for an agent of an older build
    that wrote only its pid: then the held flock alone vouches for it."""
    from ..fsutil import lock_is_held

    lock = lock_path(name)
    if not lock_is_held(lock):
        return None
    try:
        fields = lock.read_text().split()
        pid = int(fields[0])
        started = int(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    return pid, started


def agent_pid(name: str) -> int | None:
    """The pid of the live agent of VM `name`, else None."""
    proc = agent_process(name)
    return proc[0] if proc is not None else None


def agent_running(name: str) -> bool:
    """True when an agent process for VM `name` is alive."""
    return agent_pid(name) is not None


class _UnixSocket(_socket.socket):
    """A Unix stream socket that closes at the end of a `with` block (what socket.socket adds
    to the C type, as far as this module is concerned)."""

    __slots__ = ()

    def __init__(self):
        super().__init__(_socket.AF_UNIX, _socket.SOCK_STREAM)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# SIGINT... by number, for the SIGNAL frame (`signal.Signals(n).name` without the enum).
_SIGNAL_NAMES = {signal.SIGINT: "INT", signal.SIGTERM: "TERM", signal.SIGHUP: "HUP",
                 signal.SIGQUIT: "QUIT"}


def _recv_exact(sock: _UnixSocket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: _UnixSocket) -> tuple[bytes, bytes]:
    """The next frame; EOFError when the agent hung up, ValueError when what it sent is not a
    frame (such as a length beyond proto.MAX_FRAME)."""
    kind, length = proto.parse_header(_recv_exact(sock, proto.HEADER_SIZE))
    return kind, _recv_exact(sock, length) if length else b""


def _answer(payload: bytes) -> dict:
    """An agent's READY/ERROR/EXIT/RESULT body; ValueError when it is not one."""
    info = proto.loads(payload) if payload else {}
    if not isinstance(info, dict):
        raise ValueError(f"an answer of type {type(info).__name__}")
    return info


def _garbled(name: str, detail) -> Exception:
    """What a client says when the agent's answer breaks the protocol (exit 125 for exec)."""
    return _unreachable(f"the mariner agent for VM {name} sent an answer mariner cannot read "
                        f"({detail}); see {log_path(name)}, and `mariner up` to start a new "
                        f"agent")


def _hello(target: "GuestTarget", op: str, request: dict | None = None, *,
           forwards: list | None = None, probe: bool = False,
           retry_ports: bool = False) -> bytes:
    body = {"proto": proto.PROTO, "build": proto.build_hash(), "target": target.fingerprint(),
            "op": op, "request": request}
    if forwards is not None:
        body["forwards"] = proto.forwards_fingerprint(forwards)
    if probe:
        body["probe"] = True
    if retry_ports:
        body["retry_ports"] = True
    return proto.frame(proto.HELLO, proto.dumps(body))


def _open(name: str) -> _UnixSocket:
    path = socket_file(name)
    sock = _UnixSocket()
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise AgentUnavailable(f"no agent listening on {path} ({exc.__class__.__name__})")
    except OSError as exc:
        sock.close()
        raise AgentUnavailable(f"cannot connect to the agent socket {path}: {exc}")
    uid = peer_uid(sock)
    if uid != os.getuid():
        # Not our agent: it gets nothing from us, not the HELLO, not our stdio.
        sock.close()
        raise _unreachable(f"the agent socket {path} is served by uid {uid}, not by you "
                           f"(uid {os.getuid()}): mariner sent it nothing; remove the socket "
                           f"and find out who made it")
    return sock


def peer_uid(sock) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), -1 if the
    kernel does not say."""
    try:
        creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    except (OSError, AttributeError):
        return -1
    return int.from_bytes(creds[4:8], sys.byteorder)     # struct ucred: pid, uid, gid


def _handshake(sock: _UnixSocket, name: str, hello: bytes,
               fds: list[int] | None = None) -> dict:
    try:
        if fds:
            # SCM_RIGHTS data is an array of C ints (4 bytes on every platform mariner runs on).
            sock.sendmsg([hello], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                    b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
        else:
            sock.sendall(hello)
        kind, payload = read_frame(sock)
    except TimeoutError:
        raise AgentUnavailable(f"the agent did not answer within {sock.gettimeout():g} s",
                               hung=True) from None
    except (EOFError, OSError) as exc:
        raise AgentUnavailable(f"the agent hung up during the handshake ({exc!r})")
    except ValueError as exc:
        raise _garbled(name, exc) from None
    try:
        info = _answer(payload)
    except ValueError as exc:  # an agent of another protocol: of another build, so stale
        raise AgentUnavailable(f"the running agent is from another build of mariner ({exc})",
                               stale=True) from None
    if kind == proto.READY:
        return info
    if kind == proto.ERROR and info.get("kind") == "stale":
        raise AgentUnavailable(info.get("message", "stale agent"), stale=True)
    if kind == proto.ERROR:
        raise _unreachable(info.get("message") or "the mariner agent could not run the command")
    raise AgentUnavailable(f"unexpected reply from the agent ({kind!r})")


def ping(target: "GuestTarget", forwards: list | None = None,
         retry_ports: bool = False) -> dict:
    """Handshake only: raises AgentUnavailable (stale=True for another build/target, or for
    another `[ports] forward` list when `forwards` is given). With retry_ports (`up`), the
    agent tries again, for a while, the host ports it could not take."""
    sock = _open(target.name)
    with sock:
        sock.settimeout(5.0)
        return _handshake(sock, target.name, _hello(target, "ping", forwards=forwards,
                                                    retry_ports=retry_ports))


def agent_forwards(target: "GuestTarget", timeout: float = 2.0) -> dict:
    """The agent's answer to a read-only `forwards` question: {"forwards": [ForwardState
    JSON...], "stale": reason or None, "connected", "pid"}. Never makes the agent step down
    (`status` asks it). Raises AgentUnavailable when no agent answers."""
    sock = _open(target.name)
    with sock:
        sock.settimeout(timeout)
        try:
            return _handshake(sock, target.name, _hello(target, "forwards", probe=True))
        except OSError as exc:  # a timeout: an agent that does not answer is no agent
            raise AgentUnavailable(f"the agent did not answer ({exc})") from None


def run_sync(target: "GuestTarget", request: dict, on_ready=None) -> dict:
    """Have the agent sync (request: {"spec", "dry_run"}); returns sync.outcome() as JSON.

    Raises AgentUnavailable before the agent accepted (safe to fall back), GuestUnreachable
    when the agent cannot reach the guest, MarinerError when the sync failed.
    """
    sock = _open(target.name)
    with sock:
        sock.settimeout(10.0)
        try:
            _handshake(sock, target.name, _hello(target, "sync", request))
        except TimeoutError:
            raise AgentUnavailable("the agent did not answer within 10 s") from None
        if on_ready is not None:
            on_ready()
        # A first sync of many megabytes takes what it takes; the agent says ALIVE meanwhile.
        sock.settimeout(proto.SILENCE_LIMIT)
        try:
            kind, payload = read_frame(sock)
            while kind == proto.ALIVE:
                kind, payload = read_frame(sock)
            info = _answer(payload)
        except TimeoutError:
            raise _unreachable(f"the mariner agent for VM {target.name} stopped answering "
                               f"mid-sync (nothing for {proto.SILENCE_LIMIT:g} s); see "
                               f"{log_path(target.name)}, and `mariner up` to start a new "
                               f"agent") from None
        except (EOFError, OSError):
            raise _unreachable(f"the mariner agent for VM {target.name} went away mid-sync; "
                               f"see {log_path(target.name)}") from None
        except ValueError as exc:
            raise _garbled(target.name, exc) from None
    if kind == proto.RESULT:
        return info
    if kind == proto.ERROR and info.get("kind") != "unreachable":
        from ..errors import MarinerError

        raise MarinerError(info.get("message") or "the sync failed", hint=info.get("hint"),
                           exit_code=info.get("exit_code"))
    raise _unreachable(info.get("message") or f"unexpected reply from the agent ({kind!r})")


def forward_warnings(table: list[dict]) -> list[str]:
    """One line per forward the agent could not listen for, saying what to do."""
    lines = []
    for entry in table:
        if entry.get("state") != "failed":
            continue
        port = str(entry.get("host", "")).rpartition(":")[2]
        lines.append(f"warning: {entry.get('error')}; the agent holds the other forwards and "
                     f"tries this one again every {proto.PORT_RETRY:g} s for "
                     f"{proto.PORT_RETRY_WINDOW:g} s, then no more: free the port "
                     f"(`ss -ltnp 'sport = :{port}'` shows what holds it) or change "
                     f"[ports] forward, and run `mariner up`")
    return lines


def _warn_stderr(line: str) -> None:
    sys.stderr.write(f"mariner: {_printable(line)}\n")
    sys.stderr.flush()


def configured_forwards(name: str) -> list[tuple[int, int]] | None:
    """The `[ports] forward` list of VM `name`'s project (registry -> mariner.toml), only the
    approved entries (approval.approved_forwards: the VM writes mariner.toml), or None when it
    cannot be read (then an agent's list is neither checked nor replaced)."""
    from ..errors import MarinerError

    try:
        from ..config import load_project
        from ..state import Registry

        record = Registry().get(name)
        if record is None:
            return None
        from pathlib import Path

        cfg = load_project(project_dir=Path(record.project))
    except (MarinerError, OSError, ValueError):
        return None
    if cfg.name != name:
        return None
    from ..approval import approved_forwards

    return approved_forwards(cfg)


def run_exec(target: "GuestTarget", request: "ExecRequest", fds=(0, 1, 2), on_ready=None) -> int:
    """Run one command through the agent; returns its exit status.

    Raises AgentUnavailable before anything ran (safe to fall back), GuestUnreachable when the
    agent itself cannot reach the guest.
    """
    from .terminal import raw_mode, window_size

    sock = _open(target.name)
    with sock:
        sent = [fd for fd in fds if fd is not None]
        ready = False
        pending: list[bytes] = []

        def send(frame: bytes) -> None:
            # Signals that arrive before the agent said READY are sent right after it.
            if not ready:
                pending.append(frame)
                return
            try:
                sock.sendall(frame)
            except OSError:
                pass

        def forward(signum, _frame):
            send(proto.frame(proto.SIGNAL, _SIGNAL_NAMES[signum].encode()))

        def resize(_signum, _frame):
            cols, rows = window_size(fds[1])
            send(proto.frame(proto.RESIZE, proto.dumps({"cols": cols, "rows": rows})))

        wanted = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
        saved = {s: signal.signal(s, forward) for s in wanted}
        if request.tty:
            saved[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
        # The agent answers once the command started (it may first wait for a reconnect).
        sock.settimeout(EXEC_HANDSHAKE_TIMEOUT)
        try:
            _handshake(sock, target.name, _hello(target, "exec", request.to_json()), sent)
        except AgentUnavailable as exc:
            for s, handler in saved.items():
                signal.signal(s, handler)
            if exc.hung:
                # It has our stdio and may have started the command: never run it twice.
                raise _unreachable(f"the mariner agent for VM {target.name} did not answer "
                                   f"within {EXEC_HANDSHAKE_TIMEOUT:g} s; see "
                                   f"{log_path(target.name)}, and `mariner up` to start a new "
                                   f"agent") from None
            raise
        except BaseException:
            for s, handler in saved.items():
                signal.signal(s, handler)
            raise
        sock.settimeout(None)
        if on_ready is not None:
            on_ready()
        ready = True
        for frame in pending:
            send(frame)
        try:
            with raw_mode(fds[0] if fds[0] is not None else 0,
                          enabled=request.tty and request.stdin and fds[0] is not None):
                while True:
                    try:
                        kind, payload = read_frame(sock)
                        info = _answer(payload)
                        if kind == proto.EXIT:
                            status = info["status"]
                            if type(status) is not int or not 0 <= status <= 255:
                                raise ValueError(f"exit status {status!r}")
                    except (EOFError, OSError):
                        raise _unreachable(
                            f"the mariner agent for VM {target.name} went away mid-command; "
                            f"see {log_path(target.name)}") from None
                    except (ValueError, KeyError) as exc:
                        raise _garbled(target.name, exc) from None
                    if kind == proto.EXIT:
                        if info.get("message"):
                            sys.stderr.write(f"mariner: {_printable(info['message'])}\n")
                        return status
                    if kind == proto.ERROR:
                        raise _unreachable(str(info.get("message") or "agent error"))
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)


def stop_agent(name: str, timeout: float = 5.0) -> None:
    """Stop the agent of VM `name` (if any) and remove its socket. Only the process that
    holds the agent's lock and started when its lock file says is signalled."""
    proc = agent_process(name)
    if proc is not None:
        _signal_agent(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while agent_process(name) == proc and time.monotonic() < deadline:
            time.sleep(0.02)
        if agent_process(name) == proc:
            _signal_agent(proc, signal.SIGKILL)
            while agent_process(name) == proc and time.monotonic() < deadline + 2:
                time.sleep(0.02)
    # A socket without a live agent behind it is stale.
    if not agent_running(name):
        try:
            socket_path(name).unlink()
        except FileNotFoundError:
            pass


def _signal_agent(proc: tuple[int, int | None], signum: int) -> None:
    from ..procid import signal_process, start_time

    pid, started = proc
    if started is None:   # an older agent's lock (pid only), held right now: it is that pid
        started = start_time(pid)
    signal_process(pid, started, signum)


def spawn_agent(target: "GuestTarget", forwards: list | None = None,
                port_retry: tuple[float, float] | None = None) -> None:
    """Start a detached agent process for `target` holding `forwards` ([(HOST, GUEST)...]);
    it exits by itself if one is running. `port_retry` (seconds between tries, for how long)
    overrides proto.PORT_RETRY and PORT_RETRY_WINDOW."""
    import json
    import subprocess
    from pathlib import Path

    paths.ensure_runtime_dir()
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
    env.pop("MARINER_DEBUG_PATH_FILE", None)
    log = os.open(log_path(target.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "mariner_dev.remote.agent",
             json.dumps({"target": target.to_json(),
                         "forwards": [list(pair) for pair in forwards or []],
                         "port_retry": list(port_retry) if port_retry else None})],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env,
            start_new_session=True, close_fds=True)
    finally:
        os.close(log)


def ensure_agent(target: "GuestTarget", timeout: float = START_TIMEOUT, *,
                 forwards: list | None = None, warn=_warn_stderr,
                 retry_ports: bool = False) -> dict:
    """A live agent of the current build for `target`: reuse, replace a stale one, or start one.

    `forwards` ([(HOST, GUEST)...], default: the project's `[ports] forward`) is what the
    agent must hold: one holding another list is replaced. `warn` gets one line per forward
    whose host port could not be taken (default: stderr, which is how `up` shows them).
    """
    if forwards is None:
        forwards = configured_forwards(target.name)
    deadline = time.monotonic() + timeout
    spawns, spawned_at, last = 0, 0.0, "did not start"
    while True:
        try:
            info = ping(target, forwards, retry_ports=retry_ports)
            for line in forward_warnings(info.get("forwards") or []):
                warn(line)
            return info
        except AgentUnavailable as exc:
            last = exc.reason
            starting = time.monotonic() - spawned_at < 3.0
            if exc.stale or (not agent_running(target.name) and not starting and spawns < 3):
                # Another build or target, or nothing alive behind the socket: replace it.
                stop_agent(target.name)
                spawn_agent(target, forwards)
                spawns += 1
                spawned_at = time.monotonic()
            # Otherwise an agent is alive but not listening yet: give it time.
        if time.monotonic() > deadline:
            raise AgentUnavailable(
                f"the agent for VM {target.name} {last}; see {log_path(target.name)}")
        time.sleep(0.02)
