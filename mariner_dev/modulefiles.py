"""What a `[nix] modules` entry may contain, and reading it without trusting it.

The attack: the project (and so `mariner.toml` and the files it names) is writable by the VM
and comes from a cloned repository. A module entry that is, or contains, `/dev/zero` made
`render` read until memory ran out; a FIFO made it wait forever; a symlink inside a module
directory pointing at `~/.aws/credentials` copied the developer's secret into the flake and
from there into the world-readable Nix store.

So an entry must be a regular file or a directory of regular files and directories. A symlink
inside a directory entry may only point at a regular file inside that same entry; devices,
FIFOs and sockets are refused. `scan` checks this with lstat alone (it never opens a file, so
a FIFO cannot block `validate`); `read` checks again while reading, opening each file without
blocking and refusing anything that is not a regular file by then. Each entry holds at most
MAX_ENTRY_BYTES in MAX_ENTRY_FILES files. Copies keep their permission bits.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

MAX_ENTRY_BYTES = 16 * 1024 * 1024
MAX_ENTRY_FILES = 2000

_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


class ModuleFileError(Exception):
    """An entry (or a file inside it) that mariner refuses to copy; str() names the path."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class ModuleFile:
    rel: str      # path inside the entry ("" for an entry that is a single file)
    source: Path  # the regular file to read (a symlink's target inside the entry)
    mode: int     # permission bits to give the copy
    size: int


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file or directory")


def _limit(files: list[ModuleFile], entry: Path) -> None:
    if len(files) > MAX_ENTRY_FILES:
        raise ModuleFileError(entry, f"holds more than {MAX_ENTRY_FILES} files; a NixOS "
                              f"module directory should hold only its Nix sources")
    total = sum(f.size for f in files)
    if total > MAX_ENTRY_BYTES:
        raise ModuleFileError(entry, f"holds {total} bytes, more than the "
                              f"{MAX_ENTRY_BYTES // (1024 * 1024)} MiB a module entry may hold")


def scan(entry: Path) -> list[ModuleFile]:
    """The files of a module entry, checked with lstat only (never opened).

    The entry itself may be a symlink (it is named in mariner.toml, and the trust gate shows
    it); what it points at is the entry's tree. Raises ModuleFileError."""
    entry = Path(entry)
    try:
        st = os.stat(entry)
    except FileNotFoundError:
        raise ModuleFileError(entry, "does not exist") from None
    except OSError as exc:
        raise ModuleFileError(entry, f"cannot be read ({exc.strerror})") from None
    if stat.S_ISREG(st.st_mode):
        files = [ModuleFile("", Path(os.path.realpath(entry)), stat.S_IMODE(st.st_mode) & 0o777,
                            st.st_size)]
        _limit(files, entry)
        return files
    if not stat.S_ISDIR(st.st_mode):
        raise ModuleFileError(entry, f"is {_kind(st.st_mode)}; a module must be a regular .nix "
                              f"file or a directory of regular files")
    root = Path(os.path.realpath(entry))
    files: list[ModuleFile] = []
    for directory, dirnames, filenames in os.walk(root, followlinks=False,
                                                  onerror=_walk_error):
        dirnames.sort()
        here = Path(directory)
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(here / d)]:
            path = here / name
            try:
                lst = os.lstat(path)
            except OSError as exc:
                raise ModuleFileError(path, f"cannot be read ({exc.strerror})") from None
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(lst.st_mode):
                source = _inside_link(path, root)
                st = os.stat(source)
                files.append(ModuleFile(rel, source, stat.S_IMODE(st.st_mode) & 0o777,
                                        st.st_size))
            elif stat.S_ISREG(lst.st_mode):
                files.append(ModuleFile(rel, path, stat.S_IMODE(lst.st_mode) & 0o777,
                                        lst.st_size))
            else:
                raise ModuleFileError(path, f"is {_kind(lst.st_mode)}; a module directory may "
                                      f"hold only regular files and directories")
            if len(files) > MAX_ENTRY_FILES:
                _limit(files, entry)
        dirnames[:] = [d for d in dirnames if not os.path.islink(here / d)]
    _limit(files, entry)
    return files


def _walk_error(exc: OSError) -> None:
    raise ModuleFileError(exc.filename or "?", f"cannot be read ({exc.strerror})")


def _inside_link(link: Path, root: Path) -> Path:
    """The regular file a symlink inside the entry points at, which must be inside it too."""
    target = Path(os.path.realpath(link))
    if not target.is_relative_to(root):
        raise ModuleFileError(link, f"is a symlink to {target}, outside the module's own "
                              f"directory {root}; copy the file into it instead")
    try:
        st = os.stat(target)
    except OSError:
        raise ModuleFileError(link, "is a dangling symlink") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)
        raise ModuleFileError(link, f"is a symlink to {what}; only symlinks to regular files "
                              f"inside the module are copied")
    return target


def read(entry: Path) -> list[tuple[str, bytes, int]]:
    """(relative path, content, mode) of every file of the entry, checked as it is read: a
    file swapped for a FIFO or a device since `scan` is refused, not waited on."""
    out: list[tuple[str, bytes, int]] = []
    budget = MAX_ENTRY_BYTES
    for item in scan(entry):
        data = _read_regular(item.source, budget)
        budget -= len(data)
        out.append((item.rel, data, item.mode))
    return out


def _read_regular(path: Path, budget: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ModuleFileError(path, f"cannot be read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModuleFileError(path, f"is {_kind(st.st_mode)}; a module must be made of "
                                  f"regular files")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, budget + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > budget:
                raise ModuleFileError(path, f"grew past the {MAX_ENTRY_BYTES // (1024 * 1024)} "
                                      f"MiB a module entry may hold")
        return b"".join(chunks)
    finally:
        os.close(fd)
