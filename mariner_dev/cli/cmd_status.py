from __future__ import annotations

from .app import JsonOpt, ProjectOpt, app, context


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _forward_line(forward: dict) -> str:
    """`127.0.0.1:8000 -> guest 127.0.0.1:8000  listening (1 open, 4 so far)`, or the reason
    the forward is not listening."""
    where = f"{forward['host']} -> guest {forward['guest']}"
    state = forward["state"]
    if state == "listening":
        detail = f"listening ({forward['active']} open, {forward['total']} so far)"
        if forward.get("last_error"):
            detail += f"; last error: {forward['last_error']}"
    else:
        detail = f"{state}: {forward.get('error')}"
    return f"{where}  {detail}"


@app.command("status")
def status(project: ProjectOpt = None, json_output: JsonOpt = False) -> int:
    """Show this project's VM: state, whether its config changed since it was built, address.

    \b
    Examples:
      mariner status
      mariner status --json | jq -r .state
    """
    from .. import lifecycle

    from .app import emit_error, print_error

    ctx = context(project, json_output)
    result = lifecycle.status(ctx.load())
    if json_output:
        if result.host_error:
            emit_error(result.host_error, **result.to_json())
        else:
            ctx.emit_json(result.to_json())
    else:
        _print_status(result)
    if result.host_error:  # what mariner knows is shown; the host's state is not
        if not json_output:
            print_error(result.host_error)
        return 1
    return 0


def _print_status(result) -> None:
    state = result.state + (" (outdated)" if result.outdated else "")
    lines = [f"name:     {result.name}", f"state:    {state}", f"backend:  {result.backend}"]
    if result.outdated:
        lines.append(f"changed:  {', '.join(result.changed_keys)} (run `mariner up`)")
    if result.restart_pending:
        lines.append("restart:  pending (a rebuilt system waits: `mariner up` restarts the VM)")
    if result.address:
        where = f"{result.address}:{result.ssh_port}" if result.ssh_port else f"{result.address}:22"
        lines.append(f"address:  {where}")
    if result.cid is not None:
        lines.append(f"cid:      {result.cid}")
    lines.append(f"uptime:   {_uptime(result.uptime)}")
    if result.host_key_pinned_over == "vsock":
        lines.append("host key: pinned over vsock (first contact by cid, not spoofable)")
    elif result.host_key_pinned_over == "tcp":
        lines.append("host key: pinned over TCP (vsock was unavailable at first contact)")
    for index, forward in enumerate(result.forwards):
        label = "forwards:" if index == 0 else ""
        lines.append(f"{label:<10}{_forward_line(forward)}")
    for note in result.notes:
        lines.append(f"note:     {note}")
    for change in result.tripwire:
        lines.append(f"tripwire: {change['path']} {change['change']} ({change['why']}); review "
                     f"it, then `mariner trust`")
    if not result.managed and result.state != "absent":
        lines.append("note:     this VM was not created by mariner")
    elif result.state in _NEXT:
        lines.append(f"next:     {_NEXT[result.state]}")
    from ..termsafe import printable

    print("\n".join(printable(line) for line in lines))


# What to do about a VM that is not running (a VM mariner did not create is not ours to start).
_NEXT = {"absent": "`mariner up` creates and starts it",
         "stopped": "`mariner up` starts it",
         "failed": "`mariner logs` shows why; `mariner up` starts it again"}
