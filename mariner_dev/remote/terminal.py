"""The local terminal during exec/shell: raw mode (restored on every exit path) and its size."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator


def window_size(fd: int = 1) -> tuple[int, int]:
    """(cols, rows) of the terminal on fd (falls back to stdin, then 80x24)."""
    for candidate in (fd, 0, 2):
        try:
            size = os.get_terminal_size(candidate)
            return size.columns, size.lines
        except OSError:
            continue
    return 80, 24


@contextlib.contextmanager
def raw_mode(fd: int = 0, enabled: bool = True) -> Iterator[None]:
    """Put the terminal on fd into raw mode for the duration; always restore its settings.

    SIGTSTP and friends are not generated in raw mode, and the previous settings come back
    even when the body raises (KeyboardInterrupt, SystemExit, a lost connection).
    """
    if not enabled or not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        # Ignore SIGTTOU while restoring, in case we were moved to the background meanwhile.
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        finally:
            signal.signal(signal.SIGTTOU, old)


def want_tty(force: bool | None) -> bool:
    """-t forces a TTY, -T forbids one; otherwise one when stdin and stdout are terminals."""
    if force is not None:
        return force
    return os.isatty(0) and os.isatty(1)
