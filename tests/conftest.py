"""Test isolation for every test, applied automatically.

HOME, MARINER_HOME, MARINER_MICROVMS_DIR and the XDG directories point into a temporary
directory, so no test can touch the real ~/.ssh, /var/lib/microvms or mariner state.
"""

from __future__ import annotations

import signal as _signal

# A run started in the background by a non-interactive shell (as a CI runner may do) inherits
# SIGINT ignored, and an ignored signal stays ignored across exec: every `mariner up` a test
# interrupts would then ignore Ctrl-C. Tests need the terminal's default.
if _signal.getsignal(_signal.SIGINT) is _signal.SIG_IGN:
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)


import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.tools import require_tool  # noqa: E402  (re-exported for tests)

@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own HOME, MARINER_HOME, microvm directory and XDG directories."""
    base = tmp_path_factory.mktemp("env")
    home = base / "home"
    home.mkdir()
    # Unix socket paths are limited to 108 bytes: the runtime directory stays short.
    runtime = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))
    os.chmod(runtime, 0o700)
    env = {
        "HOME": str(home),
        "MARINER_HOME": str(base / "mariner-home"),
        "MARINER_MICROVMS_DIR": str(base / "microvms"),
        "XDG_STATE_HOME": str(base / "xdg-state"),
        "XDG_CONFIG_HOME": str(base / "xdg-config"),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CACHE_HOME": str(base / "xdg-cache"),
        "XDG_DATA_HOME": str(base / "xdg-data"),
        # The backend is the host's business: tests say which one they play.
        "MARINER_BACKEND": "microvm",
        "NO_COLOR": "1",
        "COLUMNS": "120",
        "TERM": "xterm-256color",
        "MARINER_SUDO": "",
        "MARINER_GCROOTS_DIR": str(base / "gcroots"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("MARINER_AGENT", "SSH_AUTH_SOCK", "MARINER_FAKEHOST_LOG"):
        monkeypatch.delenv(key, raising=False)
    (base / "microvms").mkdir()
    yield base
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def run_cli(capfd):
    """Run `mariner ARGS` in-process; returns (exit code, stdout, stderr)."""
    from mariner_dev.cli import main

    def run(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
        old = os.getcwd()
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = main(list(args))
        finally:
            os.chdir(old)
        out, err = capfd.readouterr()
        return code, out, err

    return run


# -- threads that outlive their test ---------------------------------------------------------
# A test double's thread still running after its test (a fake agent blocked in accept() or
# recv() on a socket the test closed) can wake minutes later and write into whatever socket
# reused that descriptor number in this process: another test's forwarded connection got a
# fake agent's frames that way. Every thread a test starts must end with the test.
import threading as _threading  # noqa: E402
import time as _time  # noqa: E402

_THREAD_GRACE = 3.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item._threads_before = set(_threading.enumerate())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    before = getattr(item, "_threads_before", None)
    if before is not None:
        _fail_on_threads_left(item, before)
    return result


def _fail_on_threads_left(item, before: set) -> None:
    deadline = _time.monotonic() + _THREAD_GRACE
    while True:
        left = [t for t in _threading.enumerate() if t not in before and t.is_alive()]
        if not left or _time.monotonic() > deadline:
            break
        _time.sleep(0.05)
    if left:
        import traceback

        frames = sys._current_frames()
        lines = []
        for thread in left:
            stack = frames.get(thread.ident)
            where = "".join(traceback.format_stack(stack)[-4:]) if stack else "?"
            lines.append(f"{thread.name}:\n{where}")
        report = os.environ.get("MARINER_TEST_THREAD_REPORT")
        if report:
            with open(report, "a") as fh:
                fh.write(f"== {item.nodeid}\n" + "\n".join(lines) + "\n")
        else:
            pytest.fail(f"{len(left)} thread(s) started by this test still run after it:\n"
                        + "\n".join(lines), pytrace=False)
