from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app, complete_templates, context


@app.command("init")
def init(
    directory: Annotated[Optional[Path], typer.Argument(help="Project directory (default: here).")] = None,
    template: Annotated[Optional[str], typer.Option("--template", "-t",
                        help="Start from an example: minimal, webapp, docker.",
                        autocompletion=complete_templates)] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing mariner.toml.")] = False,
) -> None:
    """Write a commented mariner.toml for this project.

    \b
    Examples:
      mariner init
      mariner init --template webapp ~/src/shop
    """
    from ..project import init_project

    ctx = context()
    result = init_project(directory or ctx.project or Path.cwd(), template, force)
    ctx.err.print(f"Wrote {result.path}")
    for path in result.created:
        ctx.err.print(f"Copied {path} from the {result.template} template")
    if not result.approved:
        ctx.err.print("Its host settings are not all approved (a file it names was already "
                      "there, or the project does not load yet): `mariner trust` reviews them.")
    ctx.err.print("Next: edit it, then `mariner validate` and `mariner up`.")
