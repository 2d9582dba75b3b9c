"""The typer app, the small app object passed to commands, and shared options."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer

from ..errors import MarinerError

app = typer.Typer(
    name="mariner",
    help="A disposable NixOS microVM per project, driven like `docker exec`.\n\n"
         "\b\nExamples:\n  mariner init && mariner up\n  mariner exec -- make test\n"
         "  mariner help up",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ProjectOpt = Annotated[Optional[Path], typer.Option(
    "-C", "--project", help="Project directory (default: the one whose mariner.toml is in "
    "the current directory or a parent).", file_okay=False, show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, on "
                                        "success and on failure (schema/<command>.output."
                                        "schema.json).")]

# Options that `exec` and `shell` share.
EnvOpt = Annotated[Optional[List[str]], typer.Option("-e", "--env", help="K=V (repeatable).",
                                                     show_default=False)]
EnvFileOpt = Annotated[Optional[List[Path]], typer.Option("--env-file", help="File of K=V lines.",
                                                          show_default=False)]
WorkdirOpt = Annotated[Optional[str], typer.Option("-w", "--workdir",
                                                   help="Working directory in the guest.")]
GuestVerboseOpt = Annotated[int, typer.Option("-v", "--verbose", count=True,
                                              help="Say which path served the call.")]
TrustNewOpt = Annotated[bool, typer.Option("--trust-new-host-key",
                                           help="Accept and pin the VM's current host key.")]


@dataclass
class AppContext:
    """What every command needs: output mode, verbosity and the project lookup."""

    verbose: int = 0
    json: bool = False
    project: Path | None = None
    emitted: bool = False  # this invocation's JSON document is out (there is only one)
    _stderr: Any = field(default=None, repr=False)

    def reset(self) -> None:
        self.verbose, self.json, self.project, self.emitted = 0, False, None, False

    @property
    def err(self):
        """A rich console on stderr, for progress and messages meant for people.

        No markup: messages carry `[dotfiles]`, `[ports]` and paths that rich would take for
        style tags. Soft wrap: a long path is never broken across lines. Text is printed with
        its control characters escaped (termsafe): messages carry guest output, file names and
        config values."""
        if self._stderr is None:
            from rich.console import Console

            from ..termsafe import printable

            class SafeConsole(Console):
                def print(self, *objects, **kwargs):
                    super().print(*(printable(o, keep_newlines=True) if isinstance(o, str)
                                    else o for o in objects), **kwargs)

            self._stderr = SafeConsole(stderr=True, highlight=False, markup=False,
                                       soft_wrap=True)
        return self._stderr

    def load(self):
        """The project's resolved config."""
        from ..config import load_project

        return load_project(project_dir=self.project) if self.project else load_project()

    def emit_json(self, data: dict) -> None:
        """Print this invocation's one JSON document (see emit_json below)."""
        emit_json(data)

    def info(self, message: str) -> None:
        if not self.json:
            self.err.print(message)


STATE = AppContext()

#: The version of the --json document format; it changes only when a field changes meaning or
#: goes away (new fields may appear in any version).
JSON_FORMAT_VERSION = 1


def emit_json(data: dict, *, outcome: str = "success") -> None:
    """Print the one JSON document of a --json command on stdout: `version` and `outcome`
    first, then `data` (whose own "outcome" wins). A second call is a bug, refused."""
    if STATE.emitted:
        raise RuntimeError("a --json command printed a second JSON document")
    document = {"version": JSON_FORMAT_VERSION, "outcome": data.get("outcome", outcome)}
    document.update((k, v) for k, v in data.items() if k not in ("version", "outcome"))
    STATE.emitted = True
    sys.stdout.write(json.dumps(document, sort_keys=False) + "\n")
    sys.stdout.flush()


def error_document(exc: MarinerError, **data: Any) -> dict:
    """The --json document of a failure: what the command knows (`data`), then `message`,
    `hint`, `exit_code` and the error's own fields (a ConfigError's `errors[]`)."""
    return {"outcome": "error", **data, "message": exc.message, "hint": exc.hint,
            "exit_code": exc.exit_code, **exc.json_fields()}


def emit_error(exc: MarinerError, **data: Any) -> None:
    """Print the failure document for `exc` unless this invocation already printed one."""
    if not STATE.emitted:
        emit_json(error_document(exc, **data))


def context(project: Path | None = None, json_output: bool = False) -> AppContext:
    """The app object for this invocation, with the command's own options applied."""
    if project is not None:
        STATE.project = project
    STATE.json = json_output
    return STATE


def print_error(exc: MarinerError) -> None:
    """One line on stderr (the fast exec path prints errors the same way)."""
    from ..fastexec import print_error as print_one

    print_one(exc)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"mariner {__version__}")
        raise typer.Exit(0)


def set_verbose(count: int) -> None:
    """-v (host commands) / -vv (debug), given before or after the command name."""
    STATE.verbose += count
    if STATE.verbose:
        logging.basicConfig(level=logging.DEBUG if STATE.verbose > 1 else logging.INFO,
                            format="mariner: %(message)s", stream=sys.stderr)
        logging.getLogger("mariner").setLevel(logging.DEBUG)


def complete_vm_names(incomplete: str) -> list[str]:
    """Shell completion of VM names: the ones in mariner's registry."""
    try:
        from ..state import Registry

        return [name for name in sorted(Registry().load()) if name.startswith(incomplete)]
    except Exception:  # completion must never print a traceback into the shell
        return []


def complete_templates(incomplete: str) -> list[str]:
    from ..project import templates

    return [name for name in templates() if name.startswith(incomplete)]


@app.callback()
def root(
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True,
                                         help="Show host commands and more detail.")] = 0,
    project: ProjectOpt = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    STATE.project = project
    set_verbose(verbose)
