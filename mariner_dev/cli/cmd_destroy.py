from __future__ import annotations

from typing import Annotated

import typer

from .app import ProjectOpt, app, context


@app.command("destroy")
def destroy(
    project: ProjectOpt = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove this project's VM, its volumes, its ssh-config entry and pinned host key.

    \b
    Examples:
      mariner destroy
      mariner destroy --force
    """
    import sys

    from .. import lifecycle
    from ..errors import UsageError
    from .progress import PhaseDisplay

    ctx = context(project)
    cfg = ctx.load()
    if not force:
        if not sys.stdin.isatty():
            raise UsageError(f"destroying VM {cfg.name!r} deletes its disks; "
                             f"confirm with `mariner destroy --force`")
        if not typer.confirm(f"Destroy VM {cfg.name!r} and delete its volumes?", default=False,
                             err=True):
            ctx.err.print("aborted: nothing was destroyed")
            raise typer.Exit(1)
    with PhaseDisplay(ctx.err) as progress:
        removed = lifecycle.destroy(cfg, progress=progress)
    ctx.err.print(f"VM {cfg.name} destroyed." if removed else f"VM {cfg.name} does not exist.")
