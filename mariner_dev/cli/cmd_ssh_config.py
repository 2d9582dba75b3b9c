"""`mariner ssh-config`: the `Host mariner-<name>` entry for plain ssh and VS Code."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .app import ProjectOpt, app, context


def load_vm(ctx):
    """The project's config and its VM's registry record (the VM must have been created)."""
    from ..errors import GuestUnreachable
    from ..state import Registry

    cfg = ctx.load()
    record = Registry().get(cfg.name)
    if record is None or not record.created:  # a render or a failed up registers, never builds
        raise GuestUnreachable(f"VM {cfg.name} does not exist yet (nothing was written)",
                               hint="`mariner up` creates and starts it", exit_code=1)
    return cfg, record


@app.command("ssh-config")
def ssh_config(
    print_only: Annotated[bool, typer.Option("--print", help="Print the Host block; change no "
                                             "file.")] = False,
    project: ProjectOpt = None,
) -> None:
    """Write this VM's Host block and include mariner's ssh-config from ~/.ssh/config.

    \b
    Examples:
      mariner ssh-config && ssh mariner-api
      mariner ssh-config --print
    """
    from .. import sshconfig
    from ..remote.target import target_for

    ctx = context(project)
    cfg, record = load_vm(ctx)
    if print_only:
        sys.stdout.write(sshconfig.render_block(target_for(cfg, record)))
        return
    file = sshconfig.write_entry(cfg, record)
    advice = sshconfig.ensure_include()
    ctx.info(f"wrote Host mariner-{cfg.name} to {file}")
    if advice:
        sys.stderr.write(advice + "\n")
    else:
        ctx.info(f"`ssh mariner-{cfg.name}` works ({sshconfig.user_ssh_config()} includes {file})")
