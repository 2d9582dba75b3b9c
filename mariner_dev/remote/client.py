"""The client side of the per-VM agent: find it, check it, hand it our stdio, relay signals.

Imports only the standard library and mariner's light modules (no asyncssh), so that `exec`
served by the agent starts in a few tens of milliseconds.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .. import paths
from . import proto

TYPE_CHECKING = False
if TYPE_CHECKING:  # the fast path imports neither
    from .command import ExecRequest
    from .target import GuestTarget


def _unreachable(message: str) -> Exception:
    from ..errors import GuestUnreachable

    return GuestUnreachable(message)

START_TIMEOUT = 15.0


class AgentUnavailable(Exception):
    """No usable agent (absent, dead, stale): the caller may start one or go direct."""

    def __init__(self, reason: str, stale: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.stale = stale


def socket_path(name: str) -> Path:
    return proto.socket_name(name, paths.runtime_dir())


def lock_path(name: str) -> Path:
    return socket_path(name).with_suffix(".lock")


def log_path(name: str) -> Path:
    return socket_path(name).with_suffix(".log")


def agent_pid(name: str) -> int | None:
    """The pid of the live agent of VM `name` (it holds a flock on its lock file), else None."""
    from ..fsutil import lock_is_held

    lock = lock_path(name)
    if not lock_is_held(lock):
        return None
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def agent_running(name: str) -> bool:
    """True when an agent process for VM `name` is alive."""
    return agent_pid(name) is not None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, length = proto.parse_header(_recv_exact(sock, proto.HEADER_SIZE))
    return kind, _recv_exact(sock, length) if length else b""


def _hello(target: "GuestTarget", op: str, request: dict | None = None) -> bytes:
    body = {"proto": proto.PROTO, "build": proto.build_hash(), "target": target.fingerprint(),
            "op": op, "request": request}
    return proto.frame(proto.HELLO, json.dumps(body).encode())


def _open(name: str) -> socket.socket:
    path = socket_path(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise AgentUnavailable(f"no agent listening on {path} ({exc.__class__.__name__})")
    except OSError as exc:
        sock.close()
        raise AgentUnavailable(f"cannot connect to the agent socket {path}: {exc}")
    return sock


def _handshake(sock: socket.socket, hello: bytes, fds: list[int] | None = None) -> dict:
    try:
        if fds:
            sock.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", fds))])
        else:
            sock.sendall(hello)
        kind, payload = read_frame(sock)
    except (EOFError, OSError) as exc:
        raise AgentUnavailable(f"the agent hung up during the handshake ({exc!r})")
    info = json.loads(payload or b"{}")
    if kind == proto.READY:
        return info
    if kind == proto.ERROR and info.get("kind") == "stale":
        raise AgentUnavailable(info.get("message", "stale agent"), stale=True)
    if kind == proto.ERROR:
        raise _unreachable(info.get("message") or "the mariner agent could not run the command")
    raise AgentUnavailable(f"unexpected reply from the agent ({kind!r})")


def ping(target: "GuestTarget") -> dict:
    """Handshake only: raises AgentUnavailable (stale=True for another build/target)."""
    sock = _open(target.name)
    with sock:
        sock.settimeout(5.0)
        return _handshake(sock, _hello(target, "ping"))


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
            send(proto.frame(proto.SIGNAL, signal.Signals(signum).name[3:].encode()))

        def resize(_signum, _frame):
            cols, rows = window_size(fds[1])
            send(proto.frame(proto.RESIZE, json.dumps({"cols": cols, "rows": rows}).encode()))

        wanted = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
        saved = {s: signal.signal(s, forward) for s in wanted}
        if request.tty:
            saved[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, resize)
        try:
            _handshake(sock, _hello(target, "exec", request.to_json()), sent)
        except BaseException:
            for s, handler in saved.items():
                signal.signal(s, handler)
            raise
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
                    except (EOFError, ConnectionResetError):
                        raise _unreachable(
                            f"the mariner agent for VM {target.name} went away mid-command; "
                            f"see {log_path(target.name)}") from None
                    if kind == proto.EXIT:
                        result = json.loads(payload)
                        if result.get("message"):
                            sys.stderr.write(f"mariner: {result['message']}\n")
                        return int(result["status"])
                    if kind == proto.ERROR:
                        info = json.loads(payload or b"{}")
                        raise _unreachable(info.get("message") or "agent error")
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)


def stop_agent(name: str, timeout: float = 5.0) -> None:
    """Stop the agent of VM `name` (if any) and remove its socket."""
    pid = agent_pid(name)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while agent_running(name) and time.monotonic() < deadline:
            time.sleep(0.02)
        if agent_running(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while agent_running(name) and time.monotonic() < deadline + 2:
                time.sleep(0.02)
    # A socket without a live agent behind it is stale.
    if not agent_running(name):
        try:
            socket_path(name).unlink()
        except FileNotFoundError:
            pass


def spawn_agent(target: "GuestTarget") -> None:
    """Start a detached agent process for `target` (it exits by itself if one is running)."""
    import subprocess

    paths.ensure_private_dir(paths.runtime_dir())
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
    env.pop("MARINER_DEBUG_PATH_FILE", None)
    log = os.open(log_path(target.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "mariner_dev.remote.agent", json.dumps(target.to_json())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env,
            start_new_session=True, close_fds=True)
    finally:
        os.close(log)


def ensure_agent(target: "GuestTarget", timeout: float = START_TIMEOUT) -> dict:
    """A live agent of the current build for `target`: reuse, replace a stale one, or start one."""
    deadline = time.monotonic() + timeout
    spawns, spawned_at, last = 0, 0.0, "did not start"
    while True:
        try:
            return ping(target)
        except AgentUnavailable as exc:
            last = exc.reason
            starting = time.monotonic() - spawned_at < 3.0
            if exc.stale or (not agent_running(target.name) and not starting and spawns < 3):
                # Another build or target, or nothing alive behind the socket: replace it.
                stop_agent(target.name)
                spawn_agent(target)
                spawns += 1
                spawned_at = time.monotonic()
            # Otherwise an agent is alive but not listening yet: give it time.
        if time.monotonic() > deadline:
            raise AgentUnavailable(
                f"the agent for VM {target.name} {last}; see {log_path(target.name)}")
        time.sleep(0.02)
