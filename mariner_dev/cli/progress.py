"""Showing what a long command is doing: a live line with the phase and elapsed time on a
terminal, plain lines otherwise (logs, CI, --json)."""

from __future__ import annotations

import sys
import time


class PhaseDisplay:
    """A callable that takes the current phase; use as a context manager."""

    def __init__(self, console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.start = time.monotonic()
        self.live = enabled and sys.stderr.isatty()
        self._status = None

    def __enter__(self) -> "PhaseDisplay":
        if self.live:
            self._status = self.console.status("starting")
            self._status.__enter__()
        return self

    def __call__(self, phase: str) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if self._status is not None:
            self._status.update(f"{phase}  [{elapsed:4.1f}s]")
        else:
            from ..termsafe import printable

            sys.stderr.write(f"mariner: {printable(phase)}\n")
            sys.stderr.flush()

    def paused(self, action):
        """Run `action()` (a question to the user) with the live line out of the way."""
        if self._status is None:
            return action()
        self._status.stop()
        try:
            return action()
        finally:
            self._status.start()

    def __exit__(self, *exc) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)
