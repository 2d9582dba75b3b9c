"""`mariner exec` through typer (when not dispatched to the fast path, e.g. `mariner -v exec`)."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from .app import (STATE, EnvFileOpt, EnvOpt, GuestVerboseOpt, ProjectOpt, TrustNewOpt,
                  WorkdirOpt, app)


@app.command("exec", context_settings={"allow_interspersed_args": False,
                                       "ignore_unknown_options": True})
def exec_(
    argv: Annotated[List[str], typer.Argument(help="The command and its arguments (after --).",
                                              metavar="-- CMD [ARGS]...", show_default=False)],
    interactive: Annotated[bool, typer.Option("-i", "--interactive",
                                              help="Stream stdin (default when piped).")] = False,
    tty: Annotated[bool, typer.Option("-t", "--tty", help="Allocate a TTY.")] = False,
    no_tty: Annotated[bool, typer.Option("-T", "--no-tty", help="Never allocate a TTY.")] = False,
    env: EnvOpt = None,
    env_file: EnvFileOpt = None,
    workdir: WorkdirOpt = None,
    user: Annotated[Optional[str], typer.Option("-u", "--user",
                                                help="Run as USER (sudo in the guest).")] = None,
    verbose: GuestVerboseOpt = 0,
    trust_new_host_key: TrustNewOpt = False,
    project: ProjectOpt = None,
) -> None:
    """Run a command in the VM like `docker exec`, in the guest path of this directory.

    \b
    Examples:
      mariner exec -- make test
      mariner exec -it -e TOKEN="$TOKEN" -- python3
    """
    from ..errors import UsageError
    from ..fastexec import ExecOptions, run

    if tty and no_tty:
        raise UsageError("exec: -t/--tty and -T/--no-tty contradict each other; give one")
    opts = ExecOptions(
        argv=argv, interactive=interactive, tty=True if tty else (False if no_tty else None),
        env=env or [], env_files=[str(f) for f in env_file or []], workdir=workdir, user=user,
        project=str(project or STATE.project) if (project or STATE.project) else None,
        verbose=verbose or STATE.verbose, trust_new=trust_new_host_key)
    raise typer.Exit(run(opts))
