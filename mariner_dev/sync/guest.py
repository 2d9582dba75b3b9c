"""The guest side of a dotfiles sync, over SFTP (asyncssh): listing and applying a plan.

Paths are bytes built from the guest home and checked relative paths, so a name is sent
exactly as it is on the host (newlines, undecodable bytes and all) and can never climb out.
New files are created with O_EXCL and existing ones replaced by rename, so a symlink planted
in the guest is replaced, never written through.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import stat

import asyncssh
from asyncssh import SFTPAttrs

from .plan import GuestAttrs, GuestView
from .tree import DIR, FILE, LINK, HostEntry, check_rel

CONCURRENCY = 64
OP_TIMEOUT = 60.0   # seconds one SFTP request may take before the guest counts as gone
LIST_TIMEOUT = 300.0  # ... one directory listing (a guest may keep many files there)
LEFTOVERS = 256     # temporary files of an interrupted sync picked up per directory and sync
CHUNK = 256 * 1024
EXCL_FLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_EXCL


async def timed(awaitable, timeout: float | None = None):
    """`awaitable` (an SFTP request), bounded (default OP_TIMEOUT): a guest that stops
    answering while keeping the connection up (sshd answers the keepalives, not the SFTP
    server) fails the sync instead of hanging it."""
    timeout = OP_TIMEOUT if timeout is None else timeout
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        from ..errors import GuestUnreachable

        raise GuestUnreachable(f"the VM did not answer an SFTP request within {timeout:g} s; "
                               f"is it overloaded? `mariner status` shows it") from None


def _kind(attrs: SFTPAttrs) -> str:
    mode = attrs.permissions or 0
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISLNK(mode):
        return LINK
    return "other"


def _attrs(attrs: SFTPAttrs) -> GuestAttrs:
    return GuestAttrs(kind=_kind(attrs), size=attrs.size or 0, mtime=attrs.mtime or 0,
                      perms=stat.S_IMODE(attrs.permissions or 0))


class GuestTree:
    """SFTP operations on paths relative to the guest home (`root`, absolute bytes)."""

    def __init__(self, sftp: asyncssh.SFTPClient, root: bytes):
        if not root.startswith(b"/"):
            raise ValueError(f"the guest home must be absolute, not {root!r}")
        self.sftp = sftp
        self.root = root.rstrip(b"/") or b"/"
        self.limit = asyncio.Semaphore(CONCURRENCY)
        self.bytes_sent = 0

    def path(self, rel: str) -> bytes:
        if rel == "":
            return self.root
        if not check_rel(rel):   # every caller passes checked rels: this is the last guard
            raise ValueError(f"unsafe guest path {rel!r}")
        return self.root + b"/" + os.fsencode(rel)

    def tmp_path(self, rel: str) -> bytes:
        directory = rel.rpartition("/")[0]
        name = f".~mariner-{secrets.token_hex(8)}.tmp"
        return self.path(f"{directory}/{name}" if directory else name)

    # -- reading ---------------------------------------------------------------------------
    async def list_dirs(self, rels, wanted=None) -> GuestView:
        """The listings of `rels` (lstat attributes per name), symlink targets resolved.

        With `wanted` (a set of rels), a listing keeps only the names in it, plus a bounded
        number of an interrupted sync's temporary files: the directories are read as a
        stream, so memory does not grow with what else the guest keeps there (a guest home
        of a million files costs time on the wire, not memory)."""
        from .plan import TMP_NAME

        view = GuestView()

        def keep(rel: str, name: str, leftovers: list[int]) -> bool:
            if wanted is None:
                return True
            if (f"{rel}/{name}" if rel else name) in wanted:
                return True
            if leftovers[0] < LEFTOVERS and TMP_NAME.fullmatch(name):
                leftovers[0] += 1
                return True
            return False

        async def one(rel: str) -> None:
            listing = {}
            leftovers = [0]
            async with self.limit:
                async def read() -> None:
                    async for item in self.sftp.scandir(self.path(rel)):
                        name = os.fsdecode(item.filename)
                        if name in (".", "..") or not keep(rel, name, leftovers):
                            continue
                        listing[name] = _attrs(item.attrs)

                try:
                    await timed(read(), LIST_TIMEOUT)
                except asyncssh.SFTPNoSuchFile:
                    view.listings[rel] = None
                    return
                except asyncssh.SFTPError:
                    view.listings[rel] = GuestView.BLOCKED
                    return
            view.listings[rel] = listing

        await asyncio.gather(*(one(rel) for rel in set(rels)))
        return view

    async def read_links(self, view: GuestView, rels) -> None:
        """Fill in the targets of the guest symlinks at `rels` (those mariner may own)."""

        async def one(rel: str) -> None:
            attrs = view.get(rel)
            if attrs is None or attrs.kind != LINK:
                return
            async with self.limit:
                try:
                    target = os.fsdecode(await timed(self.sftp.readlink(self.path(rel))))
                except asyncssh.SFTPError:
                    return
            listing = view.listings[rel.rpartition("/")[0]]
            listing[rel.rpartition("/")[2]] = GuestAttrs(LINK, attrs.size, attrs.mtime,
                                                         attrs.perms, target)

        await asyncio.gather(*(one(rel) for rel in rels))

    # -- writing ---------------------------------------------------------------------------
    async def mkdir(self, rel: str, mode: int) -> None:
        async with self.limit:
            try:
                await timed(self.sftp.mkdir(self.path(rel),
                                              SFTPAttrs(permissions=mode | 0o700)))
            except asyncssh.SFTPFailure:
                attrs = await timed(self.sftp.lstat(self.path(rel)))
                if _kind(attrs) != DIR:
                    raise

    async def upload(self, entry: HostEntry, replace: bool, data: bytes | None) -> int:
        """Write one host file into place with its mode and mtime; returns the bytes sent."""
        dest = self.path(entry.rel)
        target = self.tmp_path(entry.rel) if replace else dest
        times = dict(atime=entry.atime_ns // 10**9, mtime=entry.mtime_ns // 10**9)
        async with self.limit:
            try:
                handle = await timed(self.sftp.open(target, EXCL_FLAGS,
                                                    SFTPAttrs(permissions=entry.mode),
                                                    encoding=None))
            except asyncssh.SFTPFailure:
                if replace:
                    raise
                # Something appeared there since the listing: replace it instead.
                target = self.tmp_path(entry.rel)
                replace = True
                handle = await timed(self.sftp.open(target, EXCL_FLAGS,
                                                    SFTPAttrs(permissions=entry.mode),
                                                    encoding=None))
            sent = 0
            try:
                if data is not None:
                    if data:
                        await timed(handle.write(data, 0))
                    sent = len(data)
                else:
                    with open(entry.source, "rb") as fh:
                        while True:
                            chunk = fh.read(4 * CHUNK)
                            if not chunk:
                                break
                            await timed(handle.write(chunk, sent))
                            sent += len(chunk)
                await timed(handle.setstat(SFTPAttrs(permissions=entry.mode,
                                                              **times)))
            except BaseException:
                await _quietly(handle.close())
                if target != dest:
                    await _quietly(self.sftp.remove(target))
                raise
            await timed(handle.close())
            if target != dest:
                try:
                    await timed(self.sftp.posix_rename(target, dest))
                except BaseException:
                    await _quietly(self.sftp.remove(target))
                    raise
        self.bytes_sent += sent
        return sent

    async def set_attrs(self, rel: str, mode: int, atime_ns: int, mtime_ns: int) -> None:
        attrs = SFTPAttrs(permissions=mode, atime=atime_ns // 10**9, mtime=mtime_ns // 10**9)
        async with self.limit:
            await timed(self.sftp.setstat(self.path(rel), attrs, follow_symlinks=False))

    async def symlink(self, rel: str, target: str, replace: bool) -> None:
        dest = self.path(rel)
        async with self.limit:
            if not replace:
                try:
                    await timed(self.sftp.symlink(os.fsencode(target), dest))
                    return
                except asyncssh.SFTPFailure:
                    pass
            tmp = self.tmp_path(rel)
            await timed(self.sftp.symlink(os.fsencode(target), tmp))
            try:
                await timed(self.sftp.posix_rename(tmp, dest))
            except BaseException:
                await _quietly(self.sftp.remove(tmp))
                raise

    async def remove(self, rel: str) -> None:
        async with self.limit:
            try:
                await timed(self.sftp.remove(self.path(rel)))
            except asyncssh.SFTPNoSuchFile:
                pass

    async def rmdir(self, rel: str) -> bool:
        """Remove an empty directory; False when it is not empty (the guest put files there)."""
        async with self.limit:
            try:
                await timed(self.sftp.rmdir(self.path(rel)))
            except asyncssh.SFTPNoSuchFile:
                pass
            except asyncssh.SFTPError:
                return False
        return True


async def _quietly(awaitable) -> None:
    try:
        await asyncio.wait_for(awaitable, OP_TIMEOUT)
    except (asyncssh.Error, OSError, asyncio.TimeoutError):
        pass
