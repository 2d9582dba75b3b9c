"""`mariner sync` served by the per-VM agent: on its held connection, with an SFTP client that
stays open between syncs, so a no-change resync costs neither an SSH handshake nor an SFTP
start-up. Imported by the agent only (it pulls in the sync engine and asyncssh).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


class SyncService:
    """One sync at a time (their manifests and the guest tree are shared) over `get_conn()`."""

    def __init__(self, get_conn: Callable[[], Awaitable[object]],
                 drop_conn: Callable[[object], None], name: str):
        self.get_conn = get_conn
        self.drop_conn = drop_conn
        self.name = name
        self.lock = asyncio.Lock()
        self._sftp = None
        self._sftp_conn = None

    async def _sftp_for(self, conn):
        from ..sync.coalesce import open_sftp

        if self._sftp is None or self._sftp_conn is not conn:
            self._forget_sftp()
            self._sftp = await open_sftp(conn)
            self._sftp_conn = conn
        return self._sftp

    def _forget_sftp(self) -> None:
        sftp, self._sftp, self._sftp_conn = self._sftp, None, None
        if sftp is not None:
            try:
                sftp.exit()
            except Exception:  # noqa: BLE001  (its channel is already gone)
                pass

    async def run(self, request: dict) -> dict:
        """Sync as `request` says ({"spec", "dry_run", "install"}); sync.outcome() of the report.

        A connection that died since the last call (the VM restarted) is replaced and the sync
        runs once more on the new one; a sync is safe to repeat.
        """
        import asyncssh

        from ..errors import GuestUnreachable
        from ..sync import outcome
        from ..sync.engine import spec_from_request, sync_over

        spec = spec_from_request(request["spec"])
        async with self.lock:
            for attempt in (1, 2):
                conn = await self.get_conn()
                try:
                    sftp = await self._sftp_for(conn)
                    report = await sync_over(conn, spec, dry_run=bool(request.get("dry_run")),
                                             install=bool(request.get("install")), sftp=sftp)
                    return outcome(report)
                except (GuestUnreachable, asyncssh.Error, OSError):
                    self._forget_sftp()
                    if attempt == 2 or not conn.is_closed():
                        raise
                    self.drop_conn(conn)
                except BaseException:
                    # Cancelled (the client hung up) or failed half-way: the SFTP client may be
                    # in the middle of requests; the next sync starts a fresh one.
                    self._forget_sftp()
                    raise
        raise AssertionError("unreachable")
