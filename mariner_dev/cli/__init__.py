"""The command-line edge: dispatch, one-line errors, exit codes.

`mariner exec` is dispatched before typer is imported, so that it starts as fast as possible.
"""

from __future__ import annotations

import os
import sys

COMMAND_MODULES = (
    "init", "validate", "render", "up", "down", "destroy", "status", "list", "logs",
    "exec", "shell", "ssh_config", "code", "sync", "forward", "doctor", "agent", "help",
    "trust",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "exec" and os.environ.get("MARINER_EXEC_VIA_TYPER") != "1" \
            and not _asks_help(argv[1:]):  # one help style: exec's --help comes from typer too
        from ..fastexec import main as exec_main

        return exec_main(argv[1:])
    return run_app(argv)


def _asks_help(args: list[str]) -> bool:
    own = args[:args.index("--")] if "--" in args else args
    for arg in own:
        if arg in ("-h", "--help"):
            return True
        if not arg.startswith("-"):  # the command starts here; its -h is its own
            return False
    return False


def load_app():
    """The typer app with every command module that exists registered."""
    import importlib

    from .app import app

    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.cmd_{name}":
                raise
    return app


def click_module():
    """What mariner uses of the click that typer runs on (newer typers vendor a part of it as
    typer._click): Context, get_current_context, echo."""
    from types import SimpleNamespace

    try:
        from typer._click.core import Context
        from typer._click.globals import get_current_context
        from typer._click.utils import echo
    except ImportError:
        from click import Context, echo, get_current_context
    return SimpleNamespace(Context=Context, echo=echo, get_current_context=get_current_context)


def _click_exception_types():
    """(Exit, Abort, ClickException) of whichever click typer uses (newer typers vendor it)."""
    import typer

    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException
    return typer.Exit, typer.Abort, ClickException


def _typer_command(app):
    import typer.main

    return typer.main.get_command(app)


def _with_verbose(group):
    """`-v/--verbose` on every command, not only before it (`mariner status -v`); exec and
    shell keep their own -v (which also says which path served the call). Each command's
    callback also reports an interruption in one line (_interrupt_is_one_line)."""
    from typer.core import TyperOption

    from .app import set_verbose

    for command in group.commands.values():
        command.callback = _interrupt_is_one_line(command.callback)
        if any("-v" in param.opts for param in command.params):
            continue
        command.params.append(TyperOption(
            param_decls=["-v", "--verbose"], count=True, default=0, expose_value=False,
            help="Show host commands and more detail (-vv: debug).",
            callback=lambda ctx, param, value: set_verbose(value) if value else None))
    return group


def _interrupt_is_one_line(callback):
    """A Ctrl-C (or SIGTERM, where a command turns it into one) that leaves a command's own
    handling ends in one line and 128 + the signal, as everywhere else: typer alone exits 130
    without a word."""
    import functools

    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as exc:
            import signal

            from .interrupt import Interrupted, Terminated

            signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            word = "terminated" if signum == signal.SIGTERM else "interrupted"
            raise Interrupted(word, exit_code=128 + signum) from None
    return run


def _json_requested(argv: list[str]) -> bool:
    """`--json` among mariner's own arguments (not in a command after `--`)."""
    own = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in own


def run_app(argv: list[str]) -> int:
    from ..errors import EXIT_USAGE, MarinerError, UsageError
    from .app import STATE, emit_error, print_error

    app = load_app()
    STATE.reset()  # one invocation, one state (tests run several in one process)
    exit_type, abort_type, click_exception = _click_exception_types()

    def fail(exc: MarinerError) -> int:
        if STATE.json or _json_requested(argv):
            emit_error(exc)
        print_error(exc)
        return exc.exit_code

    try:
        result = _with_verbose(_typer_command(app)).main(args=argv, prog_name="mariner",
                                                         standalone_mode=False)
    except MarinerError as exc:
        return fail(exc)
    except exit_type as exc:
        return exc.exit_code
    except abort_type:
        print("Aborted.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except click_exception as exc:
        if STATE.json or _json_requested(argv):
            emit_error(UsageError(exc.format_message(), exit_code=exc.exit_code or EXIT_USAGE,
                                  hint="`mariner help COMMAND` shows its options"))
        exc.show()
        return exc.exit_code
    except Exception as exc:  # the last resort: a bug, never a traceback on the terminal
        from ..fastexec import print_internal_error, unexpected_hint, unexpected_message

        if STATE.json or _json_requested(argv):
            emit_error(MarinerError(unexpected_message(exc), hint=unexpected_hint(exc)))
        print_internal_error(exc)
        return 1
    return result if isinstance(result, int) else 0
