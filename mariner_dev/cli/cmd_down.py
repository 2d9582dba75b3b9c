from __future__ import annotations

from .app import ProjectOpt, app, context


@app.command("down")
def down(project: ProjectOpt = None) -> None:
    """Stop this project's VM (its disks are kept).

    \b
    Examples:
      mariner down
    """
    from .. import lifecycle
    from .progress import PhaseDisplay

    ctx = context(project)
    cfg = ctx.load()
    with PhaseDisplay(ctx.err) as progress:
        stopped = lifecycle.down(cfg, progress=progress)
    ctx.err.print(f"VM {cfg.name} stopped." if stopped else f"VM {cfg.name} is not running.")
