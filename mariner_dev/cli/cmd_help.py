"""`mariner help [COMMAND]` and `mariner completion SHELL`."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from .app import app

SHELLS = ("bash", "zsh", "fish")


@app.command("help")
def help_(command: Annotated[Optional[List[str]], typer.Argument(
        help="The command to explain (default: all of them).", show_default=False)] = None,
) -> None:
    """Show the help of mariner, or of one command (the same as `mariner COMMAND --help`).

    \b
    Examples:
      mariner help
      mariner help up
    """
    from ..errors import UsageError
    from . import click_module

    click = click_module()
    here = click.get_current_context()
    context = here.find_root()
    target = context.command
    for word in command or []:
        sub = target.get_command(context, word) if hasattr(target, "get_command") else None
        if sub is None:
            raise UsageError(f"no command {word!r}; `mariner help` lists them")
        context = click.Context(sub, info_name=word, parent=context)
        target = sub
    click.echo(target.get_help(context))


def _shells(incomplete: str) -> list[str]:
    return [shell for shell in SHELLS if shell.startswith(incomplete)]


@app.command("completion")
def completion(shell: Annotated[str, typer.Argument(
        help="bash, zsh or fish.", show_default=False, autocompletion=_shells)]) -> None:
    """Print the shell completion script (commands, options, templates, VM names).

    \b
    Examples:
      eval "$(mariner completion bash)"      # in ~/.bashrc
      eval "$(mariner completion zsh)"       # in ~/.zshrc
      mariner completion fish | source      # in ~/.config/fish/config.fish
    """
    from typer._completion_shared import get_completion_script

    from ..errors import UsageError

    if shell not in SHELLS:
        raise UsageError(f"no completion for {shell!r}; choose one of: {', '.join(SHELLS)}")
    typer.echo(get_completion_script(prog_name="mariner", complete_var="_MARINER_COMPLETE",
                                     shell=shell))
