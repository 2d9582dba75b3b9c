from __future__ import annotations

from typing import Annotated

import typer

from .app import JsonOpt, ProjectOpt, app, context


@app.command("up")
def up(
    project: ProjectOpt = None,
    json_output: JsonOpt = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1, max=86400,
                                           help="Seconds to wait for SSH.")] = 180.0,
    no_restart: Annotated[bool, typer.Option("--no-restart",
                          help="After a rebuild, leave a running VM on its old system.")] = False,
    fail_if_locked: Annotated[bool, typer.Option("--fail-if-locked",
                              help="Fail at once if another command works on this VM.")] = False,
) -> None:
    """Create, update and start this project's VM; wait for SSH; sync dotfiles; run hooks.

    \b
    Examples:
      mariner up
      mariner up --json --timeout 600
    """
    from .. import lifecycle
    from .app import emit_error
    from .cmd_trust import ask_approval, at_terminal
    from .interrupt import interruptible
    from .progress import PhaseDisplay

    ctx = context(project, json_output)
    # Everything up to the last line printed: a Ctrl-C while the result is shown (the first
    # print imports rich) still ends in one line that says what to do.
    with interruptible("`mariner up` again completes the VM"):
        try:
            cfg = ctx.load()
            with PhaseDisplay(ctx.err, enabled=True) as progress:
                # Only a person at a terminal is asked; --json and scripts are refused (exit 2).
                confirm = (None if json_output or not at_terminal()
                           else lambda review: progress.paused(lambda: ask_approval(ctx, review)))
                result = lifecycle.up(cfg, timeout=timeout, restart=not no_restart,
                                      wait_lock=not fail_if_locked, progress=progress,
                                      confirm=confirm)
        except lifecycle.HookFailed as exc:
            if json_output:  # the failure document also says where the running VM is
                emit_error(exc, **exc.result.to_json())
            raise
        _show(ctx, result, json_output)


def _show(ctx, result, json_output: bool) -> None:
    if json_output:
        ctx.emit_json(result.to_json())
        return
    for message in result.messages:
        ctx.err.print(message)
    where = f"{result.address}:{result.ssh_port}" if result.ssh_port else result.address
    ctx.err.print(f"VM {result.name} is running at {where} (user {result.user}, "
                  f"project at {result.workspace})")
    if result.restart_pending:
        ctx.err.print("A rebuilt system is waiting for a restart: `mariner up` (without --no-restart) restarts the VM.")
    ctx.err.print(f"Get in: `mariner shell`, `mariner exec -- CMD`, or `ssh mariner-{result.name}`")
