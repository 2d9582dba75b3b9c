"""`mariner sync --watch`: sync each burst of host changes within a few hundred milliseconds.

watchdog reports changes from its own thread; they are folded on the event loop until the
host has been quiet for QUIET seconds (an editor's save storm becomes one sync), then only the
touched paths are synced over the held connection. After a reconnect (the VM restarted) the
whole tree is synced again, since the guest may have lost or kept anything.
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

from ..errors import GuestUnreachable, MarinerError
from .coalesce import open_sftp
from .engine import SyncSpec, sync_over
from .link import GuestLink, until_signalled
from .tree import Root

QUIET = 0.06         # seconds without events that end a burst
MAX_FOLD = 0.25      # a burst that never goes quiet is still synced this often
WANTED = {"created", "modified", "deleted", "moved", "closed", "attrib"}


class HostWatcher:
    """watchdog observers on the roots, turning events into rels under ~."""

    def __init__(self, roots: tuple[Root, ...], loop: asyncio.AbstractEventLoop):
        self.roots = roots
        self.loop = loop
        self.pending: set[str] = set()
        self.changed = asyncio.Event()
        self._observer = None
        self._watches: dict[tuple[str, bool, int], object] = {}

    def start(self) -> None:
        from watchdog.observers import Observer

        self._observer = Observer()
        self._observer.start()
        self.refresh()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def _wanted_watches(self) -> set[tuple[str, bool, int]]:
        wanted = set()
        for root in self.roots:
            try:
                st = os.stat(root.source)
            except OSError:
                st = None
            if st is not None and os.path.isdir(root.source):
                wanted.add((root.source, True, st.st_ino))
            # The parent sees the root itself appear, vanish or be replaced by a rename.
            directory = os.path.dirname(root.source)
            try:
                wanted.add((directory, False, os.stat(directory).st_ino))
            except OSError:
                pass
        return wanted

    def refresh(self) -> None:
        """(Re)schedule watches for roots that appeared, vanished or were replaced."""
        from watchdog.events import FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type not in WANTED:
                    return
                for path in (event.src_path, getattr(event, "dest_path", "")):
                    if path:
                        rel = watcher.to_rel(os.fsdecode(path))
                        if rel is not None:
                            watcher.loop.call_soon_threadsafe(watcher._add, rel)

        wanted = self._wanted_watches()
        for key in list(self._watches):
            if key not in wanted:
                try:
                    self._observer.unschedule(self._watches.pop(key))
                except (KeyError, OSError):
                    pass
        for key in wanted - set(self._watches):
            path, recursive, _ = key
            try:
                self._watches[key] = self._observer.schedule(Handler(), path, recursive=recursive)
            except OSError:
                continue

    def to_rel(self, path: str) -> str | None:
        for root in self.roots:
            if path == root.source:
                return root.rel
            if path.startswith(root.source + "/"):
                return root.rel + path[len(root.source):]
        return None

    def _add(self, rel: str) -> None:
        self.pending.add(rel)
        self.changed.set()

    async def next_batch(self) -> set[str]:
        """Wait for changes, then for the host to go quiet; the rels touched meanwhile."""
        await self.changed.wait()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < MAX_FOLD:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), QUIET)
            except asyncio.TimeoutError:
                break
        self.changed.clear()
        batch, self.pending = self.pending, set()
        return batch


async def watch_over(spec: SyncSpec, link: GuestLink, out: Callable[[str], None],
                     ready: Callable[[], None] | None = None) -> None:
    """Sync now, then every burst of changes, forever (cancel the task to stop)."""
    loop = asyncio.get_running_loop()
    watcher = HostWatcher(spec.roots, loop)
    watcher.start()
    shown: set[str] = set()
    generation, sftp, full, first = None, None, True, True
    try:
        while True:
            scopes = None
            if not full:
                batch = asyncio.ensure_future(watcher.next_batch())
                lost = asyncio.ensure_future(link.lost.wait())
                done, _ = await asyncio.wait({batch, lost}, return_when=asyncio.FIRST_COMPLETED)
                if batch not in done:
                    batch.cancel()
                    full = True
                    continue
                lost.cancel()
                scopes = sorted(batch.result())
            conn = await link.get(retry=not first)   # the first connection fails fast
            try:
                if link.generation != generation:
                    sftp = await open_sftp(conn)
                    generation = link.generation
                    scopes = None
                report = await sync_over(conn, spec, scopes=scopes, sftp=sftp)
            except GuestUnreachable:
                link.drop()
                full = True
                continue
            except OSError as exc:   # the SFTP channel could not open: the connection is gone
                out(f"sync failed ({exc}); reconnecting")
                link.drop()
                full = True
                continue
            except MarinerError as exc:   # e.g. the guest refused a write: keep watching
                out(f"sync failed: {exc}")
                report = None
            if report is not None:
                for line in report.lines():
                    out(line)
                for line in report.warnings:
                    if line not in shown:
                        shown.add(line)
                        out(line)
            watcher.refresh()
            full = False
            if first:
                first = False
                out(f"watching {len(spec.roots)} dotfile path(s) for changes (Ctrl-C to stop)")
                if ready is not None:
                    ready()
    finally:
        watcher.stop()


def run_watch(cfg, record, out: Callable[[str], None], *, guest_root: str | None = None,
              ready: Callable[[], None] | None = None) -> None:
    """The foreground `sync --watch`: until SIGINT or SIGTERM (`down` sends it), then clean up."""
    from ..remote.target import target_for
    from .engine import spec_for

    spec = spec_for(cfg, guest_root)
    target = target_for(cfg, record)
    asyncio.run(_until_signalled(spec, target, out, ready))


async def _until_signalled(spec, target, out, ready) -> None:
    link = GuestLink(target, out)
    try:
        await until_signalled(watch_over(spec, link, out, ready))
    finally:
        await link.close()
