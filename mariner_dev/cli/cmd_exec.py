"""`mariner exec` through typer (when not dispatched to the fast path, e.g. `mariner -v exec`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .app import ProjectOpt, STATE, app


@app.command("exec", context_settings={"allow_interspersed_args": False,
                                       "ignore_unknown_options": True})
def exec_(
    argv: Annotated[List[str], typer.Argument(help="The command and its arguments (after --).",
                                              show_default=False)],
    interactive: Annotated[bool, typer.Option("-i", "--interactive",
                                              help="Stream stdin (default when piped).")] = False,
    tty: Annotated[bool, typer.Option("-t", "--tty", help="Allocate a TTY.")] = False,
    no_tty: Annotated[bool, typer.Option("-T", "--no-tty", help="Never allocate a TTY.")] = False,
    env: Annotated[Optional[List[str]], typer.Option("-e", "--env", help="K=V (repeatable).",
                                                     show_default=False)] = None,
    env_file: Annotated[Optional[List[Path]], typer.Option("--env-file", help="File of K=V lines.",
                                                           show_default=False)] = None,
    workdir: Annotated[Optional[str], typer.Option("-w", "--workdir",
                                                   help="Working directory in the guest.")] = None,
    user: Annotated[Optional[str], typer.Option("-u", "--user",
                                                help="Run as USER (sudo in the guest).")] = None,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True,
                                         help="Say which path served the call.")] = 0,
    trust_new_host_key: Annotated[bool, typer.Option(
        "--trust-new-host-key", help="Accept and pin the VM's current host key.")] = False,
    project: ProjectOpt = None,
) -> None:
    """Run a command in the VM like `docker exec`, in the guest path of this directory."""
    from ..fastexec import ExecOptions, run

    opts = ExecOptions(
        argv=argv, interactive=interactive, tty=True if tty else (False if no_tty else None),
        env=env or [], env_files=[str(f) for f in env_file or []], workdir=workdir, user=user,
        project=str(project or STATE.project) if (project or STATE.project) else None,
        verbose=verbose or STATE.verbose, trust_new=trust_new_host_key)
    raise typer.Exit(run(opts))
