"""`mariner doctor`: check the host, and say what a VM can reach on it."""

from __future__ import annotations

import sys

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
    """Check that this host can run mariner's VMs, and what a VM could reach on it.

    \b
    Examples:
      mariner doctor
      mariner doctor --json
    """
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
    elif sys.stdout.isatty():
        _print_table(report, mode)
    else:
        _print_plain(report, mode)
    return report.exit_code


def _verdict_line(report, mode: str | None) -> str:
    failed = [c.name for c in report.checks if c.required and c.status == "fail"]
    if not failed:
        return "ready: every required check passed"
    note = " (bridge checks are advisory: this project uses user networking)" if mode == "user" else ""
    return f"not ready: {', '.join(failed)} failed{note}"


def _print_plain(report, mode: str | None) -> None:
    """`check: ok|warn|fail: detail` per line (and its fix, indented), for pipes and logs."""
    lines = []
    for check in report.checks:
        advisory = "" if check.required or check.status == "ok" else " (advisory)"
        lines.append(f"{check.name}: {check.status}{advisory}: {check.detail}")
        if check.fix and check.status != "ok":
            lines.append(f"  fix: {check.fix}")
    lines.append(_verdict_line(report, mode))
    sys.stdout.write("\n".join(lines) + "\n")


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
    verdict = _verdict_line(report, mode)
    console.print(Text(verdict, style="green" if verdict.startswith("ready") else "bold red"))
