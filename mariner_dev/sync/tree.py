"""The host side of a dotfiles sync: what `[dotfiles] files` holds right now, checked.

Every entry is named by its path relative to ~ ('/'-separated, each component checked), which
is also its place under the guest user's home. A configured entry that is itself a symlink is
followed (the user named it); inside a synced directory a symlink is kept only when it resolves
inside the synced tree, and is reported and skipped otherwise.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .credentials import display, secret_by_name

FILE, DIR, LINK = "file", "dir", "link"


def check_name(name: str) -> bool:
    """True for a path component that cannot climb, jump or vanish: never '', '.', '..', '/'."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def check_rel(rel: str) -> bool:
    """True for a relative path made only of safe components (so it stays under its root)."""
    return bool(rel) and all(check_name(part) for part in rel.split("/"))


def parent(rel: str) -> str:
    return rel.rpartition("/")[0]


def ancestors(rel: str) -> list[str]:
    """The proper ancestors of `rel`, outermost first, ending with its parent ('' is ~)."""
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts))]


def under(rel: str, top: str) -> bool:
    """True when `rel` is `top` or inside it ('' contains everything)."""
    return not top or rel == top or rel.startswith(top + "/")


@dataclass(frozen=True)
class Root:
    """One `[dotfiles] files` entry: its place under ~ and the real host path it is read from."""

    rel: str
    source: str


@dataclass
class HostEntry:
    rel: str
    kind: str                 # FILE | DIR | LINK
    source: str = ""          # host path to read (files)
    mode: int = 0             # permission bits
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    target: str | None = None  # links: the target as written in the guest (relative)


@dataclass
class HostScan:
    entries: dict[str, HostEntry] = field(default_factory=dict)
    ancestors: dict[str, int] = field(default_factory=dict)  # rel -> host mode, above a root
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (rel, what)
    missing_roots: list[str] = field(default_factory=list)


class AllowList:
    """`[dotfiles] allow`: paths (files or directories) whose secrets may be synced."""

    def __init__(self, allowed: list[str]):
        self.allowed = [a for a in allowed if a]

    @classmethod
    def from_paths(cls, paths: tuple[Path, ...] | list[Path], home: Path) -> "AllowList":
        out = []
        for path in paths:
            rel = _rel_to(str(path), str(home))
            if rel:
                out.append(rel)
        return cls(out)

    def allows(self, *rels: str | None) -> bool:
        return any(rel is not None and under(rel, a) for rel in rels for a in self.allowed)


def _rel_to(path: str, home: str) -> str | None:
    path, home = os.path.normpath(path), os.path.normpath(home)
    if path == home or not path.startswith(home.rstrip("/") + "/"):
        return None
    rel = path[len(home.rstrip("/")) + 1:]
    return rel if check_rel(rel) else None


def roots_for(files, home: Path) -> tuple[list[Root], list[tuple[str, str]]]:
    """The configured entries as roots; problems are (path, reason) for entries not usable."""
    roots: list[Root] = []
    problems: list[tuple[str, str]] = []
    home_s = str(home)
    for path in files:
        rel = _rel_to(str(path), home_s)
        if rel is None:
            problems.append((str(path), "not a path under your home directory"))
            continue
        roots.append(Root(rel=rel, source=os.path.realpath(os.path.join(home_s, rel))))
    # A root inside another root is already covered by it.
    roots.sort(key=lambda r: r.rel)
    kept: list[Root] = []
    for root in roots:
        if not any(under(root.rel, k.rel) for k in kept):
            kept.append(root)
    return kept, problems


def root_of(rel: str, roots: list[Root]) -> Root | None:
    return next((r for r in roots if under(rel, r.rel)), None)


def host_path(rel: str, root: Root) -> str:
    return root.source + rel[len(root.rel):]


class Scanner:
    """Walks the roots (or parts of them) on the host."""

    def __init__(self, roots: list[Root], home: Path, allow: AllowList):
        self.roots = roots
        self.home = str(home)
        self.allow = allow

    def scan(self, scopes: list[str] | None = None) -> HostScan:
        """Entries under `scopes` (rels inside roots; default: every root)."""
        result = HostScan()
        for root in self.roots:
            for rel in ancestors(root.rel)[1:]:
                try:
                    result.ancestors[rel] = stat.S_IMODE(os.stat(os.path.join(self.home, rel)).st_mode)
                except OSError:
                    result.ancestors[rel] = 0o755
        for scope in normalize_scopes(scopes if scopes is not None
                                      else [r.rel for r in self.roots]):
            root = root_of(scope, self.roots)
            if root is None:
                continue
            path = host_path(scope, root)
            try:
                st = os.stat(path) if scope == root.rel else os.lstat(path)
            except FileNotFoundError:
                if scope == root.rel:
                    result.missing_roots.append(scope)
                continue
            except OSError as exc:
                result.skipped.append((scope, f"cannot read it ({exc.strerror})"))
                continue
            if scope != root.rel:
                # The scope's parents must still be real directories on the host.
                real_parent = os.path.realpath(os.path.dirname(path))
                if real_parent != os.path.dirname(path):
                    continue
            self._add(result, scope, path, st, root)
        return result

    def _add(self, result: HostScan, rel: str, path: str, st: os.stat_result, root: Root) -> None:
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            self._add_link(result, rel, path, st)
        elif stat.S_ISREG(mode):
            what = self.secret_name(rel, path)
            if what is not None:
                result.refused.append((rel, what))
                return
            result.entries[rel] = HostEntry(rel, FILE, source=path, mode=stat.S_IMODE(mode),
                                            size=st.st_size, mtime_ns=st.st_mtime_ns,
                                            atime_ns=st.st_atime_ns)
        elif stat.S_ISDIR(mode):
            result.entries[rel] = HostEntry(rel, DIR, source=path, mode=stat.S_IMODE(mode),
                                            mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns)
            try:
                children = list(os.scandir(path))
            except OSError as exc:
                result.skipped.append((rel, f"cannot list it ({exc.strerror})"))
                return
            for child in children:
                name = child.name
                if not check_name(name):
                    result.skipped.append((rel + "/" + name, "an unsafe name"))
                    continue
                try:
                    child_st = child.stat(follow_symlinks=False)
                except OSError as exc:
                    result.skipped.append((rel + "/" + name, f"cannot read it ({exc.strerror})"))
                    continue
                self._add(result, rel + "/" + name, child.path, child_st, root)
        else:
            result.skipped.append((rel, "not a regular file, directory or symlink"))

    def _add_link(self, result: HostScan, rel: str, path: str, st: os.stat_result) -> None:
        try:
            target = os.readlink(path)
        except OSError as exc:
            result.skipped.append((rel, f"cannot read the symlink ({exc.strerror})"))
            return
        resolved = os.path.realpath(os.path.join(os.path.dirname(path), target))
        guest_target = None
        for root in self.roots:
            if resolved == root.source or resolved.startswith(root.source.rstrip("/") + "/"):
                guest_target = root.rel + resolved[len(root.source):]
                break
        if guest_target is None or not check_rel(guest_target):
            result.skipped.append((rel, f"a symlink to {display(target)}, outside the synced "
                                        f"files"))
            return
        what = self.secret_name(guest_target, resolved)
        if what is not None:
            result.refused.append((rel, what))
            return
        relative = posixpath.relpath(guest_target, parent(rel) or ".")
        result.entries[rel] = HostEntry(rel, LINK, source=path, mode=0o777,
                                        mtime_ns=st.st_mtime_ns, target=relative)

    def secret_name(self, rel: str, real: str) -> str | None:
        """What makes `rel` a secret (by its place), unless [dotfiles] allow lets it through."""
        real_rel = _rel_to(real, self.home)
        what = secret_by_name(rel) or (secret_by_name(real_rel) if real_rel else None)
        if what is None or self.allow.allows(rel, real_rel):
            return None
        return what


def normalize_scopes(scopes) -> list[str]:
    """Scopes sorted, each dropped when an outer scope already covers it."""
    kept: list[str] = []
    for scope in sorted(set(scopes)):
        if not any(under(scope, k) for k in kept):
            kept.append(scope)
    return kept
