from __future__ import annotations

from .app import JsonOpt, app, context


@app.command("list")
def list_(json_output: JsonOpt = False) -> int:
    """List every VM on this host: mariner's, with their projects, and any others.

    \b
    Examples:
      mariner list
    """
    from .. import lifecycle
    from .app import emit_error, print_error

    ctx = context(None, json_output)
    backend = lifecycle.default_backend()
    vms, host_error = lifecycle.list_vms(backend=backend)
    if not json_output:
        ctx.err.print(f"backend: {backend.name} (VMs in {backend.vms_dir})")
    if json_output:
        data = {"backend": backend.name, "vms_dir": str(backend.vms_dir),
                "vms": [vm.to_json() for vm in vms]}
        if host_error:
            emit_error(host_error, **data)
        else:
            ctx.emit_json(data)
    elif not vms and not host_error:
        ctx.err.print("No VMs. `mariner up` in a project creates one.")
    elif vms:
        _print_table(vms)
    if host_error:  # mariner's own VMs were listed, in state "unknown"
        if not json_output:
            print_error(host_error)
        return 1
    return 0


def _print_table(vms) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATE", "ADDRESS", "PROJECT"):
        table.add_column(column)
    for vm in vms:
        where = "-"
        if vm.address:
            where = f"{vm.address}:{vm.ssh_port}" if vm.ssh_port else vm.address
        table.add_row(vm.name, vm.state, where, vm.project or "(not created by mariner)")
    # No markup (a project path may hold "[...]"); no truncated paths when piped.
    import sys

    Console(highlight=False, markup=False,
            width=None if sys.stdout.isatty() else 10_000).print(table)
