"""Deciding what a sync does: host tree vs the manifest vs what the guest reports (pure).

The guest is compared on its own size and mtime (SFTP's whole seconds) against what the
manifest recorded after the last write, so a file edited or deleted in the guest is restored
even when the host did not change. mariner never writes through a guest path that is not a
real directory, and removes only what its manifest says it put there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .manifest import Entry, Manifest
from .tree import DIR, FILE, LINK, HostEntry, HostScan, Root, ancestors, check_rel, parent, under

# Temporary names mariner writes before renaming into place; left over only after a crash.
TMP_NAME = re.compile(r"\.~mariner-[0-9a-f]{16}\.tmp")


@dataclass(frozen=True)
class GuestAttrs:
    kind: str               # FILE | DIR | LINK | "other"
    size: int = 0
    mtime: int = 0          # whole seconds
    perms: int = 0
    target: str | None = None


class GuestView:
    """Listings of guest directories, by rel ('' is the guest home). None: does not exist."""

    BLOCKED = "blocked"

    def __init__(self, listings: dict[str, dict[str, GuestAttrs] | None | str] | None = None):
        self.listings = listings or {}

    def get(self, rel: str) -> GuestAttrs | None:
        listing = self.listings.get(parent(rel))
        if not isinstance(listing, dict):
            return None
        return listing.get(rel.rpartition("/")[2])

    def forget(self, rel: str) -> None:
        """The plan removes what is at `rel`: from now on it counts as missing."""
        listing = self.listings.get(parent(rel))
        if isinstance(listing, dict):
            listing.pop(rel.rpartition("/")[2], None)
        self.listings.pop(rel, None)

    def dir_state(self, rel: str) -> tuple[str, str | None]:
        """("dir"|"missing"|"blocked", the blocking rel): may mariner write inside `rel`?"""
        if rel == "":
            return ("dir", None) if isinstance(self.listings.get(""), dict) else ("blocked", "")
        state, where = self.dir_state(parent(rel))
        if state != "dir":
            return state, where
        attrs = self.get(rel)
        if attrs is None:
            return "missing", None
        if attrs.kind != DIR or self.listings.get(rel) == self.BLOCKED:
            return "blocked", rel
        return "dir", None


@dataclass
class Inspection:
    """A host file read for this sync: its hash, and whether its content is a private key."""

    hash: str
    secret: str | None = None
    data: bytes | None = None


@dataclass
class Action:
    op: str                 # mkdir | upload | attrs | symlink | remove | rmdir | dirattrs
    rel: str
    reason: str = ""        # added | updated | restored | touched | mode | removed | linked
    entry: HostEntry | None = None
    replace: bool = False   # upload/symlink: something is at the destination already
    hash: str | None = None
    secret: str | None = None
    report: bool = True


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)        # manifest entries to forget
    keep_dirs: dict[str, Entry] = field(default_factory=dict)  # ancestors mariner owns

    def of(self, *ops: str) -> list[Action]:
        return [a for a in self.actions if a.op in ops]


def make_plan(scan: HostScan, inspected: dict[str, Inspection], guest: GuestView,
              manifest: Manifest, roots: list[Root], scopes: list[str] | None) -> Plan:
    """The actions that bring the guest in line with the host for `scopes` (None: everything)."""
    plan = Plan()
    blocked: set[str] = set()

    def writable(rel: str) -> bool:
        state, where = guest.dir_state(parent(rel))
        if state == "blocked":
            if where not in blocked:
                blocked.add(where)
                shown = f"~/{where}" if where else "the guest home"
                plan.skipped.append((where or "", f"{shown} is not a directory in the guest "
                                                  f"(mariner does not write through it)"))
            return False
        return True

    # Directories between ~ and each root: created when missing, owned when mariner made them.
    made: set[str] = set()
    for root in roots:
        if scopes is not None and not any(under(s, root.rel) for s in scopes):
            continue
        for rel in ancestors(root.rel)[1:]:
            if rel in made or not writable(rel):
                continue
            attrs = guest.get(rel) if guest.dir_state(parent(rel))[0] == "dir" else None
            mine = manifest.entries.get(rel)
            if attrs is None:
                plan.actions.append(Action("mkdir", rel, entry=HostEntry(
                    rel, DIR, mode=scan.ancestors.get(rel, 0o755)), report=False))
                plan.keep_dirs[rel] = Entry(DIR, mode=scan.ancestors.get(rel, 0o755))
                made.add(rel)
            elif mine is not None and mine.kind == DIR:
                plan.keep_dirs[rel] = mine

    entries = scan.entries
    for rel in sorted(entries):
        host = entries[rel]
        if not writable(rel):
            continue
        attrs = guest.get(rel)
        mine = manifest.entries.get(rel)
        if attrs is not None and attrs.kind != DIR and host.kind == DIR \
                and mine is not None and mine.kind in (FILE, LINK):
            plan.actions.append(Action("remove", rel, report=False))
            guest.forget(rel)
            attrs = None
        if host.kind == DIR:
            _plan_dir(plan, host, attrs, mine)
        elif host.kind == FILE:
            _plan_file(plan, host, attrs, mine, inspected.get(rel))
        else:
            _plan_link(plan, host, attrs, mine)

    # What mariner put in the guest and the host no longer has (or no longer lets through).
    for rel in sorted(manifest.entries, reverse=True):
        if rel in entries or rel in plan.keep_dirs:
            continue
        if scopes is not None and not any(under(rel, s) for s in scopes):
            continue
        if scopes is None and any(under(r.rel, rel) for r in roots):
            # An ancestor of a current root that mariner did not create this time: keep it.
            plan.keep_dirs[rel] = manifest.entries[rel]
            continue
        mine = manifest.entries[rel]
        plan.drop.append(rel)
        if guest.dir_state(parent(rel))[0] != "dir":
            continue
        attrs = guest.get(rel)
        if attrs is None:
            continue
        if mine.kind in (FILE, LINK) and attrs.kind in (FILE, LINK):
            plan.actions.append(Action("remove", rel, reason="removed"))
        elif mine.kind == DIR and mine.owned and attrs.kind == DIR:
            plan.actions.append(Action("rmdir", rel, reason="removed", report=False))
    # Leftovers of an interrupted sync, in directories mariner syncs.
    for dir_rel, listing in guest.listings.items():
        if isinstance(listing, dict) and (dir_rel in entries or dir_rel in plan.keep_dirs):
            for name in listing:
                if TMP_NAME.fullmatch(name) and guest.dir_state(dir_rel)[0] == "dir":
                    rel = f"{dir_rel}/{name}" if dir_rel else name
                    plan.actions.append(Action("remove", rel, report=False))
    for action in plan.actions:
        assert check_rel(action.rel), action.rel
    return plan


def _plan_dir(plan: Plan, host: HostEntry, attrs: GuestAttrs | None, mine: Entry | None) -> None:
    rel = host.rel
    if attrs is None:
        plan.actions.append(Action("mkdir", rel, entry=host, report=False))
        plan.actions.append(Action("dirattrs", rel, entry=host, report=False))
        return
    if attrs.kind != DIR:
        plan.skipped.append((rel, "the guest has a file where this directory goes"))
        return
    if attrs.perms != host.mode or attrs.mtime != host.mtime_ns // 10**9:
        plan.actions.append(Action("dirattrs", rel, entry=host, report=False))


def _plan_file(plan: Plan, host: HostEntry, attrs: GuestAttrs | None, mine: Entry | None,
               seen: Inspection | None) -> None:
    rel = host.rel
    if attrs is not None and attrs.kind == DIR:
        if mine is not None and mine.kind == DIR and mine.owned:
            plan.actions.append(Action("rmdir", rel, report=False))
            attrs = None
        else:
            plan.skipped.append((rel, "the guest has a directory where this file goes"))
            return
    ours = mine is not None and mine.kind == FILE
    host_same = ours and (mine.size, mine.mtime_ns) == (host.size, host.mtime_ns)
    content_hash = mine.hash if host_same else (seen.hash if seen else None)
    content_same = ours and content_hash is not None and content_hash == mine.hash
    guest_same = ours and attrs is not None and attrs.kind == FILE \
        and (attrs.size, attrs.mtime) == (mine.guest_size, mine.guest_mtime)
    secret = seen.secret if seen is not None else (mine.secret if mine else None)
    replace = attrs is not None
    if not ours:
        plan.actions.append(Action("upload", rel, "added", host, replace, content_hash, secret))
    elif not content_same:
        plan.actions.append(Action("upload", rel, "updated", host, replace, content_hash, secret))
    elif not guest_same:
        plan.actions.append(Action("upload", rel, "restored", host, replace, content_hash, secret))
    elif not host_same or attrs.perms != host.mode or mine.mode != host.mode:
        reason = "mode" if attrs.perms != host.mode or mine.mode != host.mode else "touched"
        plan.actions.append(Action("attrs", rel, reason, host, True, content_hash, secret))


def _plan_link(plan: Plan, host: HostEntry, attrs: GuestAttrs | None, mine: Entry | None) -> None:
    rel = host.rel
    if attrs is not None and attrs.kind == DIR:
        plan.skipped.append((rel, "the guest has a directory where this symlink goes"))
        return
    if attrs is not None and attrs.kind == LINK and attrs.target == host.target:
        return
    reason = "linked" if mine is None or mine.kind != LINK or mine.target != host.target \
        else "restored"
    plan.actions.append(Action("symlink", rel, reason, host, attrs is not None))
