"""One sync pass over an open SSH connection: scan, compare, apply, remember.

Used by `mariner sync`, `sync --watch` (one pass per folded burst of changes, on a held
connection), `mariner up` (through `sync_dotfiles`) and the per-VM agent (`sync_over` on the
connection it already holds, so a no-change resync costs no new SSH connection).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from ..errors import GuestUnreachable, MarinerError
from . import manifest as manifest_mod
from .coalesce import open_sftp
from .credentials import HEADER_OVERLAP, display, refusal, secret_by_content
from .guest import GuestTree
from .manifest import Entry, Manifest
from .plan import Action, Inspection, make_plan
from .repository import RepositorySettings, ensure_repository
from .tree import DIR, FILE, LINK, AllowList, HostScan, Root, Scanner, ancestors, normalize_scopes, \
    parent, roots_for, under

KEEP_IN_MEMORY = 1024 * 1024          # files up to this size are read once, kept for upload
MEMORY_BUDGET = 64 * 1024 * 1024


class SyncError(MarinerError):
    """The sync could not finish (the guest refused a write, the repository install failed)."""


@dataclass(frozen=True)
class SyncSpec:
    """What to sync for one VM, resolved from its `[dotfiles]` table."""

    name: str
    home: Path
    roots: tuple[Root, ...]
    allow: AllowList
    problems: tuple[tuple[str, str], ...] = ()
    repository: RepositorySettings | None = None
    guest_root: str | None = None   # the guest directory standing for ~ (default: the home)

    @property
    def fingerprint(self) -> str:
        """Changes whenever the `[dotfiles]` settings do."""
        data = {"roots": [r.rel for r in self.roots], "allow": self.allow.allowed,
                "repository": self.repository.fingerprint if self.repository else None}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def spec_for(cfg, guest_root: str | None = None, home: Path | None = None) -> SyncSpec:
    """The sync spec of a project's config (home: the host home the paths are under)."""
    return _spec(cfg.name, cfg.dotfiles, guest_root, home or Path.home())


def _spec(name: str, settings, guest_root: str | None, home: Path) -> SyncSpec:
    roots, problems = roots_for(settings.files, home)
    repo = None
    if settings.repository:
        repo = RepositorySettings(url=settings.repository, install=settings.install,
                                  target=settings.target, timeout=settings.timeout)
    return SyncSpec(name=name, home=home, roots=tuple(roots),
                    allow=AllowList.from_paths(settings.allow, home),
                    problems=tuple(problems), repository=repo, guest_root=guest_root)


def spec_from_request(data: dict) -> SyncSpec:
    """The spec that `sync.spec_request()` describes (the agent syncs for its clients)."""
    from ..model import DotfilesSettings

    settings = DotfilesSettings(files=tuple(Path(p) for p in data["files"]),
                                allow=tuple(Path(p) for p in data["allow"]),
                                repository=data.get("repository"), install=data.get("install"),
                                target=data["target"], timeout=int(data.get("timeout") or 600))
    return _spec(data["name"], settings, data.get("guest_root"), Path(data["home"]))


def config_fingerprint(cfg) -> str:
    """The fingerprint `up` stores: a different value means the dotfiles settings changed."""
    return spec_for(cfg).fingerprint


@dataclass
class Change:
    action: str              # added | updated | restored | touched | mode | linked | removed
    rel: str
    size: int = 0

    def line(self, dry_run: bool = False) -> str:
        size = f" ({_human(self.size)})" if self.action in ("added", "updated", "restored") \
            else ""
        prefix = "would be " if dry_run else ""
        return f"{prefix}{self.action:<8} ~/{display(self.rel)}{size}"


@dataclass
class SyncReport:
    """What one sync did (or, dry, would do)."""

    changes: list[Change] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)   # (rel, message)
    repository: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    checked: int = 0
    fingerprint: str = ""
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def warnings(self) -> list[str]:
        """Refused secrets and skipped files, one line each (`up` shows these)."""
        out = [message for _, message in self.refused]
        out += [f"skipped ~/{display(rel)}: {why}" if rel else f"skipped: {why}"
                for rel, why in self.skipped]
        return out

    def lines(self) -> list[str]:
        return [c.line(self.dry_run) for c in self.changes] + self.repository

    def summary(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        n = len(self.changes)
        return (f"{self.checked} paths checked, {n} {verb}, {_human(self.bytes_sent)} sent"
                f" in {self.seconds:.2f} s")

    def to_json(self) -> dict:
        return {"changes": [{"action": c.action, "path": "~/" + c.rel, "size": c.size}
                            for c in self.changes],
                "skipped": [{"path": "~/" + r, "reason": w} for r, w in self.skipped],
                "refused": [{"path": "~/" + r, "message": m} for r, m in self.refused],
                "repository": self.repository, "bytes_sent": self.bytes_sent,
                "checked": self.checked, "dry_run": self.dry_run,
                "fingerprint": self.fingerprint, "seconds": round(self.seconds, 3)}


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def inspect(path: str, size: int, keep: bool) -> Inspection:
    """Hash a host file and look for a private-key header, reading it once."""
    digest = hashlib.sha256()
    secret = None
    tail = b""
    kept = [] if keep else None
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1024 * 1024)
            if not chunk:
                break
            digest.update(chunk)
            if secret is None:
                secret = secret_by_content(tail + chunk)
                tail = chunk[-HEADER_OVERLAP:]
            if kept is not None:
                kept.append(chunk)
    data = b"".join(kept) if kept is not None else None
    return Inspection(hash=digest.hexdigest(), secret=secret, data=data)


def _inspect_changed(scan: HostScan, manifest: Manifest, spec: SyncSpec) -> dict[str, Inspection]:
    """Read the host files that differ from the manifest; refuse those holding a private key."""
    out: dict[str, Inspection] = {}
    budget = MEMORY_BUDGET
    for rel, entry in list(scan.entries.items()):
        if entry.kind != FILE:
            continue
        mine = manifest.entries.get(rel)
        if mine is not None and mine.kind == FILE \
                and (mine.size, mine.mtime_ns) == (entry.size, entry.mtime_ns):
            if mine.secret and not spec.allow.allows(rel):
                scan.refused.append((rel, mine.secret))
                del scan.entries[rel]
            continue
        keep = entry.size <= KEEP_IN_MEMORY and budget >= entry.size
        try:
            seen = inspect(entry.source, entry.size, keep)
        except OSError as exc:
            scan.skipped.append((rel, f"cannot read it ({exc.strerror})"))
            del scan.entries[rel]
            continue
        if seen.data is not None:
            budget -= len(seen.data)
        if seen.secret and not spec.allow.allows(rel):
            scan.refused.append((rel, seen.secret))
            del scan.entries[rel]
            continue
        out[rel] = seen
    return out


def _dirs_to_list(scan: HostScan, manifest: Manifest, spec: SyncSpec,
                  scopes: list[str] | None) -> set[str]:
    dirs = {""}
    for root in spec.roots:
        dirs.update(ancestors(root.rel))
    for rel, entry in scan.entries.items():
        dirs.update(ancestors(rel))
        if entry.kind == DIR:
            dirs.add(rel)
    for rel, entry in manifest.entries.items():
        if scopes is None or any(under(rel, s) for s in scopes):
            dirs.update(ancestors(rel))
            if entry.kind == DIR:
                dirs.add(rel)
    return dirs


async def guest_home(sftp: asyncssh.SFTPClient, spec: SyncSpec) -> bytes:
    if spec.guest_root:
        return os.fsencode(spec.guest_root)
    from .guest import timed

    return await timed(sftp.realpath(b"."))


async def sync_over(conn: asyncssh.SSHClientConnection, spec: SyncSpec, *,
                    scopes: list[str] | None = None, dry_run: bool = False,
                    install: bool = False, sftp: asyncssh.SFTPClient | None = None) -> SyncReport:
    """Sync `spec` into the guest over `conn` (all roots, or only `scopes`, rels under them).

    `install=True` re-runs the dotfiles repository's install even when its settings did not
    change (`up` after a rebuild). Raises GuestUnreachable when the connection drops.
    """
    try:
        if sftp is not None:
            return await _sync(conn, sftp, spec, scopes, dry_run, install)
        own = await open_sftp(conn)
        try:
            return await _sync(conn, own, spec, scopes, dry_run, install)
        finally:
            own.exit()
    except (asyncssh.ConnectionLost, asyncssh.DisconnectError, asyncssh.ChannelOpenError,
            ConnectionError, BrokenPipeError) as exc:
        raise GuestUnreachable(f"lost the connection to VM {spec.name} during the sync "
                               f"({exc.__class__.__name__}: {exc})") from None


async def _sync(conn, sftp, spec: SyncSpec, scopes: list[str] | None, dry_run: bool,
                install: bool) -> SyncReport:
    started = time.monotonic()
    report = SyncReport(dry_run=dry_run, fingerprint=spec.fingerprint)
    report.skipped.extend((path, why) for path, why in spec.problems)
    scopes = normalize_scopes(scopes) if scopes is not None else None
    loop = asyncio.get_running_loop()
    async with manifest_mod.locked_async(spec.name):
        root = await guest_home(sftp, spec)
        manifest = manifest_mod.load(spec.name)
        if manifest.root is not None and manifest.root != os.fsdecode(root):
            manifest = Manifest(repository=manifest.repository)
        manifest.root = os.fsdecode(root)
        tree = GuestTree(sftp, root)
        scanner = Scanner(list(spec.roots), spec.home, spec.allow)

        def scan_and_read():
            scan = scanner.scan(scopes)
            return scan, _inspect_changed(scan, manifest, spec)

        # Reading the host and listing the guest overlap: one waits on disks, one on the wire.
        scan, inspected = await loop.run_in_executor(None, scan_and_read)
        dirs = _dirs_to_list(scan, manifest, spec, scopes)
        wanted = dirs | scan.entries.keys() | manifest.entries.keys() \
            | {root.rel for root in spec.roots}
        view = await tree.list_dirs(dirs, wanted)
        links = [rel for rel, e in scan.entries.items() if e.kind == LINK]
        await tree.read_links(view, links)
        plan = make_plan(scan, inspected, view, manifest, list(spec.roots), scopes)
        report.checked = len(scan.entries)
        report.skipped.extend(plan.skipped)
        report.skipped.extend(scan.skipped)
        report.skipped.extend((rel, "not found on the host") for rel in scan.missing_roots)
        report.refused.extend((rel, refusal(rel, what)) for rel, what in scan.refused)
        failures: list[str] = []
        if dry_run:
            report.changes = [Change(a.reason, a.rel, a.entry.size if a.entry else 0)
                              for a in plan.actions if a.report]
        else:
            failures = await _apply(tree, plan, inspected, manifest, scan, report)
            report.bytes_sent = tree.bytes_sent
        if spec.repository is not None and scopes is None:
            state, lines = await ensure_repository(
                conn, spec.repository, os.fsdecode(root), manifest.repository,
                force=install, dry_run=dry_run, explicit_root=spec.guest_root is not None)
            report.repository = lines
            if not dry_run:
                manifest.repository = state
        if not dry_run:
            manifest_mod.save(spec.name, manifest)
    report.seconds = time.monotonic() - started
    if failures:
        raise SyncError(f"the guest refused {len(failures)} change(s): "
                        + "; ".join(failures[:5]),
                        hint="what did get through is recorded; fix the guest side and run "
                             "`mariner sync` again")
    return report


async def _apply(tree: GuestTree, plan, inspected: dict[str, Inspection], manifest: Manifest,
                 scan: HostScan, report: SyncReport) -> list[str]:
    """Carry out `plan`, recording in the manifest each change that succeeded."""
    entries = manifest.entries
    failures: list[str] = []

    async def run(action: Action, coro) -> bool:
        try:
            await coro
            return True
        except asyncssh.SFTPError as exc:
            failures.append(f"~/{display(action.rel)}: {exc.reason or exc}")
            return False

    def record_change(action: Action, size: int = 0) -> None:
        if action.report:
            report.changes.append(Change(action.reason, action.rel, size))

    # 1. Removals, deepest first (a file turned directory loses its file first).
    for action in sorted(plan.of("remove", "rmdir"), key=lambda a: a.rel.count("/"),
                         reverse=True):
        if action.op == "remove":
            ok = await run(action, tree.remove(action.rel))
        else:
            ok = await tree.rmdir(action.rel)
        if ok:
            entries.pop(action.rel, None)
            record_change(action)
    for rel in plan.drop:
        entries.pop(rel, None)
    # 2. Directories, outermost first.
    mkdirs = plan.of("mkdir")
    for depth in sorted({a.rel.count("/") for a in mkdirs}):
        level = [a for a in mkdirs if a.rel.count("/") == depth]
        results = await asyncio.gather(*(run(a, tree.mkdir(a.rel, a.entry.mode)) for a in level))
        for action, ok in zip(level, results):
            if ok:
                entries[action.rel] = Entry(DIR, mode=action.entry.mode, owned=True)
    failed_dirs = {a.rel for a in mkdirs if a.rel not in entries}

    def blocked(rel: str) -> bool:
        return any(under(rel, d) for d in failed_dirs)

    # 3. Files, symlinks and attributes, all in flight at once.
    async def do(action: Action) -> None:
        host = action.entry
        if action.op == "upload":
            seen = inspected.get(action.rel)
            data = seen.data if seen is not None else None
            ok = await run(action, tree.upload(host, action.replace, data))
            if ok:
                entries[action.rel] = _file_entry(host, action)
                record_change(action, host.size)
        elif action.op == "attrs":
            ok = await run(action, tree.set_attrs(action.rel, host.mode, host.atime_ns,
                                                  host.mtime_ns))
            if ok:
                entries[action.rel] = _file_entry(host, action)
                record_change(action)
        elif action.op == "symlink":
            ok = await run(action, tree.symlink(action.rel, host.target, action.replace))
            if ok:
                entries[action.rel] = Entry(LINK, target=host.target)
                record_change(action)

    work = [a for a in plan.of("upload", "attrs", "symlink") if not blocked(a.rel)]
    await asyncio.gather(*(do(a) for a in work))
    # 4. Directory modes and mtimes, deepest first (writing inside a directory changes its mtime).
    for action in sorted(plan.of("dirattrs"), key=lambda a: a.rel.count("/"), reverse=True):
        if blocked(action.rel):
            continue
        host = action.entry
        if await run(action, tree.set_attrs(action.rel, host.mode, host.atime_ns,
                                            host.mtime_ns)):
            prev = entries.get(action.rel)
            entries[action.rel] = Entry(DIR, mode=host.mode, mtime_ns=host.mtime_ns,
                                        owned=prev.owned if prev else False)
    # Everything in sync that the manifest does not know yet (e.g. a lost manifest).
    for rel, host in scan.entries.items():
        if rel not in entries and host.kind == DIR and not blocked(rel):
            entries[rel] = Entry(DIR, mode=host.mode, mtime_ns=host.mtime_ns, owned=False)
        elif rel not in entries and host.kind == LINK and not blocked(rel) \
                and rel not in {a.rel for a in work}:
            entries[rel] = Entry(LINK, target=host.target)
    for rel, entry in plan.keep_dirs.items():
        entries.setdefault(rel, entry)
    return failures


def _file_entry(host, action: Action) -> Entry:
    return Entry(FILE, size=host.size, mtime_ns=host.mtime_ns, mode=host.mode, hash=action.hash,
                 guest_size=host.size, guest_mtime=host.mtime_ns // 10**9, secret=action.secret)
