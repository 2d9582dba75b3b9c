"""SIGINT or SIGTERM to a real `mariner up` in each phase, on the runner backend (mariner's own
supervisor, as the developer's unprivileged account when the suite runs as root); the next
`up` completes. The build and a Ctrl-C while waiting for SSH are in test_up.py (both
backends); the microvm backend's own phases (sudo, systemd units) are in test_interrupt.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from test_interrupt import (Up, _completes, interrupted_at_the_pin, interrupted_in_a_hook,
                            interrupted_waiting_for_the_allocation_lock)


@pytest.fixture
def backend(monkeypatch) -> str:
    monkeypatch.setenv("MARINER_BACKEND", "runner")
    return "runner"


def test_allocation(project):
    """Waiting for the allocation lock, which in runner mode is the user's own VM directory
    (another `mariner up` of theirs holds it)."""
    vms = Path(os.environ["XDG_DATA_HOME"]) / "mariner" / "vms"
    vms.mkdir(parents=True, exist_ok=True)
    project.hand_back()         # the directory is the developer's, as mariner made it
    interrupted_waiting_for_the_allocation_lock(project, vms)


def test_start_waiting_for_the_guest(project):
    """The supervisor runs virtiofsd-run and the runner; `up` waits for SSH."""
    up = Up(project, {"MARINER_FAKE_BOOT_DELAY": "5"})
    up.wait_until(lambda: any(project.is_start(c) for c in project.host_calls()), "the start")
    up.wait_until(lambda: "waiting for SSH" in up.stderr, "the wait for SSH")
    up.interrupt(signal.SIGTERM)
    _completes(project)


def test_pin(project):
    interrupted_at_the_pin(project, signal.SIGINT)


@pytest.mark.parametrize("hook,sig", [("post_create", signal.SIGINT),
                                      ("post_start", signal.SIGTERM)])
def test_hooks(project, hook, sig):
    interrupted_in_a_hook(project, hook, sig)
