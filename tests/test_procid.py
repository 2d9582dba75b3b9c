"""Process identity: a marker (an attached watcher, the agent's lock file) names a process by
pid and start time; a stale one never leads mariner to signal an unrelated process."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mariner_dev import procid, state
from mariner_dev.remote import client


@pytest.fixture
def bystander():
    """An unrelated process that happens to have the pid a stale marker names."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_start_time_tells_processes_apart(bystander):
    started = procid.start_time(bystander.pid)
    assert started is not None and procid.is_alive(bystander.pid, started)
    assert not procid.is_alive(bystander.pid, started + 1)
    assert not procid.is_alive(bystander.pid, None)
    assert not procid.signal_process(bystander.pid, started - 1, signal.SIGTERM)
    assert not procid.signal_process(bystander.pid, None, signal.SIGTERM)
    assert bystander.poll() is None
    assert procid.signal_process(bystander.pid, started, signal.SIGTERM)
    assert bystander.wait(5) == -signal.SIGTERM
    assert procid.start_time(bystander.pid) is None


def test_a_stale_attached_marker_kills_nothing(bystander):
    # A `sync --watch` that died without removing its marker; its pid is now someone else's.
    directory = state.attached_dir("vm1")
    directory.mkdir(parents=True)
    marker = directory / f"{bystander.pid}.json"
    marker.write_text(json.dumps({"pid": bystander.pid, "kind": "sync-watch",
                                  "start": procid.start_time(bystander.pid) - 7}))
    old_style = directory / "1.json"                  # pid only: whose pid it is is unknown
    old_style.write_text(json.dumps({"pid": bystander.pid, "kind": "forward"}))
    assert state.stop_attached("vm1", timeout=1) == []
    time.sleep(0.2)
    assert bystander.poll() is None
    assert not marker.exists() and not old_style.exists()


def test_a_live_attached_process_is_stopped(tmp_path):
    code = ("import sys, time; from mariner_dev import state\n"
            "with state.attached('vm2', 'sync-watch'):\n"
            "    print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        marker = json.loads((state.attached_dir("vm2") / f"{proc.pid}.json").read_text())
        assert marker["start"] == procid.start_time(proc.pid)
        assert state.stop_attached("vm2") == ["sync-watch"]
        assert proc.wait(5) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_stop_agent_never_signals_a_process_the_lock_file_does_not_vouch_for(bystander):
    # A lock file that is held (here by the test) but names the bystander with another start
    # time: not the agent that wrote it.
    lock = client.lock_path("vm3")
    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{bystander.pid} {procid.start_time(bystander.pid) + 1}\n".encode())
        assert client.agent_process("vm3") == (bystander.pid,
                                               procid.start_time(bystander.pid) + 1)
        client.stop_agent("vm3", timeout=0.5)
        assert bystander.poll() is None
    finally:
        os.close(fd)
