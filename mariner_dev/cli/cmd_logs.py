from __future__ import annotations

from typing import Annotated, Optional

import typer

from .app import ProjectOpt, app, context


@app.command("logs")
def logs(
    project: ProjectOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    lines: Annotated[Optional[int], typer.Option("-n", "--lines", min=0,
                     help="Show only the last N lines.")] = None,
) -> None:
    """Show the VM's console log (microvm@<name>'s journal; console.log in
    runner mode).

    \b
    Examples:
      mariner logs -n 50
      mariner logs -f
    """
    import sys

    from ..lifecycle import default_backend
    from ..state import Registry
    from ..errors import MarinerError, OwnershipError

    ctx = context(project)
    cfg = ctx.load()
    record = Registry().get(cfg.name)
    if record is not None and record.project != str(cfg.project_dir):
        raise OwnershipError(f"VM {cfg.name!r} belongs to the project {record.project}",
                             exit_code=2)
    backend = default_backend()
    backend.preflight()
    if not backend.exists(cfg.name):  # journalctl would say "-- No entries --" and wait
        raise MarinerError(f"VM {cfg.name} does not exist on this host, so it has no log",
                           hint="`mariner up` creates and starts it")
    try:
        for line in backend.logs(cfg.name, follow=follow, lines=lines):
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
