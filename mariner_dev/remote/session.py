"""asyncssh connections to the guest and remote processes wired to local file descriptors.

Used both in-process (the direct path, hooks, wait_for_ssh) and by the per-VM agent, which is
handed the client's own stdin/stdout/stderr. File descriptors are read and written by
threads with blocking I/O, never switched to O_NONBLOCK: they may be a terminal shared with
the user's shell. Output is flow-controlled (the channel is paused while a writer is behind),
so memory stays flat however much the command prints.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import signal as _signal
import socket
import threading
import time
from dataclasses import dataclass

import asyncssh

from ..errors import GuestUnreachable
from .command import ExecRequest
from .target import VSOCK_SSH_PORT, GuestTarget, transport_preference
from .trust import HostKeyMismatch, NotPinned, pin_host_key, pinned_keys

WINDOW = 8 * 1024 * 1024
MAX_PACKET = 256 * 1024
HIGH_WATER = 4 * 1024 * 1024     # pause the channel when a writer has this much queued
LOW_WATER = 1 * 1024 * 1024
READ_CHUNK = 256 * 1024
# AES-GCM first: with AES-NI it is several times faster than chacha20 in asyncssh.
CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
           "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"]
KEEPALIVE = 15.0   # seconds between keepalives on a connection held for a command or a sync
STATUS_LOST = 125
STATUS_SIGPIPE = 128 + _signal.SIGPIPE


def _identity_options(target: GuestTarget) -> dict:
    """client_keys from the identity file; an encrypted one is used through ssh-agent."""
    identity = str(target.identity)
    try:
        key = asyncssh.read_private_key(identity)
    except FileNotFoundError:
        raise GuestUnreachable(f"the SSH identity {identity} does not exist "
                               f"(set [ssh] identity, or let mariner generate its own)") from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        if "passphrase" not in str(exc).lower():
            raise GuestUnreachable(f"cannot read the SSH identity {identity}: {exc}") from None
        pub = identity + ".pub"
        if not os.environ.get("SSH_AUTH_SOCK"):
            raise GuestUnreachable(
                f"the SSH identity {identity} is encrypted and no ssh-agent is running; "
                f"start one and `ssh-add {identity}`") from None
        return {"client_keys": [identity], "ignore_encrypted": True,
                "agent_identities": [pub] if os.path.exists(pub) else None}
    return {"client_keys": [key], "agent_path": None}


async def _connect_socket(family: int, address, timeout: float) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _vsock_available(target: GuestTarget) -> bool:
    return target.vsock_cid is not None and hasattr(socket, "AF_VSOCK") \
        and os.path.exists("/dev/vsock")


async def _first_contact_vsock(target: GuestTarget, timeout: float) -> socket.socket | None:
    """A vsock connection to the guest's sshd for taking the first host-key pin, or None when
    vsock is unavailable here or the guest's sshd does not answer on it (then TCP pins).

    The host kernel routes AF_VSOCK by cid to the one VM holding it: nothing else on the bridge
    can answer for the guest, as it could for 10.0.0.<cid>."""
    if transport_preference() == "tcp" or not _vsock_available(target):
        return None
    try:
        return await _connect_socket(socket.AF_VSOCK, (target.vsock_cid, VSOCK_SSH_PORT),
                                     min(timeout, 2.0))
    except (OSError, asyncio.TimeoutError):
        return None


async def _open_socket(target: GuestTarget, timeout: float,
                       first_contact: bool = False) -> tuple[socket.socket, str]:
    """The transport: TCP (bridge address or user-mode loopback port) when it answers, else
    AF_VSOCK to the guest's cid; MARINER_TRANSPORT=tcp|vsock forces one. For `first_contact`
    (no pin yet), vsock first wherever the guest answers there."""
    if first_contact:
        sock = await _first_contact_vsock(target, timeout)
        if sock is not None:
            return sock, f"vsock cid {target.vsock_cid}"
    pref = transport_preference()
    errors = []
    if pref != "vsock" and target.host is not None:
        where = f"{target.host}:{target.port}"
        try:
            return await _connect_socket(socket.AF_INET, (target.host, target.port),
                                         timeout), where
        except (OSError, asyncio.TimeoutError) as exc:
            errors.append(f"{where}: {_reason(exc)}")
            if pref == "tcp" or not _vsock_available(target):
                raise GuestUnreachable(_unreachable(target, "; ".join(errors))) from None
    where = f"vsock cid {target.vsock_cid}"
    if not _vsock_available(target):
        raise GuestUnreachable(_unreachable(target, f"{where}: this host has no usable vsock"))
    try:
        # A fallback only: a short timeout, so that a VM that is down fails fast.
        return await _connect_socket(socket.AF_VSOCK, (target.vsock_cid, VSOCK_SSH_PORT),
                                     timeout if pref == "vsock" else min(timeout, 1.0)), where
    except (OSError, asyncio.TimeoutError) as exc:
        errors.append(f"{where}: {_reason(exc)}")
        raise GuestUnreachable(_unreachable(target, "; ".join(errors))) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


def _unreachable(target: GuestTarget, detail: str) -> str:
    return (f"cannot reach VM {target.name} over SSH ({detail}); is it running? "
            f"`mariner up` starts it")


async def connect(target: GuestTarget, *, pin: bool = False, trust_new: bool = False,
                  timeout: float = 10.0,
                  keepalive: float | None = None) -> asyncssh.SSHClientConnection:
    """One authenticated connection, host key checked against the pin. It sends keepalives
    every `keepalive` seconds (default KEEPALIVE) and counts the guest gone after three
    unanswered ones (a VM that vanished without a reset does not hang a held connection).

    With no pin yet, `pin=True` (first `up`) or `trust_new=True` (--trust-new-host-key) accepts
    the presented key and pins it after authentication succeeds; otherwise it is refused.
    """
    keepalive = KEEPALIVE if keepalive is None else keepalive
    previous = pinned_keys(target.known_hosts, target.alias)
    pinned = [] if trust_new else previous
    if pinned:
        known_hosts = ([asyncssh.import_public_key(k) for k in pinned], [], [])
    elif pin or trust_new:
        known_hosts = None
    else:
        raise NotPinned(target.name)
    options = dict(
        username=target.user, known_hosts=known_hosts, config=[],
        agent_forwarding=target.forward_agent, encryption_algs=CIPHERS,
        connect_timeout=timeout, login_timeout=timeout,
        keepalive_interval=keepalive, keepalive_count_max=3,
        **_identity_options(target))
    sock, where = await _open_socket(target, timeout, first_contact=not pinned)
    try:
        conn = await asyncssh.connect(target.host or target.alias, target.port, sock=sock,
                                      **options)
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyMismatch(target.name, target.known_hosts) from None
    except asyncssh.PermissionDenied:
        raise GuestUnreachable(
            f"VM {target.name} refused mariner's key {target.identity} for user "
            f"{target.user!r} at {where}; `mariner up` re-applies the authorized key") from None
    except (OSError, asyncssh.Error, asyncio.TimeoutError, EOFError) as exc:
        sock.close()
        raise GuestUnreachable(_unreachable(target, f"{where}: {_reason(exc)}")) from None
    if not pinned:
        key = conn.get_server_host_key()
        if key is not None:
            new = key.export_public_key().decode().strip()
            channel = "vsock" if where.startswith("vsock") else "tcp"
            if trust_new:
                announce_repin(target.name, previous, new, channel)
            pin_host_key(target.known_hosts, target.alias, new, channel)
    return conn


def announce_repin(name: str, previous: list[str], new: str, channel: str) -> None:
    """--trust-new-host-key: the old and new fingerprints on stderr, before the new pin."""
    import sys

    from .trust import fingerprint

    new_print = fingerprint(new)
    if not previous:
        line = f"VM {name}: pinning host key {new_print} (over {channel}; none was pinned)"
    elif [" ".join(k.split()[:2]) for k in previous] == [" ".join(new.split()[:2])]:
        line = f"VM {name}: host key unchanged ({new_print}); pinned over {channel}"
    else:
        old_prints = ", ".join(fingerprint(k) for k in previous)
        line = (f"VM {name}: host key changed: old {old_prints}, new {new_print}; "
                f"re-pinning the new key (over {channel})")
    sys.stderr.write(f"mariner: {line}\n")
    sys.stderr.flush()


async def wait_until_ready(target: GuestTarget, timeout: float, pin: bool,
                           trust_new: bool = False) -> None:
    deadline = time.monotonic() + timeout
    delay, last = 0.1, None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestUnreachable(f"VM {target.name} did not answer SSH within {timeout:g}s "
                                   f"({last}); see `mariner logs`")
        try:
            conn = await connect(target, pin=pin, trust_new=trust_new,
                                 timeout=max(1.0, min(remaining, 10.0)))
        except (HostKeyMismatch, NotPinned):
            raise
        except GuestUnreachable as exc:
            last = exc.message
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
            continue
        conn.close()
        await conn.wait_closed()
        return


class _Writer(threading.Thread):
    """Writes queued chunks to one fd with blocking writes; reports when it has drained."""

    def __init__(self, fd: int, on_low, on_broken):
        super().__init__(daemon=True)
        self.fd = fd
        self.queue: collections.deque[bytes] = collections.deque()
        self.pending = 0
        self.cond = threading.Condition()
        self.closed = False
        self.broken = False
        self.on_low = on_low
        self.on_broken = on_broken

    def put(self, data: bytes) -> int:
        with self.cond:
            if self.broken:
                return 0
            self.queue.append(data)
            self.pending += len(data)
            self.cond.notify()
            return self.pending

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                data = self.queue.popleft()
            try:
                self._write_all(data)
            except OSError:
                with self.cond:
                    self.broken = True
                    self.queue.clear()
                    self.pending = 0
                self.on_broken()
                return
            with self.cond:
                before = self.pending
                self.pending -= len(data)
                crossed = before >= LOW_WATER > self.pending
            if crossed:
                self.on_low()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[n:]


class _StdinPump(threading.Thread):
    """Reads our stdin (blocking, only when poll says it is readable) and feeds the channel.

    The wake pipe belongs to the owner, not to the thread: stop() may be called after the
    thread returned (stdin at EOF), and a descriptor closed there could by then be another
    client's socket or stdout in the agent. close() releases it once the thread is joined.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, proc: "RemoteProcess"):
        super().__init__(daemon=True)
        self.fd = fd
        self.loop = loop
        self.proc = proc
        self.can_send = threading.Event()
        self.can_send.set()
        self._pipe_lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe()

    def stop(self) -> None:
        with self._pipe_lock:
            if self.wake_w < 0:
                return
            try:
                os.write(self.wake_w, b"x")
            except OSError:   # already woken: the pipe is full
                pass

    def close(self) -> None:
        """Release the wake pipe; only once the thread has returned (join() first)."""
        with self._pipe_lock:
            for fd in (self.wake_r, self.wake_w):
                if fd >= 0:
                    os.close(fd)
            self.wake_r = self.wake_w = -1

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            while not self.can_send.wait(0.2):
                if select.select([self.wake_r], [], [], 0)[0]:
                    return
            events = dict(poller.poll())
            if self.wake_r in events:
                return
            if events.get(self.fd, 0) & select.POLLNVAL:
                self._call(self.proc._stdin_eof)
                return
            try:
                data = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                select.select([self.fd], [], [], 0.05)
                continue
            except OSError:
                data = b""
            if not data:
                self._call(self.proc._stdin_eof)
                return
            self.can_send.clear()
            self._call(self.proc._stdin_data, data)

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed
            pass


class _Session(asyncssh.SSHClientSession):
    def __init__(self, proc: "RemoteProcess"):
        self.proc = proc

    def data_received(self, data: bytes, datatype) -> None:
        self.proc._output(data, datatype)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.proc._writable = False

    def resume_writing(self) -> None:
        self.proc._writable = True
        self.proc._maybe_pump()

    def connection_lost(self, exc) -> None:
        self.proc._closed(exc)


@dataclass
class Outcome:
    status: int
    message: str | None = None   # set when mariner, not the command, decided the status


class RemoteProcess:
    """One command on the guest, its streams bound to local fds (stdin may be None)."""

    def __init__(self, conn: asyncssh.SSHClientConnection, request: ExecRequest,
                 fds: tuple[int | None, int, int], name: str = "the VM"):
        self.conn = conn
        self.request = request
        self.fds = fds
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.chan = None
        self.done = self.loop.create_future()
        self._writable = True
        self._paused = False
        self._broken = False
        self._pump: _StdinPump | None = None
        self._pump_waiting = False
        self._early_signals: list[str] = []
        self._joined: asyncio.Future | None = None     # set when release() has joined
        self._join_lock = threading.Lock()
        self._threads_done = False
        self._close_after: list[int] = []
        out_fd, err_fd = fds[1], fds[2]
        self._out = _Writer(out_fd, self._on_low_threadsafe, self._on_broken_threadsafe)
        self._err = self._out if err_fd == out_fd else _Writer(
            err_fd, self._on_low_threadsafe, self._on_broken_threadsafe)

    async def start(self) -> None:
        req = self.request
        kwargs = dict(encoding=None, window=WINDOW, max_pktsize=MAX_PACKET,
                      x11_forwarding=False)
        if req.tty:
            kwargs.update(request_pty="force", term_type=req.term or "xterm-256color",
                          term_size=(req.cols or 80, req.rows or 24))
        else:
            kwargs.update(request_pty=False)
        self.chan, _ = await self.conn.create_session(lambda: _Session(self), req.command,
                                                      **kwargs)
        try:
            if req.stdin and self.fds[0] is not None:
                self._pump = _StdinPump(self.fds[0], self.loop, self)
            self._out.start()
            if self._err is not self._out:
                self._err.start()
            if self._pump is not None:
                self._pump.start()
            else:
                self.chan.write_eof()
        except BaseException:
            # (Out of descriptors or threads.) Nothing may keep using the fds: the caller
            # closes them.
            self.chan.close()
            await self.release()
            raise

    # -- called on the event loop --------------------------------------------------------
    def _output(self, data: bytes, datatype) -> None:
        writer = self._err if datatype == asyncssh.EXTENDED_DATA_STDERR else self._out
        if writer.put(data) >= HIGH_WATER and not self._paused:
            self._paused = True
            self.chan.pause_reading()

    def _on_low(self) -> None:
        if self._paused and not self._broken and self._out.pending < HIGH_WATER \
                and self._err.pending < HIGH_WATER:
            self._paused = False
            self.chan.resume_reading()

    def _on_broken(self) -> None:
        # Our stdout or stderr went away (e.g. `| head`): stop, as ssh would die of SIGPIPE.
        if not self._broken:
            self._broken = True
            if self.chan is not None:
                self.chan.close()

    def _on_low_threadsafe(self) -> None:
        self.loop.call_soon_threadsafe(self._on_low)

    def _on_broken_threadsafe(self) -> None:
        self.loop.call_soon_threadsafe(self._on_broken)

    def _stdin_data(self, data: bytes) -> None:
        if self.chan is None or self.done.done():
            return
        try:
            self.chan.write(data)
        except (asyncssh.Error, OSError, BrokenPipeError):
            return
        self._pump_waiting = True
        self._maybe_pump()

    def _maybe_pump(self) -> None:
        if self._pump is not None and self._pump_waiting and self._writable:
            self._pump_waiting = False
            self._pump.can_send.set()

    def _stdin_eof(self) -> None:
        if self.chan is not None and not self.done.done():
            try:
                self.chan.write_eof()
            except (asyncssh.Error, OSError):
                pass

    def _closed(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(exc)

    # -- public --------------------------------------------------------------------------
    def signal(self, name: str) -> None:
        """Deliver signal `name` (e.g. "INT") to the remote process group."""
        if self.chan is None:
            self._early_signals.append(name)  # before start(): sent once it started
        elif not self.done.done():
            try:
                self.chan.send_signal(name)
            except (asyncssh.Error, OSError, ValueError):
                pass

    def flush_signals(self) -> None:
        early, self._early_signals = self._early_signals, []
        for name in early:
            self.signal(name)

    def resize(self, cols: int, rows: int) -> None:
        if self.chan is not None and self.request.tty and not self.done.done():
            try:
                self.chan.change_terminal_size(cols, rows)
            except (asyncssh.Error, OSError):
                pass

    def abandon(self) -> None:
        """The local side went away: hang up the remote process."""
        self.signal("HUP")
        if self.chan is not None:
            self.chan.close()

    async def wait(self) -> Outcome:
        exc = await self.done
        await self.release()
        if self._broken:
            return Outcome(STATUS_SIGPIPE)
        sig = self.chan.get_exit_signal()
        if sig is not None:
            number = getattr(_signal, "SIG" + sig[0], None)
            return Outcome(128 + int(number) if number is not None else 255)
        status = self.chan.get_exit_status()
        if status is not None and status >= 0:
            return Outcome(status)
        reason = f" ({exc})" if exc else ""
        return Outcome(STATUS_LOST, f"lost the connection to VM {self.name}{reason}")

    async def release(self) -> None:
        """Stop and join every thread that uses the local fds, so that the caller may close
        them: the agent's fd numbers are reused at once by other clients' sockets and stdio.
        Everything received is written out first. Safe to call more than once: every call
        waits for the same join. A caller that must not wait (it is being cancelled) hands
        the fds to close_when_released() instead of closing them itself."""
        await asyncio.shield(self._begin_release())

    def _begin_release(self) -> asyncio.Future:
        """Start the release (once): the future of its join."""
        if self._joined is not None:
            return self._joined
        if self._pump is not None:
            self._pump.stop()
        self._out.close()
        self._err.close()
        # A thread of its own, not the loop's shared executor: a writer may wait as long as
        # the client's reader does (`exec ... | less`, left open), and a few such commands
        # must not hold every worker that the other commands' releases wait for.
        joined = self._joined = self.loop.create_future()

        def join() -> None:
            try:
                self._join_threads()
            finally:
                with self._join_lock:
                    self._threads_done = True
                    late, self._close_after = self._close_after, []
                _close_fds(late)
                try:
                    self.loop.call_soon_threadsafe(
                        lambda: joined.done() or joined.set_result(None))
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

        threading.Thread(target=join, name="mariner-release", daemon=True).start()
        return joined

    def close_when_released(self, fds: list[int]) -> None:
        """Release without waiting, and close `fds` once no thread uses them any more: now if
        the threads have ended, else on the release's thread right after they do."""
        self._begin_release()
        with self._join_lock:
            if not self._threads_done:
                self._close_after.extend(fds)
                return
        _close_fds(fds)

    def _join_threads(self) -> None:
        for thread in (self._out, self._err, self._pump):
            if thread is not None and thread.is_alive():
                thread.join()
        if self._pump is not None:
            self._pump.close()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def run_on(conn, request: ExecRequest, fds, name: str, on_started=None) -> Outcome:
    proc = RemoteProcess(conn, request, fds, name)
    await proc.start()
    if on_started is not None:
        on_started(proc)
    return await proc.wait()


async def _direct(target: GuestTarget, request: ExecRequest, fds, trust_new: bool) -> Outcome:
    conn = await connect(target, trust_new=trust_new)
    loop = asyncio.get_running_loop()
    proc = RemoteProcess(conn, request, fds, target.name)
    handled = []
    try:
        # Handlers go in before the command starts, so that no signal is lost in between.
        if threading.current_thread() is threading.main_thread():
            for signum in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT):
                loop.add_signal_handler(signum, proc.signal, _signal.Signals(signum).name[3:])
                handled.append(signum)
            if request.tty:
                from .terminal import window_size

                loop.add_signal_handler(_signal.SIGWINCH,
                                        lambda: proc.resize(*window_size(fds[1])))
                handled.append(_signal.SIGWINCH)
        await proc.start()
        proc.flush_signals()
        return await proc.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        conn.close()


def run_direct(target: GuestTarget, request: ExecRequest, fds=(0, 1, 2),
               trust_new: bool = False) -> Outcome:
    """Run one command over a fresh connection of our own (no agent)."""
    return asyncio.run(_direct(target, request, fds, trust_new))
