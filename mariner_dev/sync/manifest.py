"""The per-VM record of what mariner put in the guest, in MARINER_HOME/vms/<name>/.

For each path: what it was on the host when synced (size, mtime, mode, content hash) and what
the guest reported right after (size, mtime), so the next sync can tell an unchanged file from
one edited on either side, and removes in the guest only what mariner put there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

from .. import paths
from ..fsutil import LockBusy, file_lock, write_atomic
from .tree import check_rel

VERSION = 1


@dataclass
class Entry:
    kind: str                     # "file" | "dir" | "link"
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    hash: str | None = None
    guest_size: int | None = None
    guest_mtime: int | None = None
    target: str | None = None
    secret: str | None = None     # an allowed secret: what it is (re-checked against allow)
    owned: bool = True            # dirs: created by mariner (removed when empty and unlisted)

    @classmethod
    def from_json(cls, data: dict) -> "Entry":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Manifest:
    root: str | None = None       # the guest home the entries are relative to
    entries: dict[str, Entry] = field(default_factory=dict)
    repository: dict | None = None
    saved_text: str | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"version": VERSION, "root": self.root,
                "entries": {rel: dict(e.__dict__) for rel, e in sorted(self.entries.items())},
                "repository": self.repository}

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        entries = {}
        for rel, raw in (data.get("entries") or {}).items():
            # A hand-edited or corrupted manifest must never name a path outside the home.
            if isinstance(rel, str) and check_rel(rel) and isinstance(raw, dict):
                try:
                    entries[rel] = Entry.from_json(raw)
                except TypeError:
                    continue
        return cls(root=data.get("root"), entries=entries, repository=data.get("repository"))


def manifest_file(name: str) -> Path:
    return paths.vm_dir(name) / "dotfiles.json"


def load(name: str) -> Manifest:
    try:
        text = manifest_file(name).read_text()
        data = json.loads(text)
    except (FileNotFoundError, ValueError):
        return Manifest()
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return Manifest()
    manifest = Manifest.from_json(data)
    manifest.saved_text = text
    return manifest


def save(name: str, manifest: Manifest) -> None:
    """Write the manifest (atomically), unless it is what the file already holds."""
    text = json.dumps(manifest.to_json(), separators=(",", ":")) + "\n"
    if text == manifest.saved_text:
        return
    paths.ensure_private_dir(paths.vm_dir(name))
    write_atomic(manifest_file(name), text, mode=0o600)
    manifest.saved_text = text


LOCK_TIMEOUT = 120.0


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """One sync of a VM at a time (`sync`, `sync --watch`, `up` and the agent may overlap)."""
    paths.ensure_private_dir(paths.vm_dir(name))
    with file_lock(paths.vm_dir(name) / "dotfiles.lock", what=f"the dotfiles of VM {name}",
                   timeout=LOCK_TIMEOUT):
        yield


@contextlib.asynccontextmanager
async def locked_async(name: str) -> AsyncIterator[None]:
    """`locked()` for a coroutine: waiting for the lock never blocks the event loop (the agent
    keeps serving exec and forwards while `sync --watch` or `up` holds it)."""
    import errno
    import fcntl
    import os

    paths.ensure_private_dir(paths.vm_dir(name))
    fd = os.open(paths.vm_dir(name) / "dotfiles.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise LockBusy(f"timed out waiting for the dotfiles of VM {name}")
            await asyncio.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
