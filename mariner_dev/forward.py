"""TCP forwards from the host's 127.0.0.1:HOST to the guest's 127.0.0.1:GUEST, over SSH.

mariner owns the host listeners itself (rather than asyncssh's per-connection listeners), so a
forward keeps its port across VM restarts: each new client is carried over whatever connection
is live, and waits for a reconnect when there is none. Used by `mariner forward` in the
foreground and by the per-VM agent, which holds `[ports] forward` from `up` to `down`.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

from .errors import GuestUnreachable, MarinerError, UsageError
from .model import PortForward

LISTEN = "127.0.0.1"
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 30.0   # a client waits this long for the VM to come back


class PortInUse(MarinerError):
    """A host port of a forward is taken by another program."""

    def __init__(self, forward: PortForward):
        suggestion = PortForward(host=_suggest(forward.host), guest=forward.guest)
        super().__init__(f"cannot forward {forward}: {LISTEN}:{forward.host} is already in use "
                         f"on the host",
                         hint=f"pick another host port, e.g. `mariner forward "
                              f"{suggestion.host}:{suggestion.guest}`, or stop what holds it "
                              f"(`ss -ltnp 'sport = :{forward.host}'` shows it)")
        self.forward = forward


def _suggest(port: int) -> int:
    return port + 10000 if port < 55535 else port - 1000


def parse_forward(text: str) -> PortForward:
    """`PORT` or `HOST:GUEST`, as on the command line and in `[ports] forward`."""
    parts = text.strip().split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or not all(1 <= n <= 65535 for n in numbers):
        raise UsageError(f"{text!r} is not a forward: give PORT or HOST:GUEST "
                         f"(ports 1-65535), e.g. 8000 or 15432:5432")
    return PortForward(host=numbers[0], guest=numbers[-1])


@dataclass
class ForwardState:
    forward: PortForward
    active: int = 0        # connections carried right now
    total: int = 0
    last_error: str | None = None    # the last failure carrying a connection
    listening: bool = False
    error: str | None = None         # why the host port is not listening (port in use, ...)
    given_up: str | None = None      # set when the port is no longer tried: what to do

    @property
    def state(self) -> str:
        """`listening`, `failed` (the host port could not be taken) or `stopped`."""
        if self.listening:
            return "listening"
        return "failed" if self.error else "stopped"

    def to_json(self) -> dict:
        error = self.error
        if error and self.given_up and not self.listening:
            error = f"{error}; {self.given_up}"
        return {"forward": str(self.forward), "host": f"{LISTEN}:{self.forward.host}",
                "guest": f"{LISTEN}:{self.forward.guest}", "state": self.state,
                "error": error, "active": self.active, "total": self.total,
                "last_error": self.last_error, "retrying": bool(self.error and
                                                                not self.given_up)}


class Forwarder:
    """Listeners for a set of forwards; each accepted client gets a direct-tcpip channel."""

    def __init__(self, forwards: Iterable[PortForward],
                 get_conn: Callable[[], Awaitable[object]],
                 say: Callable[[str], None] = lambda _: None, *,
                 connect_timeout: float = CONNECT_TIMEOUT):
        self.states = [ForwardState(f) for f in forwards]
        self.get_conn = get_conn
        self.say = say
        self.connect_timeout = connect_timeout
        self._servers: dict[int, asyncio.base_events.Server] = {}   # by host port
        self._tasks: set[asyncio.Task] = set()

    async def start(self, *, keep_going: bool = False) -> None:
        """Listen on every host port, or on none: a port in use fails the whole set.

        With keep_going, a port that cannot be taken is recorded in its state (`error`) and
        the others listen anyway; `retry_failed()` tries it again later (the agent does).
        """
        try:
            for state in self.states:
                await self._take(state, keep_going)
        except BaseException:
            await self.close()
            raise

    async def _take(self, state: ForwardState, keep_going: bool) -> bool:
        try:
            self._servers[state.forward.host] = await self._listen(state)
        except MarinerError as exc:
            if not keep_going:
                raise
            if exc.message != state.error:
                self.say(f"forward {state.forward}: {exc.message}")
            state.error = exc.message
            return False
        state.listening, state.error = True, None
        return True

    def give_up(self, why: str) -> None:
        """Stop trying the ports that could not be taken (retry_failed() skips them) and say
        `why` in their state, until resume()."""
        for state in self.failed():
            state.given_up = why

    def resume(self) -> None:
        for state in self.states:
            state.given_up = None

    async def retry_failed(self) -> list[ForwardState]:
        """Try again the host ports that could not be taken (and not given up); the forwards
        now listening."""
        taken = []
        for state in self.states:
            if not state.listening and state.error and not state.given_up \
                    and await self._take(state, True):
                self.say(f"forward {state.forward}: listening on {LISTEN}:{state.forward.host}")
                taken.append(state)
        return taken

    def failed(self) -> list[ForwardState]:
        return [s for s in self.states if not s.listening and s.error]

    async def _listen(self, state: ForwardState):
        def accepted(reader, writer) -> None:
            task = asyncio.ensure_future(self._carry(state, reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            return await asyncio.start_server(accepted, LISTEN, state.forward.host,
                                              reuse_address=True)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(state.forward) from None
            if exc.errno == errno.EACCES:
                raise MarinerError(f"cannot listen on {LISTEN}:{state.forward.host} "
                                   f"(permission denied): ports below 1024 need root; "
                                   f"forward a higher host port, e.g. "
                                   f"{_suggest(state.forward.host)}:{state.forward.guest}") from None
            raise MarinerError(f"cannot listen on {LISTEN}:{state.forward.host}: "
                               f"{exc.strerror or exc}") from None

    def table(self) -> list[dict]:
        """The forwards and their connections (`status` and `mariner forward` show it)."""
        return [s.to_json() for s in self.states]

    async def _carry(self, state: ForwardState, reader, writer) -> None:
        import asyncssh

        state.active += 1
        state.total += 1
        remote_writer = None
        try:
            try:
                conn = await asyncio.wait_for(self.get_conn(), self.connect_timeout)
                remote_reader, remote_writer = await conn.open_connection(
                    LISTEN, state.forward.guest)
            except asyncssh.ChannelOpenError as exc:
                self._error(state, f"the guest refused {LISTEN}:{state.forward.guest} "
                                   f"({exc.reason}); is anything listening there in the VM?")
                return
            except asyncio.TimeoutError:
                self._error(state, f"the VM did not come back within {self.connect_timeout:g} s")
                return
            except (GuestUnreachable, asyncssh.Error, OSError) as exc:
                self._error(state, f"cannot reach the VM ({exc})")
                return
            await asyncio.gather(_pipe(reader, remote_writer), _pipe(remote_reader, writer))
        finally:
            state.active -= 1
            for w in (writer, remote_writer):
                if w is not None:
                    try:
                        w.close()
                    except Exception:  # noqa: BLE001  (already torn down)
                        pass

    def _error(self, state: ForwardState, message: str) -> None:
        if message != state.last_error:
            self.say(f"forward {state.forward}: {message}")
        state.last_error = message

    async def close(self) -> None:
        """Stop listening and drop the connections in flight; the ports are free on return."""
        servers = list(self._servers.values())
        for server in servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in servers:
            await server.wait_closed()
        self._servers = {}
        for state in self.states:
            state.listening = False


async def _pipe(source, sink) -> None:
    """Copy until EOF, then pass the EOF on (half-close); any error ends both directions."""
    try:
        while True:
            data = await source.read(CHUNK)
            if not data:
                break
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError, EOFError):
        sink.close()
    except Exception as exc:  # asyncssh's channel errors
        if exc.__class__.__module__.startswith("asyncssh"):
            sink.close()
        else:
            raise


async def hold_forwards(get_conn: Callable[[], Awaitable[object]],
                        forwards: Iterable[PortForward],
                        say: Callable[[str], None] = lambda _: None, *,
                        keep_going: bool = False) -> Forwarder:
    """Start listening for `forwards` (what the agent calls at start); `await f.close()` at stop.

    `get_conn()` returns the live asyncssh connection, waiting for a reconnect if needed.
    Raises PortInUse (nothing is left listening) when a host port is taken; with keep_going
    (the agent) the other forwards listen and the failure is in `table()` instead.
    """
    forwarder = Forwarder(forwards, get_conn, say)
    await forwarder.start(keep_going=keep_going)
    return forwarder


def run_forwards(cfg, record, forwards: list[PortForward], say: Callable[[str], None],
                 show_table: Callable[[list[dict]], None]) -> None:
    """`mariner forward` in the foreground: until SIGINT or SIGTERM, then release the ports."""
    from .remote.target import target_for

    asyncio.run(_foreground(target_for(cfg, record), forwards, say, show_table))


async def _foreground(target, forwards, say, show_table) -> None:
    from .sync.link import GuestLink, until_signalled

    link = GuestLink(target, say)
    forwarder = Forwarder(forwards, link.get, say)

    async def serve() -> None:
        await forwarder.start()
        await link.get(retry=False)   # a wrong key or a stopped VM fails at once
        show_table(forwarder.table())
        while True:                   # reconnect as soon as the VM is back, not on demand
            await link.lost.wait()
            await link.get()

    try:
        await until_signalled(serve())
    finally:
        await forwarder.close()
        await link.close()
