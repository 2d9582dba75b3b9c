"""`mariner code`: open VS Code (Remote-SSH) on the VM's guest path of a project directory."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import ProjectOpt, app, context


@app.command("code")
def code(
    path: Annotated[Optional[Path], typer.Argument(help="A directory of the project "
                                                   "(default: here).", show_default=False)] = None,
    print_only: Annotated[bool, typer.Option("--print", help="Print the command instead of "
                                             "running it.")] = False,
    project: ProjectOpt = None,
) -> None:
    """Open VS Code on the VM, making sure the ssh-config entry exists first.

    \b
    Examples:
      mariner code
      mariner code src/
    """
    import os
    import shutil
    import subprocess

    from .. import sshconfig
    from ..errors import MarinerError
    from ..fastexec import guest_workdir
    from .cmd_ssh_config import load_vm

    ctx = context(project)
    cfg, record = load_vm(ctx)
    sshconfig.write_entry(cfg, record)
    advice = sshconfig.ensure_include()
    if advice:
        sys.stderr.write(advice + "\n")
    # -C DIR: as if run from DIR
    where = str(Path(path).absolute()) if path is not None else \
        str(ctx.project.absolute()) if ctx.project else os.getcwd()
    dirs = [str(cfg.project_dir), os.path.realpath(cfg.project_dir)]
    argv = sshconfig.vscode_command(f"mariner-{cfg.name}",
                                    guest_workdir(dirs, cfg.workspace_mount, None, cwd=where))
    if print_only:
        sys.stdout.write(shlex.join(argv) + "\n")
        return
    exe = shutil.which("code")
    if exe is None:
        raise MarinerError("VS Code's `code` command is not on PATH; install it (VS Code: "
                           "\"Shell Command: Install 'code' command in PATH\") or run: "
                           + shlex.join(argv))
    raise typer.Exit(subprocess.call([exe, *argv[1:]]))
