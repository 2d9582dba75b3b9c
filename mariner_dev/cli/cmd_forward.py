from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .app import ProjectOpt, app, context


@app.command("forward")
def forward(
    ports: Annotated[Optional[list[str]], typer.Argument(
        metavar="[PORT|HOST:GUEST]",
        help="Forwards to run (default: [ports] forward).", show_default=False)] = None,
    project: ProjectOpt = None,
) -> None:
    """Forward 127.0.0.1:HOST to the VM's 127.0.0.1:GUEST until Ctrl-C.

    \b
    Examples:
      mariner forward 8000
      mariner forward 15432:5432
    """
    from .. import sync as dotfiles
    from ..errors import UsageError
    from ..forward import parse_forward, run_forwards

    ctx = context(project)
    cfg = ctx.load()
    if ports:
        forwards = [parse_forward(p) for p in ports]
    else:
        # The VM can write mariner.toml: only the approved [ports] forward entries.
        from ..approval import approved_forwards
        from ..model import PortForward

        forwards = [PortForward(host, guest) for host, guest in approved_forwards(cfg)]
        for port in cfg.ports:
            if port not in forwards:
                ctx.err.print(f"not forwarding {port}: this [ports] forward entry is not "
                              f"approved (`mariner trust` reviews it)")
    if not forwards:
        raise UsageError("nothing to forward: give PORT or HOST:GUEST, or set [ports] forward "
                         f"in {cfg.config_file.name}")
    hosts = [f.host for f in forwards]
    dupes = sorted({h for h in hosts if hosts.count(h) > 1})
    if dupes:
        raise UsageError(f"host port {dupes[0]} is given twice")
    record = dotfiles.running_vm(cfg)

    def say(line: str) -> None:
        ctx.err.print(line, markup=False)

    def show_table(rows: list[dict]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, pad_edge=False, show_edge=False)
        table.add_column("HOST")
        table.add_column("")
        table.add_column(f"GUEST (VM {cfg.name})")
        for row in rows:
            table.add_row(row["host"], "->", row["guest"])
        Console(file=sys.stdout, highlight=False).print(table)
        sys.stdout.flush()
        say("forwarding; Ctrl-C to stop")

    from ..state import attached

    with attached(cfg.name, "forward"):
        run_forwards(cfg, record, forwards, say, show_table)
    say("forwards stopped.")
