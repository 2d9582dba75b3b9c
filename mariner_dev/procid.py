"""Process identity: a pid together with its start time, so that a marker left behind by a
process that is gone never leads mariner to signal an unrelated process that got its pid.

The start time is field 22 of /proc/<pid>/stat (clock ticks since boot): two processes that
share a pid never share it. Signals go through a pidfd where the kernel has them, opened
before the start time is compared, so that the pid cannot be reused in between.
"""

from __future__ import annotations

import os
import signal as _signal


def start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), None when there is none."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            data = fh.read()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')'.
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[19])       # field 22; `rest` starts at field 3
    except (IndexError, ValueError):
        return None


def current() -> tuple[int, int | None]:
    """This process: (pid, start time)."""
    pid = os.getpid()
    return pid, start_time(pid)


def is_alive(pid: int, started: int | None) -> bool:
    """Process `pid` runs and is the one that started at `started` (a marker without a
    start time matches nothing: mariner cannot tell whose pid it is)."""
    return started is not None and start_time(pid) == started


def signal_process(pid: int, started: int | None, signum: int) -> bool:
    """Send `signum` to `pid` only if it is still the process that started at `started`;
    True when it was sent."""
    if started is None or pid <= 0:
        return False
    pidfd = None
    if hasattr(os, "pidfd_open") and hasattr(_signal, "pidfd_send_signal"):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError:     # an older kernel: fall back to kill() after the check
            pidfd = None
    try:
        if start_time(pid) != started:
            return False
        try:
            if pidfd is not None:
                _signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            return False
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)
