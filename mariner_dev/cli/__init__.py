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


def run_app(argv: list[str]) -> int:
    from ..errors import MarinerError
    from .app import print_error

    app = load_app()
    exit_type, abort_type, click_exception = _click_exception_types()
    try:
        result = app(args=argv, prog_name="mariner", standalone_mode=False)
    except MarinerError as exc:
        print_error(exc)
        return exc.exit_code
    except exit_type as exc:
        return exc.exit_code
    except abort_type:
        print("Aborted.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except click_exception as exc:
        exc.show()
        return exc.exit_code
    return result if isinstance(result, int) else 0
