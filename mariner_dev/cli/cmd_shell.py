"""`mariner shell`: an interactive login shell in the VM, with a PTY."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from .app import (STATE, EnvFileOpt, EnvOpt, GuestVerboseOpt, ProjectOpt, TrustNewOpt,
                  WorkdirOpt, app)


@app.command("shell", context_settings={"allow_interspersed_args": False,
                                        "ignore_unknown_options": True})
def shell(
    command: Annotated[Optional[List[str]], typer.Argument(
        help="Run this in the login shell instead of an interactive one.",
        show_default=False)] = None,
    user: Annotated[Optional[str], typer.Option("-u", "--user",
                                                help="Log in as USER (sudo in the guest).")] = None,
    env: EnvOpt = None,
    env_file: EnvFileOpt = None,
    workdir: WorkdirOpt = None,
    verbose: GuestVerboseOpt = 0,
    trust_new_host_key: TrustNewOpt = False,
    project: ProjectOpt = None,
) -> None:
    """Open a login shell in the VM, in the guest path of this directory.

    \b
    Examples:
      mariner shell
      mariner shell -u root
    """
    from ..fastexec import ExecOptions, run_shell

    where = project or STATE.project
    opts = ExecOptions(env=env or [], env_files=[str(f) for f in env_file or []],
                       workdir=workdir, user=user, project=str(where) if where else None,
                       verbose=verbose or STATE.verbose, trust_new=trust_new_host_key)
    raise typer.Exit(run_shell(opts, " ".join(command) if command else None))
