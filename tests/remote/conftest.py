"""Fixtures for the remote tests: a real sshd as the guest, one per module, and a runner that
drives `mariner exec` through the agent and without it, asserting which path served each call."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.fixtures import *  # noqa: F401,F403  (guest, remote_home, project, ...)
from support.fixtures import run_mariner

PATHS = {"require": "agent", "off": "direct"}


@pytest.fixture(autouse=True)
def _remote_env(remote_isolation):
    """Every test in this directory shares its module's MARINER_HOME and runtime dir."""
    yield remote_isolation


class ExecRunner:
    """Runs `mariner exec` in a subprocess and checks that the expected path served it."""

    def __init__(self, mode: str, path_file: Path, project):
        self.mode = mode
        self.expected = PATHS[mode]
        self.path_file = path_file
        self.project = project

    def served(self) -> list[str]:
        try:
            return self.path_file.read_text().split()
        except FileNotFoundError:
            return []

    def __call__(self, *args: str, cwd: Path | None = None, input: bytes | None = None,
                 env: dict | None = None, served: bool = True, timeout: float = 60):
        before = len(self.served())
        result = run_mariner("exec", *args, cwd=cwd or self.project.dir, input=input, env=env,
                             timeout=timeout)
        new = self.served()[before:]
        if served:
            assert new == [self.expected], (new, result.stderr.decode(errors="replace"))
        return result

    def env(self) -> dict:
        return {"MARINER_AGENT": self.mode, "MARINER_DEBUG_PATH_FILE": str(self.path_file)}


@pytest.fixture(params=["require", "off"])
def mx(request, project, tmp_path, monkeypatch):
    """`mx("--", "cmd", ...)` runs mariner exec in `project`, via the agent or directly."""
    runner = ExecRunner(request.param, tmp_path / "served-by", project)
    for key, value in runner.env().items():
        monkeypatch.setenv(key, value)
    return runner
