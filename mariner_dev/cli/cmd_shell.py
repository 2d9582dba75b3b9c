"""`mariner shell`: an interactive login shell in the VM, with a PTY."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .app import ProjectOpt, STATE, app


@app.command("shell", context_settings={"allow_interspersed_args": False,
                                        "ignore_unknown_options": True})
def shell(
    command: Annotated[Optional[List[str]], typer.Argument(
        help="Run this in the login shell instead of an interactive one.",
        show_default=False)] = None,
    user: Annotated[Optional[str], typer.Option("-u", "--user",
                                                help="Log in as USER (sudo in the guest).")] = None,
    env: Annotated[Optional[List[str]], typer.Option("-e", "--env", help="K=V (repeatable).",
                                                     show_default=False)] = None,
    env_file: Annotated[Optional[List[Path]], typer.Option("--env-file", help="File of K=V lines.",
                                                           show_default=False)] = None,
    workdir: Annotated[Optional[str], typer.Option("-w", "--workdir",
                                                   help="Working directory in the guest.")] = None,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True,
                                         help="Say which path served the call.")] = 0,
    trust_new_host_key: Annotated[bool, typer.Option(
        "--trust-new-host-key", help="Accept and pin the VM's current host key.")] = False,
    project: ProjectOpt = None,
) -> None:
    """Open a login shell in the VM, in the guest path of this directory."""
    from ..fastexec import ExecOptions, run_shell

    where = project or STATE.project
    opts = ExecOptions(env=env or [], env_files=[str(f) for f in env_file or []],
                       workdir=workdir, user=user, project=str(where) if where else None,
                       verbose=verbose or STATE.verbose, trust_new=trust_new_host_key)
    raise typer.Exit(run_shell(opts, " ".join(command) if command else None))
