"""Dotfiles sync: `[dotfiles] files` over SFTP, the dotfiles repository, `--watch`.

Importing this package is cheap (no asyncssh): the heavy modules load when a sync runs.

Entry points:
    sync_dotfiles(cfg, record)            `up`: first boot and after a rebuild (installs again)
    sync_once(cfg, record, dry_run=...)   `mariner sync` on a connection of its own
    sync_over(conn, spec, ...)            on a connection someone already holds (the agent)
    spec_request(cfg) / outcome(report)   what a client sends the agent / what it gets back
    watch(cfg, record, out)               `mariner sync --watch`
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .engine import SyncReport, SyncSpec


def running_vm(cfg):
    """The registry record of the project's VM, or a one-line error saying to run `mariner up`.

    Cheap: a TCP connect to the guest's SSH port, no SSH session.
    """
    from ..errors import MarinerError, OwnershipError
    from ..remote.target import target_for, tcp_reachable
    from ..state import Registry

    record = Registry().get(cfg.name)
    if record is None or not record.created:
        raise MarinerError(f"VM {cfg.name} does not exist yet; run `mariner up` first")
    if record.project != str(cfg.project_dir):
        raise OwnershipError(f"VM {cfg.name!r} belongs to the project {record.project}, not "
                             f"{cfg.project_dir}; set a different [vm] name", exit_code=2)
    target = target_for(cfg, record)
    if not tcp_reachable(target, timeout=1.0):
        raise MarinerError(f"VM {cfg.name} is not running (nothing answers on "
                           f"{target.describe()}); run `mariner up`")
    return record


def spec_for(cfg, guest_root: str | None = None):
    """The resolved sync spec of a project (see engine.SyncSpec)."""
    from .engine import spec_for as _spec_for

    return _spec_for(cfg, guest_root)


def spec_request(cfg, guest_root: str | None = None) -> dict:
    """The sync spec of a project as plain JSON (engine.spec_from_request turns it back), for
    the agent to sync for a client: the host home travels along, since the agent may have been
    started from another environment."""
    from pathlib import Path

    settings = cfg.dotfiles
    return {"name": cfg.name, "home": str(Path.home()),
            "files": [str(p) for p in settings.files], "allow": [str(p) for p in settings.allow],
            "repository": settings.repository, "install": settings.install,
            "target": settings.target, "timeout": settings.timeout, "guest_root": guest_root}


def outcome(report: "SyncReport") -> dict:
    """What `mariner sync` shows of a report, as JSON (the agent sends it to the CLI):
    `report` (--json), `lines` (stdout), `warnings` and `summary` (stderr)."""
    return {"report": report.to_json(), "lines": report.lines(), "warnings": report.warnings,
            "summary": report.summary()}


def config_fingerprint(cfg) -> str:
    """The `[dotfiles]` settings' fingerprint; `up` may re-sync when the stored one differs."""
    from .engine import config_fingerprint as _fp

    return _fp(cfg)


async def sync_over(conn, spec: "SyncSpec", **kwargs) -> "SyncReport":
    """One sync pass over an already open asyncssh connection (see engine.sync_over)."""
    from .engine import sync_over as _sync_over

    return await _sync_over(conn, spec, **kwargs)


def _quiet_orphaned_sftp_tasks() -> None:
    """asyncssh's parallel SFTP transfer tasks that lose the connection when a sync is cut
    short (Ctrl-C, SIGTERM) end with an error nobody awaits, which asyncio would print as a
    traceback at exit; the interruption itself is reported once by the caller."""
    import asyncio

    import asyncssh

    loop = asyncio.get_running_loop()

    def handler(loop, context):
        if isinstance(context.get("exception"), (asyncssh.Error, ConnectionError)):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _connect_and_sync(target, spec, **kwargs) -> "SyncReport":
    from ..remote.session import connect
    from .engine import sync_over as _sync_over

    _quiet_orphaned_sftp_tasks()
    conn = await connect(target)
    try:
        return await _sync_over(conn, spec, **kwargs)
    finally:
        conn.close()
        await conn.wait_closed()


def sync_once(cfg, record, *, dry_run: bool = False, install: bool = False,
              guest_root: str | None = None) -> "SyncReport":
    """Connect to the VM and sync its dotfiles now (`mariner sync`)."""
    from ..remote.target import target_for
    from .engine import spec_for as _spec_for

    import asyncio

    target = target_for(cfg, record)
    spec = _spec_for(cfg, guest_root)
    return asyncio.run(_connect_and_sync(target, spec, dry_run=dry_run, install=install))


def sync_dotfiles(cfg, record, *, guest_root: str | None = None) -> "SyncReport":
    """`up`'s sync at first boot and after a rebuild: files, then clone/update and install.

    `report.fingerprint` is the `[dotfiles]` settings' fingerprint (config_fingerprint);
    `report.warnings` lists refused secrets and skipped files, one line each.
    """
    return sync_once(cfg, record, install=True, guest_root=guest_root)


def watch(cfg, record, out: Callable[[str], None], *, guest_root: str | None = None,
          ready: Callable[[], None] | None = None) -> None:
    """Watch the host files and sync each burst of changes until SIGINT/SIGTERM."""
    from .watch import run_watch

    run_watch(cfg, record, out, guest_root=guest_root, ready=ready)
