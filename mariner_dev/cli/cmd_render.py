from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import ProjectOpt, app, context


@app.command("render")
def render(
    project: ProjectOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the flake here "
                   "(default: MARINER_HOME/vms/<name>/flake).")] = None,
) -> None:
    """Write the VM flake for this project and print its directory.

    \b
    Examples:
      mariner render
      mariner render --out /tmp/flake
    """
    from ..project import render_project

    ctx = context(project)
    result = render_project(ctx.load(), out)
    if not result.approved:
        ctx.err.print(f"The host settings of this mariner.toml are not approved: the flake went "
                      f"to {result.directory}, not to the directory the VM is built from. "
                      f"`mariner trust` reviews and approves them.")
    print(result.directory)
