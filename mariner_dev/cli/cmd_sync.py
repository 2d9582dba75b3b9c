from __future__ import annotations

import sys
from typing import Annotated

import typer

from .app import JsonOpt, ProjectOpt, app, context


def _say(line: str) -> None:
    """One line about the sync (file names: escaped, they may come from a repository)."""
    from ..termsafe import printable

    sys.stdout.write(printable(line) + "\n")
    sys.stdout.flush()


def _warn(line: str) -> None:
    from ..termsafe import printable

    sys.stderr.write(printable(line) + "\n")


@app.command("sync")
def sync(
    watch: Annotated[bool, typer.Option("--watch", "-w",
                     help="Keep watching the host files and sync each change.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n",
                       help="Show what would change; change nothing.")] = False,
    project: ProjectOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Copy [dotfiles] into the VM now (only what changed); --watch keeps them in sync.

    \b
    Examples:
      mariner sync --dry-run
      mariner sync --watch
    """
    from .. import sync as dotfiles
    from ..errors import UsageError

    ctx = context(project, json_output)
    cfg = ctx.load()
    if watch and (dry_run or json_output):
        raise UsageError("--watch cannot be combined with --dry-run or --json")
    if not (cfg.dotfiles.files or cfg.dotfiles.repository):
        raise UsageError(f"nothing to sync: {cfg.config_file.name} sets no [dotfiles] files "
                         f"or repository")
    record = dotfiles.running_vm(cfg)
    if watch:
        # A long-running foreground process: it pays for its own connection once and keeps
        # it (reconnecting after a VM restart) for watchdog's events; the agent is not needed.
        from ..state import attached

        with attached(cfg.name, "sync-watch"):
            dotfiles.watch(cfg, record, _say)
        ctx.err.print("stopped watching.")
        return
    result = _sync_now(ctx, cfg, record, dry_run)
    if json_output:
        ctx.emit_json(result["report"])
        return
    for line in result["lines"]:
        _say(line)
    # Plain writes: rich's console costs more to import than the agent takes for a no-op sync.
    for line in result["warnings"] + [result["summary"]]:
        _warn(line)
    sys.stderr.flush()


def _sync_now(ctx, cfg, record, dry_run: bool) -> dict:
    """One sync, by the VM's agent on its held connection when it can (no asyncssh here),
    else on a connection of our own; sync.outcome() JSON either way."""
    from .. import sync as dotfiles
    from ..approval import approved_forwards
    from ..remote import dispatch
    from ..remote.target import target_for

    def direct() -> dict:
        return dotfiles.outcome(dotfiles.sync_once(cfg, record, dry_run=dry_run))

    request = {"spec": dotfiles.spec_request(cfg), "dry_run": dry_run}
    return dispatch.sync(target_for(cfg, record), request, direct,
                         forwards=approved_forwards(cfg),
                         verbose=bool(ctx.verbose),
                         warn=lambda line: _warn(f"mariner: {line}"))
