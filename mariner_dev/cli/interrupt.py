"""Ctrl-C and SIGTERM for the commands that change a VM (`up`, `destroy`).

Python's default SIGTERM ends the process at once: no `finally`, so a half-written flake's
staging directory stays behind. Raised as an exception instead, the same cleanups run as for
Ctrl-C. Either way the command ends with one line that says what to do next (a JSON document
with --json), and 130 (SIGINT) or 143 (SIGTERM); typer alone would exit 130 without a word.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from ..errors import MarinerError


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class Interrupted(MarinerError):
    """The command was stopped by SIGINT or SIGTERM; the exit status is 128 + the signal."""


@contextlib.contextmanager
def interruptible(next_step: str) -> Iterator[None]:
    """While inside, SIGTERM raises Terminated like Ctrl-C raises KeyboardInterrupt; either
    becomes Interrupted: one line naming `next_step` (a JSON document with --json), exit
    status 128 + the signal."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (in-process tests): leave signals alone
        previous = None
    try:
        yield
    except KeyboardInterrupt as exc:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        word = "terminated" if signum == signal.SIGTERM else "interrupted"
        raise Interrupted(f"{word}; {next_step}", exit_code=128 + signum) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
