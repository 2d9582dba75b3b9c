from __future__ import annotations

import sys
from typing import Annotated

import typer

from .app import ProjectOpt, app, context


def at_terminal() -> bool:
    """A person can answer: stdin and stderr are terminals."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def ask_approval(ctx, review) -> bool:
    """`up` on a terminal: show what changed on the host side and ask."""
    for line in review.lines():
        ctx.err.print(line)
    return typer.confirm("Approve these host settings and continue?", default=False, err=True)


@app.command("trust")
def trust(
    project: ProjectOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Approve and acknowledge without "
                                      "asking (after reviewing the output).")] = False,
    revoke: Annotated[bool, typer.Option("--revoke", help="Remove this project's approval: "
                                         "the next `mariner up` asks again.")] = False,
) -> None:
    """Review and approve what mariner.toml does on the host, and acknowledge changes to the
    project files the host runs (git hooks, .envrc, ...)."""
    from ..errors import UsageError
    from ..approval import TrustReview

    ctx = context(project)
    cfg = ctx.load()
    if revoke:
        from ..approval import revoke as revoke_approval

        if revoke_approval(cfg.project_dir):
            print(f"Revoked the approval of {cfg.project_dir}: the next `mariner up` asks again.")
        else:
            print(f"Nothing was approved for {cfg.project_dir}.")
        return
    pending = TrustReview.of(cfg)
    print("\n".join(pending.config_lines()))
    print()
    print("\n".join(pending.tripwire_lines()))
    if pending.nothing_to_do:
        return
    if not yes and not at_terminal():
        raise UsageError("not a terminal, so nothing was approved: review the above, then run "
                         "`mariner trust --yes`")
    approved = True
    if not pending.config.approved:
        if yes or typer.confirm("Approve these host settings?", default=False, err=True):
            pending.approve_config()
            print("Approved the host settings.")
        else:
            print("The host settings stay unapproved: `mariner up` refuses them.")
            approved = False
    if pending.tripwire_pending:
        if yes or typer.confirm("Acknowledge these project file changes?", default=False,
                                err=True):
            pending.acknowledge_files()
            print("Acknowledged the project files as they are now.")
        else:
            print("The file changes stay reported until you acknowledge them.")
            approved = False
    if not approved:
        raise typer.Exit(1)
