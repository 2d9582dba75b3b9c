"""The per-VM background agent: one authenticated SSH connection, served over a Unix socket.

Run as `python -m mariner_dev.remote.agent SPEC_JSON` (remote.client.spawn_agent does), where
the spec is `{"target": <GuestTarget JSON>, "forwards": [[HOST, GUEST], ...]}` (a bare target
JSON means no forwards). The agent holds an exclusive flock on `<socket>.lock` for its whole
life, so liveness is checked without talking to it; it binds its socket (0600, in the 0700
runtime dir) before the slow asyncssh import, so clients can reach it at once. It listens on
the `[ports] forward` host ports from the start (a port in use is recorded, reported to `up`
and `status`, and tried again every few seconds) until it stops. It serves exec, shell and
sync, answers a client of another build, target or forward list with "stale" and exits,
reconnects when the guest restarts, and exits when the VM is no longer in mariner's registry or
has been unreachable for a long time.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time

from .. import paths
from . import proto
from .client import lock_path, log_path, socket_path
from .target import GuestTarget

GIVE_UP_AFTER = 600.0        # seconds unreachable with nothing to serve
WATCH_INTERVAL = 2.0
KEEPALIVE = 5.0
CONNECT_WAIT = 15.0          # at most this long for one connection attempt an exec waits on


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} agent[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


class Agent:
    def __init__(self, target: GuestTarget, listener: socket.socket,
                 forwards: list[tuple[int, int]] = (),
                 port_retry: tuple[float, float] = (proto.PORT_RETRY, proto.PORT_RETRY_WINDOW)):
        self.target = target
        self.listener = listener
        self.build = proto.build_hash()
        self.fingerprint = target.fingerprint()
        self.forward_list = [(int(h), int(g)) for h, g in forwards]
        self.forwards_fingerprint = proto.forwards_fingerprint(self.forward_list)
        self.forwarder = None
        self.port_retry, self.port_window = (float(x) for x in port_retry)
        self.retry_until = 0.0
        self.retry_task: asyncio.Task | None = None
        self.syncer = None
        self.conn = None
        self.connected = asyncio.Event()
        self.kick = asyncio.Event()
        self.started = 0             # connection attempts started so far
        self.failed = 0              # the number of the last attempt that failed
        self.attempted = asyncio.Condition()
        self.stopping = asyncio.Event()
        self.last_error = "not connected yet"
        self.unreachable_since: float | None = None
        self.active = 0

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self.stopping.set)
        self.listener.setblocking(False)
        # The forwards listen before the first client is served: `up` learns at once which
        # host ports could not be taken.
        await self._hold_forwards()
        tasks = [asyncio.create_task(self._accept_loop()),
                 asyncio.create_task(self._keep_connected()),
                 asyncio.create_task(self._watch())]
        self._renew_port_retry()
        await self.stopping.wait()
        if self.retry_task is not None:
            tasks.append(self.retry_task)
        for task in tasks:
            task.cancel()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.conn is not None:
            self.conn.close()
        log("stopping")

    # -- forwards -------------------------------------------------------------------------
    async def _hold_forwards(self) -> None:
        if not self.forward_list:
            return
        from ..forward import hold_forwards
        from ..model import PortForward

        forwards = [PortForward(host=h, guest=g) for h, g in self.forward_list]
        self.forwarder = await hold_forwards(self._conn_for_forward, forwards, log,
                                             keep_going=True)
        held = [str(s.forward) for s in self.forwarder.states if s.listening]
        if held:
            log(f"forwarding {', '.join(held)}")

    def _renew_port_retry(self) -> None:
        """Try the ports that could not be taken every port_retry seconds, for port_window
        seconds from now (the agent's start, or an `up`); then give up on them."""
        if self.forwarder is None or not self.forwarder.failed():
            return
        self.forwarder.resume()
        self.retry_until = time.monotonic() + self.port_window
        if self.retry_task is None or self.retry_task.done():
            self.retry_task = asyncio.create_task(self._retry_ports())

    async def _retry_ports(self) -> None:
        while self.forwarder.failed():
            remaining = self.retry_until - time.monotonic()
            if remaining <= 0:
                # Never later, behind the user's back: a host client that finds the port
                # free by then must not be talking to the VM without anyone asking for it.
                self.forwarder.give_up(
                    f"not forwarded: the agent stopped trying {self.port_window:g} s after "
                    f"it started or `mariner up` ran; free the port and run `mariner up`")
                log("gave up on the forwards whose host port is taken: "
                    + ", ".join(str(s.forward) for s in self.forwarder.failed()))
                return
            await asyncio.sleep(min(self.port_retry, remaining))
            if time.monotonic() < self.retry_until:
                await self.forwarder.retry_failed()

    async def _conn_for_forward(self):
        """The held connection; a forward's client waits for a reconnect (the forwarder
        bounds the wait) rather than fail while the VM restarts."""
        while self.conn is None or not self.connected.is_set():
            self.kick.set()
            await self.connected.wait()
        return self.conn

    def forwards_table(self) -> list[dict]:
        return self.forwarder.table() if self.forwarder is not None else []

    # -- the connection -------------------------------------------------------------------
    async def _keep_connected(self) -> None:
        from ..errors import GuestUnreachable
        from . import session
        from .trust import HostKeyMismatch, NotPinned

        delay = 0.2
        while not self.stopping.is_set():
            # A kick that arrives while this attempt runs asks for another one right after.
            self.kick.clear()
            self.started += 1
            seq = self.started
            try:
                conn = await session.connect(self.target, keepalive=KEEPALIVE)
            except GuestUnreachable as exc:
                self.last_error = exc.message
                if self.unreachable_since is None:
                    self.unreachable_since = time.monotonic()
                async with self.attempted:
                    self.failed = seq
                    self.attempted.notify_all()
                # A wrong host key will not fix itself: retry only when asked.
                wait = 30.0 if isinstance(exc, (HostKeyMismatch, NotPinned)) else delay
                delay = min(delay * 2, 5.0)
                try:
                    await asyncio.wait_for(self.kick.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            delay = 0.2
            self.unreachable_since = None
            self.conn = conn
            self.connected.set()
            async with self.attempted:
                self.attempted.notify_all()
            log(f"connected to {self.target.describe()}")
            await conn.wait_closed()
            self.connected.clear()
            self.conn = None
            self.last_error = f"lost the connection to VM {self.target.name}"
            log("connection closed; reconnecting")

    async def get_conn(self):
        """The held connection; else the outcome of a fresh attempt (an exec fails fast with
        the reason when the VM is down, as ssh would, rather than wait for it to boot)."""
        from ..errors import GuestUnreachable

        if self.conn is not None and self.connected.is_set():
            return self.conn
        # Only an attempt that starts after this request counts: one already under way may
        # have begun while the VM was still restarting.
        wanted = self.started + 1
        self.kick.set()

        async def settled():
            async with self.attempted:
                await self.attempted.wait_for(
                    lambda: self.connected.is_set() or self.failed >= wanted)

        try:
            await asyncio.wait_for(settled(), CONNECT_WAIT)
        except asyncio.TimeoutError:
            raise GuestUnreachable(self.last_error) from None
        if self.conn is None or not self.connected.is_set():
            raise GuestUnreachable(self.last_error)
        return self.conn

    async def _watch(self) -> None:
        """Exit when the VM is gone from the registry, or unreachable for too long."""
        from ..state import Registry

        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                gone = Registry().get(self.target.name) is None
            except Exception:  # a registry being rewritten is not a reason to exit
                gone = False
            if gone:
                log(f"VM {self.target.name} is no longer registered; exiting")
                self.stopping.set()
                return
            since = self.unreachable_since
            if since is not None and not self.active and time.monotonic() - since > GIVE_UP_AFTER:
                log(f"VM {self.target.name} unreachable for {GIVE_UP_AFTER:g}s; exiting")
                self.stopping.set()
                return

    # -- clients --------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            csock, _ = await loop.sock_accept(self.listener)
            asyncio.create_task(self._client(csock))

    async def _recv_hello(self, csock: socket.socket, fds: list[int]) -> dict:
        """The client's HELLO; the fds it passed are appended to `fds` as they arrive (the
        caller closes them whatever happens)."""
        loop = asyncio.get_running_loop()
        buf = b""
        fd_space = socket.CMSG_SPACE(3 * array.array("i").itemsize)
        while True:
            waiter = loop.create_future()
            loop.add_reader(csock.fileno(), lambda: waiter.done() or waiter.set_result(None))
            try:
                await asyncio.wait_for(waiter, 10.0)
            finally:
                loop.remove_reader(csock.fileno())
            data, ancdata, _flags, _addr = csock.recvmsg(1 << 16, fd_space)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[:len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            if not data:
                raise EOFError
            buf += data
            if len(buf) >= proto.HEADER_SIZE:
                kind, length = proto.parse_header(buf[:proto.HEADER_SIZE])
                if kind != proto.HELLO:
                    raise ValueError("expected HELLO")
                if len(buf) >= proto.HEADER_SIZE + length:
                    body = buf[proto.HEADER_SIZE:proto.HEADER_SIZE + length]
                    hello = json.loads(body)
                    if not isinstance(hello, dict):
                        raise ValueError("a HELLO is a JSON object")
                    return hello

    async def _send(self, csock: socket.socket, kind: bytes, body: dict,
                    client_proto: int = proto.PROTO) -> None:
        await asyncio.get_running_loop().sock_sendall(
            csock, proto.frame(kind, proto.reply_payload(body, client_proto)))

    async def _client(self, csock: socket.socket) -> None:
        from .client import peer_uid

        fds: list[int] = []
        csock.setblocking(False)
        uid = peer_uid(csock)
        if uid != os.getuid():
            log(f"refused a client of uid {uid} (this agent serves uid {os.getuid()} only)")
            csock.close()
            return
        try:
            try:
                hello = await self._recv_hello(csock, fds)
            except (EOFError, ValueError, OSError, asyncio.TimeoutError):
                return
            op = hello.get("op")
            stale = self._stale(hello)
            if stale and hello.get("probe") and hello.get("proto") == proto.PROTO:
                # A read-only question (`status`) never makes the agent step down.
                await self._send(csock, proto.READY, self._ready(stale=stale))
                return
            if stale:
                # In the client's own protocol: one of PROTO 1 reads JSON only.
                await self._send(csock, proto.ERROR, {"kind": "stale", "message": stale},
                                 client_proto=hello.get("proto"))
                log(f"a client asked for another agent ({stale}); stepping down")
                self.stopping.set()
                return
            if op in ("ping", "forwards"):
                if op == "ping" and hello.get("retry_ports") and self.forwarder is not None:
                    # `up`: the ports that were taken get another chance, now and for a while.
                    self.forwarder.resume()
                    await self.forwarder.retry_failed()
                    self._renew_port_retry()
                await self._send(csock, proto.READY, self._ready())
            elif op == "exec":
                await self._exec(csock, hello.get("request") or {}, fds)
            elif op == "sync":
                await self._sync(csock, hello.get("request") or {})
            else:
                await self._send(csock, proto.ERROR, {"kind": "bad",
                                                      "message": f"unknown op {op!r}"})
        except OSError as exc:
            log(f"client error: {exc}")
        finally:
            _close_all(fds)
            csock.close()

    def _stale(self, hello: dict) -> str | None:
        """Why this agent is not the one the client wants, or None."""
        if hello.get("proto") != proto.PROTO or hello.get("build") != self.build:
            return "the running agent is from another build of mariner"
        if hello.get("target") != self.fingerprint:
            return "the running agent is for another address or login of the VM"
        if "forwards" in hello and hello["forwards"] != self.forwards_fingerprint:
            return "the running agent holds another [ports] forward list"
        return None

    def _ready(self, stale: str | None = None) -> dict:
        return {"pid": os.getpid(), "build": self.build, "connected": self.connected.is_set(),
                "forwards": self.forwards_table(), "stale": stale}

    async def _sync(self, csock: socket.socket, request: dict) -> None:
        """`mariner sync` on the held connection; the client hanging up (Ctrl-C) cancels it."""
        from ..errors import GuestUnreachable, MarinerError
        from .sync_service import SyncService

        if self.syncer is None:
            self.syncer = SyncService(self.get_conn, self._drop_conn, self.target.name)
        loop = asyncio.get_running_loop()
        self.active += 1
        try:
            await self._send(csock, proto.READY, {"pid": os.getpid(), "build": self.build})
            work = asyncio.create_task(self.syncer.run(request))
            hangup = asyncio.create_task(loop.sock_recv(csock, 1))
            alive = asyncio.create_task(self._keep_client_waiting(csock))
            try:
                await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Stopped before any other frame goes out: frames never interleave.
                alive.cancel()
                await asyncio.gather(alive, return_exceptions=True)
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                log("a sync was cancelled: its client hung up")
                return
            hangup.cancel()
            await asyncio.gather(hangup, return_exceptions=True)
            try:
                result = work.result()
            except MarinerError as exc:
                kind = "unreachable" if isinstance(exc, GuestUnreachable) else "failed"
                await self._send(csock, proto.ERROR, {"kind": kind, "message": exc.message,
                                                      "hint": exc.hint,
                                                      "exit_code": exc.exit_code})
                return
            except Exception as exc:  # noqa: BLE001 - a bug: reported, logged, not fatal
                import traceback

                log("sync failed:\n" + traceback.format_exc())
                await self._send(csock, proto.ERROR, {
                    "kind": "failed", "message": f"the sync failed in the mariner agent "
                    f"({exc.__class__.__name__}: {exc}); see {log_path(self.target.name)}"})
                return
            await self._send(csock, proto.RESULT, result)
        finally:
            self.active -= 1

    async def _keep_client_waiting(self, csock: socket.socket) -> None:
        """ALIVE every ALIVE_INTERVAL seconds: the client tells a long sync from a frozen
        agent."""
        while True:
            await asyncio.sleep(proto.ALIVE_INTERVAL)
            await asyncio.get_running_loop().sock_sendall(csock, proto.frame(proto.ALIVE))

    def _drop_conn(self, conn) -> None:
        """`conn` turned out dead: forget it so that get_conn() waits for a new one."""
        if self.conn is conn:
            conn.close()
            self.connected.clear()
            self.conn = None

    async def _start(self, request, stdio):
        """Open the session, reconnecting once if the held connection turns out dead."""
        import asyncssh

        from .session import RemoteProcess, connect

        for attempt in (1, 2):
            conn = await self.get_conn()
            proc = RemoteProcess(conn, request, stdio, self.target.name)
            try:
                await proc.start()
                return proc, None
            except asyncssh.ChannelOpenError:
                if not conn.is_closed():
                    # The guest refused another session on this connection (MaxSessions):
                    # this command gets a connection of its own.
                    extra = await connect(self.target)
                    proc = RemoteProcess(extra, request, stdio, self.target.name)
                    await proc.start()
                    return proc, extra
            except (asyncssh.Error, OSError, ConnectionError):
                if attempt == 2:
                    raise
            # The held connection died under us (VM restarted): wait for the new one.
            self._drop_conn(conn)
            await asyncio.sleep(0.05)
        raise RuntimeError("unreachable")

    async def _exec(self, csock: socket.socket, body: dict, fds: list[int]) -> None:
        from ..errors import GuestUnreachable
        from .command import ExecRequest

        request = ExecRequest.from_json(body)
        if len(fds) == 3:
            stdio = (fds[0], fds[1], fds[2])
        elif len(fds) == 2:
            stdio = (None, fds[0], fds[1])
        else:
            await self._send(csock, proto.ERROR, {"kind": "bad", "message": "no stdio passed"})
            return
        self.active += 1
        extra = None
        try:
            try:
                proc, extra = await self._start(request, stdio)
            except GuestUnreachable as exc:
                await self._send(csock, proto.ERROR, {"kind": "unreachable",
                                                      "message": exc.message})
                return
            except Exception as exc:  # noqa: BLE001 - reported to the client, not lost
                await self._send(csock, proto.ERROR, {
                    "kind": "unreachable",
                    "message": f"cannot start the command on VM {self.target.name}: {exc}"})
                return
            try:
                await self._send(csock, proto.READY, {"pid": os.getpid(), "build": self.build})
                control = asyncio.create_task(self._control(csock, proc))
                try:
                    outcome = await proc.wait()
                finally:
                    control.cancel()
            finally:
                # Whatever happened (the client went away, the agent is stopping), no thread
                # may still use the client's fds when they are closed below: their numbers
                # are reused at once by other clients' sockets and stdio.
                if not proc.done.done():
                    proc.abandon()
                if asyncio.current_task().cancelling():
                    # The agent is stopping: no waiting for a writer whose reader may never
                    # read again; the release closes the fds once its threads have ended.
                    proc.close_when_released(list(fds))
                    fds.clear()
                else:
                    await proc.release()
            # Our copies of the client's stdio must close before it learns the status, so
            # that a pipe reader behind its stdout sees EOF when the client exits.
            _close_all(fds)
            try:
                await self._send(csock, proto.EXIT, {"status": outcome.status,
                                                     "message": outcome.message})
            except OSError:
                pass
        finally:
            self.active -= 1
            _close_all(fds)
            if extra is not None:
                extra.close()

    async def _control(self, csock: socket.socket, proc) -> None:
        """Signals and window sizes from the client; its hang-up hangs up the command."""
        loop = asyncio.get_running_loop()
        buf = b""
        while True:
            try:
                data = await loop.sock_recv(csock, 4096)
            except OSError:
                data = b""
            if not data:
                proc.abandon()
                return
            buf += data
            try:
                while len(buf) >= proto.HEADER_SIZE:
                    kind, length = proto.parse_header(buf[:proto.HEADER_SIZE])
                    if len(buf) < proto.HEADER_SIZE + length:
                        break
                    payload = buf[proto.HEADER_SIZE:proto.HEADER_SIZE + length]
                    buf = buf[proto.HEADER_SIZE + length:]
                    if kind == proto.SIGNAL:
                        proc.signal(payload.decode("ascii", "replace"))
                    elif kind == proto.RESIZE:
                        size = json.loads(payload)
                        proc.resize(int(size["cols"]), int(size["rows"]))
            except (ValueError, KeyError, TypeError) as exc:
                # Not our protocol: treated as the client going away.
                log(f"a client broke the protocol ({exc}); hanging up its command")
                proc.abandon()
                return


def _close_all(fds: list[int]) -> None:
    """Close the client's fds we hold and forget them (each exactly once: a second close
    would hit whatever reused the number)."""
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


def _take_lock(name: str) -> int | None:
    fd = os.open(lock_path(name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    from ..procid import current

    pid, started = current()
    os.ftruncate(fd, 0)
    os.write(fd, (f"{pid} {started}\n" if started is not None else f"{pid}\n").encode())
    return fd


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    port_retry = (proto.PORT_RETRY, proto.PORT_RETRY_WINDOW)
    if "target" in spec:
        target, forwards = GuestTarget.from_json(spec["target"]), spec.get("forwards") or []
        port_retry = tuple(spec.get("port_retry") or port_retry)
    else:  # a bare target: no forwards
        target, forwards = GuestTarget.from_json(spec), []
    from ..errors import MarinerError

    try:
        paths.ensure_runtime_dir()
    except MarinerError as exc:
        log(str(exc))
        return 1
    lock_fd = _take_lock(target.name)
    if lock_fd is None:
        log(f"another agent for VM {target.name} is running; exiting")
        return 0
    path = socket_path(target.name)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(64)
    inode = os.stat(path).st_ino
    log(f"serving VM {target.name} ({target.describe()}) on {path}")
    try:
        asyncio.run(Agent(target, listener, forwards, port_retry).serve())
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == inode:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
