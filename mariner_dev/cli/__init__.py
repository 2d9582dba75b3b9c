"""The command-line edge: dispatch, one-line errors, exit codes.

`mariner exec` is dispatched before typer is imported, so that it starts as fast as possible.
"""

from __future__ import annotations

import os
import sys

COMMAND_MODULES = (
    "init", "validate", "render", "up", "down", "destroy", "status", "list", "logs",
    "exec", "shell", "ssh_config", "code", "sync", "forward", "doctor", "agent",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "exec" and os.environ.get("MARINER_EXEC_VIA_TYPER") != "1":
        from ..fastexec import main as exec_main

        return exec_main(argv[1:])
    return run_app(argv)


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


def _click_exception_types():
    """(Exit, Abort, ClickException) of whichever click typer uses (newer typers vendor it)."""
    import typer

    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException
    return typer.Exit, typer.Abort, ClickException


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
        result = app(args=argv, prog_name="mariner", standalone_mode=False)
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
