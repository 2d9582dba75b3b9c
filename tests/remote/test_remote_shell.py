"""`mariner shell` in a real terminal (tmux): prompt, typing, resize, exit status, and the
local terminal restored afterwards; through the agent and directly."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid

import pytest

from support.fixtures import REPO
from support.tools import require_tool


class Tmux:
    def __init__(self, socket_path: str):
        self.tmux = require_tool("tmux")
        self.socket = socket_path

    def __call__(self, *args: str) -> str:
        return subprocess.run([self.tmux, "-S", self.socket, *args], check=True,
                              capture_output=True, text=True, timeout=20).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-J", "-t", "s")

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared; screen:\n{self.screen()}")


@pytest.mark.parametrize("mode", ["require", "off"])
def test_shell_in_tmux(project, tmp_path, mode):
    served = tmp_path / "served"
    tmux = Tmux(f"/tmp/mrt-{uuid.uuid4().hex[:8]}")
    env = {"MARINER_AGENT": mode, "MARINER_DEBUG_PATH_FILE": str(served),
           "PYTHONPATH": str(REPO), "PS1": "$ "}
    mariner = shlex.join([sys.executable, "-m", "mariner_dev", "shell"])
    # tmux 3.3a may not record a dead pane's status: the pane's own shell prints it, then
    # shows whether the terminal is back in canonical mode.
    script = (f"cd {shlex.quote(str(project.dir / 'pkg'))} && {mariner}; "
              f"echo EXIT:$?; stty -a | tr ' ' '\\n' | grep -x -e icanon -e -icanon; sleep 60")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    try:
        tmux("-f", "/dev/null", "new-session", "-d", "-s", "s", "-x", "80", "-y", "24",
             f"env {exports} sh -c {shlex.quote(script)}")
        tmux("set-option", "-t", "s", "window-size", "manual")
        marker = "READY" + uuid.uuid4().hex[:6]
        tmux("send-keys", "-t", "s", f"PS1='$ '; echo {marker}${{TERM:+-}}$TERM; pwd", "Enter")
        screen = tmux.wait_for(f"{marker}-")
        assert f"{project.mount}/pkg" in tmux.wait_for("/pkg")
        assert f"{marker}-xterm" in screen or f"{marker}-screen" in screen or \
            f"{marker}-tmux" in screen, screen
        tmux("send-keys", "-t", "s", "stty size", "Enter")
        tmux.wait_for("24 80")
        tmux("resize-window", "-t", "s", "-x", "100", "-y", "30")
        time.sleep(0.3)
        tmux("send-keys", "-t", "s", "clear; stty size", "Enter")
        tmux.wait_for("30 100")
        tmux("send-keys", "-t", "s", "exit 3", "Enter")
        screen = tmux.wait_for("EXIT:3")
        lines = [l.strip() for l in tmux.wait_for("icanon").splitlines()]
        assert "icanon" in lines and "-icanon" not in lines, screen
    finally:
        subprocess.run([require_tool("tmux"), "-S", tmux.socket, "kill-server"],
                       capture_output=True)
        if os.path.exists(tmux.socket):
            os.unlink(tmux.socket)
    assert served.read_text().split() == [{"require": "agent", "off": "direct"}[mode]]


def test_shell_with_a_command_uses_a_pty_and_passes_status(project):
    from support.fixtures import run_mariner

    result = run_mariner("shell", "tty; exit 5", cwd=project.dir,
                         env={"MARINER_AGENT": "require"})
    assert result.returncode == 5, result.stderr
    assert result.stdout.decode().strip().startswith("/dev/pts/")
