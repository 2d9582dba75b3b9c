from __future__ import annotations

from typing import Annotated, Optional

import typer

from .app import ProjectOpt, app, complete_vm_names, context


@app.command("destroy")
def destroy(
    project: ProjectOpt = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Do not ask for confirmation; "
                    "remove mariner's own records even when the host cannot be reached.")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="Destroy this VM of yours by "
                    "name, from anywhere (its project may be moved or gone).",
                    show_default=False, autocompletion=complete_vm_names)] = None,
) -> None:
    """Remove this project's VM, its volumes, its ssh-config entry and pinned host key.

    \b
    Examples:
      mariner destroy
      mariner destroy --force
      mariner destroy --name api --force    # the project was moved or deleted
    """
    import sys

    from .. import lifecycle
    from ..errors import HostError, UsageError
    from .interrupt import interruptible
    from .progress import PhaseDisplay

    ctx = context(project)
    if name is not None:
        if project is not None:
            raise UsageError("give either --name or -C/--project, not both")
        from ..host.backend import check_vm_name

        try:
            check_vm_name(name)
        except HostError as exc:
            raise UsageError(f"--name: {exc}") from None
        vm_name, cfg = name, None
    else:
        cfg = ctx.load()
        vm_name = cfg.name
    if not force:
        if not sys.stdin.isatty():
            raise UsageError(f"destroying VM {vm_name!r} deletes its disks; "
                             f"confirm with `mariner destroy --force`")
        if not typer.confirm(f"Destroy VM {vm_name!r} and delete its volumes?", default=False,
                             err=True):
            ctx.err.print("aborted: nothing was destroyed")
            raise typer.Exit(1)
    with interruptible("`mariner destroy` again finishes the removal"), \
            PhaseDisplay(ctx.err) as progress:
        if cfg is not None:
            result = lifecycle.destroy(cfg, force=force, progress=progress)
        else:
            result = lifecycle.destroy_vm(vm_name, force=force, progress=progress)
    for note in result.notes:
        ctx.err.print(note)
    if not result.removed:
        ctx.err.print(f"VM {vm_name} does not exist.")
    elif result.host_removed:
        ctx.err.print(f"VM {vm_name} destroyed.")
    elif result.host_error is not None:
        raise result.host_error   # last: what went wrong on the host, and its next step
    else:
        ctx.err.print(f"mariner's records of VM {vm_name} removed; the VM on the host was not "
                      f"(see above).")
