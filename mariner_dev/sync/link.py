"""A held SSH connection to a VM's guest that comes back after the VM restarts.

`sync --watch` and `mariner forward` outlive the VM's boots: when the connection drops they
say so once, reconnect with backoff (0.2 s doubling to 5 s), and carry on. The host key stays
pinned throughout: a guest presenting another key ends the wait with HostKeyMismatch.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from ..errors import GuestUnreachable

INITIAL_DELAY = 0.2
MAX_DELAY = 5.0
KEEPALIVE = 5.0      # a VM that vanished without closing TCP is noticed within ~15 s


class GuestLink:
    """One connection at a time to `target`; `get()` waits for a live one."""

    def __init__(self, target, say: Callable[[str], None] = lambda _: None, *,
                 keepalive: float = KEEPALIVE, max_delay: float = MAX_DELAY, connect=None):
        self.target = target
        self.say = say
        self.keepalive = keepalive
        self.max_delay = max_delay
        self.generation = 0             # bumps with every new connection
        self.lost = asyncio.Event()     # set while there is no live connection
        self.lost.set()
        self._conn = None
        self._connect = connect
        self._watcher: asyncio.Task | None = None
        self._down_reported = False

    async def _open(self):
        if self._connect is not None:
            return await self._connect()
        from ..remote.session import connect

        return await connect(self.target, keepalive=self.keepalive, timeout=5.0)

    async def get(self, *, retry: bool = True):
        """The live connection, reconnecting (with backoff, forever) when there is none.

        With retry=False the first failure is raised (a command's first connection fails fast).
        """
        from ..remote.trust import HostKeyMismatch, NotPinned

        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        delay = INITIAL_DELAY
        while True:
            try:
                conn = await self._open()
            except (HostKeyMismatch, NotPinned):
                raise
            except GuestUnreachable as exc:
                if not retry:
                    raise
                if not self._down_reported:
                    self.say(f"VM {self.target.name} is unreachable ({_short(exc.message)}); "
                             f"retrying")
                    self._down_reported = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            break
        if self.generation and self._down_reported:
            self.say(f"reconnected to VM {self.target.name}")
        self._down_reported = False
        self._conn = conn
        self.generation += 1
        self.lost.clear()
        self._watcher = asyncio.create_task(self._watch(conn))
        return conn

    async def _watch(self, conn) -> None:
        await conn.wait_closed()
        if conn is self._conn:
            self._conn = None
            self.lost.set()
            if not self._down_reported:
                self.say(f"lost the connection to VM {self.target.name}; reconnecting")
                self._down_reported = True

    def drop(self) -> None:
        """The current connection failed mid-use: close it so `get()` opens a new one."""
        conn, self._conn = self._conn, None
        self.lost.set()
        if conn is not None:
            conn.close()
            if not self._down_reported:
                self.say(f"lost the connection to VM {self.target.name}; reconnecting")
                self._down_reported = True

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if self._watcher is not None:
            self._watcher.cancel()
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):
                pass


async def until_signalled(main) -> None:
    """Run the coroutine `main` until it ends or SIGINT/SIGTERM arrives (Ctrl-C, `down`).

    On a signal `main` is cancelled and awaited, so its cleanup runs; its errors propagate.
    """
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    task = asyncio.ensure_future(main)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        for pending in (task, stopper):
            pending.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)


def _short(message: str) -> str:
    return message.split(";")[0]
