"""The local terminal during exec/shell: raw mode (restored on every exit path) and its size."""

from __future__ import annotations

import os


def window_size(fd: int = 1) -> tuple[int, int]:
    """(cols, rows) of the terminal on fd (falls back to stdin, then 80x24)."""
    for candidate in (fd, 0, 2):
        try:
            size = os.get_terminal_size(candidate)
            return size.columns, size.lines
        except OSError:
            continue
    return 80, 24


class raw_mode:
    """`with raw_mode(fd):` puts the terminal on fd into raw mode for the block, and always
    restores its settings.

    SIGTSTP and friends are not generated in raw mode, and the previous settings come back
    even when the body raises (KeyboardInterrupt, SystemExit, a lost connection). A class
    rather than a contextlib generator: the exec fast path does not import contextlib.
    """

    def __init__(self, fd: int = 0, enabled: bool = True):
        self.fd = fd
        self.enabled = enabled
        self._saved = None

    def __enter__(self) -> None:
        if not self.enabled or not os.isatty(self.fd):
            return
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        try:
            tty.setraw(self.fd, termios.TCSANOW)
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        import signal
        import termios

        # Ignore SIGTTOU while restoring, in case we were moved to the background meanwhile.
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
        finally:
            signal.signal(signal.SIGTTOU, old)


def want_tty(force: bool | None) -> bool:
    """-t forces a TTY, -T forbids one; otherwise one when stdin and stdout are terminals."""
    if force is not None:
        return force
    return os.isatty(0) and os.isatty(1)
