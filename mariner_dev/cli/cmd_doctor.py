"""`mariner doctor`: check the host, and say what a VM can reach on it."""

from __future__ import annotations

from .app import JsonOpt, ProjectOpt, app, context

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def _project_network(ctx):
    """The project's [network] when there is a readable project (doctor works without one)."""
    from ..errors import MarinerError

    try:
        return ctx.load().network
    except MarinerError:
        return None


@app.command("doctor")
def doctor(project: ProjectOpt = None, json_output: JsonOpt = False) -> int:
    """Check that this host can run mariner's VMs, and what a VM could reach on it."""
    from ..doctor import run_doctor

    ctx = context(project, json_output)
    network = _project_network(ctx)
    mode = network.mode if network else None
    report = run_doctor(network_mode=mode, dns=network.dns if network else None)
    if json_output:
        data = report.to_json()
        if not report.ok:
            failed = ", ".join(c.name for c in report.checks if c.required and c.status == "fail")
            data = {"outcome": "error", **data, "message": f"not ready: {failed} failed",
                    "hint": "each failed check's `fix` says what to do",
                    "exit_code": report.exit_code}
        ctx.emit_json(data)
    else:
        _print_table(report, mode)
    return report.exit_code


def _print_table(report, mode: str | None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=True, expand=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail and fix", ratio=1)
    for check in report.checks:
        label = check.status if check.required or check.status == "ok" else f"{check.status} (advisory)"
        text = Text(check.detail)
        if check.fix and check.status != "ok":
            text.append("\nfix: ", style="bold")
            text.append(check.fix)
        table.add_row(check.name, Text(label, style=_STYLE[check.status]), text)
    console = Console(highlight=False)
    console.print(table)
    failed = [c.name for c in report.checks if c.required and c.status == "fail"]
    if failed:
        note = " (bridge checks are advisory: this project uses user networking)" if mode == "user" else ""
        console.print(Text(f"not ready: {', '.join(failed)} failed{note}", style="bold red"))
    else:
        console.print(Text("ready: every required check passed", style="green"))
