"""`mariner sync` served by the per-VM agent (its held connection and SFTP client), the
direct path with MARINER_AGENT=off, and which path served each call."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path

import pytest

from mariner_dev.remote import client
from support.fixtures import run_mariner

from sync_helpers import write


@pytest.fixture
def tree(home, guest):
    """A dotfiles directory of its own under ~ (host), removed from the guest afterwards."""
    name = f".mt-agent-{secrets.token_hex(4)}"
    write(home / name / "a.conf", "a\n", 0o640, 1_600_000_000)
    write(home / name / "sub" / "b.sh", "#!/bin/sh\necho b\n", 0o755, 1_600_000_100)
    yield name
    shutil.rmtree(guest.home / name, ignore_errors=True)


def sync(p, *args, mode: str, path_file: Path, env: dict | None = None):
    result = run_mariner("sync", *args, cwd=p.dir, env={
        "MARINER_AGENT": mode, "MARINER_DEBUG_PATH_FILE": str(path_file), **(env or {})})
    assert b"Traceback" not in result.stderr, result.stderr
    return result


def served(path_file: Path) -> list[str]:
    return path_file.read_text().split() if path_file.exists() else []


def test_sync_through_the_agent(home, guest, project, tree, agents, tmp_path):
    p = project(f'files = ["~/{tree}"]\n', name="syncagent")
    cfg, record = p.register()
    paths = tmp_path / "served"
    first = sync(p, mode="require", path_file=paths)
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().splitlines() == [f"added    ~/{tree}/a.conf (2 B)",
                                                  f"added    ~/{tree}/sub/b.sh (17 B)"]
    assert "2 changed" in first.stderr.decode()
    assert served(paths) == ["agent"]
    landed = guest.home / tree / "sub" / "b.sh"
    assert landed.read_text() == "#!/bin/sh\necho b\n"
    assert stat.S_IMODE(landed.stat().st_mode) == 0o755
    assert int(landed.stat().st_mtime) == 1_600_000_100
    pid = client.agent_pid(cfg.name)
    assert pid is not None

    again = sync(p, "--json", mode="require", path_file=paths)
    report = json.loads(again.stdout)
    assert again.returncode == 0 and report["changes"] == [] and report["bytes_sent"] == 0
    assert report["checked"] == 4

    write(home / tree / "a.conf", "changed\n", 0o640)
    dry = sync(p, "--dry-run", mode="require", path_file=paths)
    assert dry.stdout.decode().splitlines() == [f"would be updated  ~/{tree}/a.conf (8 B)"]
    assert (guest.home / tree / "a.conf").read_text() == "a\n"
    assert served(paths) == ["agent"] * 3
    assert client.agent_pid(cfg.name) == pid         # one agent served every call


def test_the_agent_client_imports_no_asyncssh(home, guest, project, tree, agents, tmp_path):
    p = project(f'files = ["~/{tree}"]\n', name="syncimports")
    p.register()
    assert sync(p, mode="require", path_file=tmp_path / "p").returncode == 0
    result = sync(p, mode="require", path_file=tmp_path / "p",
                  env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "mariner_dev.remote.client" in imported
    assert not {m for m in imported if m.split(".")[0] in ("asyncssh", "cryptography")}
    assert "mariner_dev.sync.engine" not in imported


def test_agent_off_syncs_directly(home, guest, project, tree, agents, tmp_path):
    p = project(f'files = ["~/{tree}"]\n', name="syncdirect")
    cfg, _ = p.register()
    paths = tmp_path / "served"
    first = sync(p, mode="off", path_file=paths)
    assert first.returncode == 0, first.stderr
    assert (guest.home / tree / "a.conf").read_text() == "a\n"
    again = sync(p, "--json", mode="off", path_file=paths)
    assert json.loads(again.stdout)["bytes_sent"] == 0
    assert served(paths) == ["direct", "direct"]
    assert not client.agent_running(cfg.name)
    # The default (auto) starts the agent on first use; the manifest is the same one.
    auto = sync(p, "--json", mode="auto", path_file=paths)
    assert json.loads(auto.stdout)["bytes_sent"] == 0
    assert served(paths)[-1] == "agent" and client.agent_running(cfg.name)


def test_the_agent_syncs_again_after_the_vm_restarts(home, project, own_guest, agents,
                                                     tmp_path):
    name = f".mt-agent-{secrets.token_hex(4)}"
    write(home / name / "a.conf", "one\n")
    p = project(f'files = ["~/{name}"]\n', name="syncrestart", on=own_guest)
    p.register()
    paths = tmp_path / "served"
    try:
        assert sync(p, mode="require", path_file=paths).returncode == 0
        own_guest.sshd.restart()          # the agent's connection and SFTP client die
        write(home / name / "a.conf", "two\n")
        result = sync(p, mode="require", path_file=paths)
        assert result.returncode == 0, result.stderr
        assert (own_guest.home / name / "a.conf").read_text() == "two\n"
        assert served(paths) == ["agent", "agent"]
    finally:
        shutil.rmtree(own_guest.home / name, ignore_errors=True)


def test_a_failed_sync_in_the_agent_is_one_line(home, guest, project, agents, tmp_path):
    name = f".mt-agent-{secrets.token_hex(4)}"
    write(home / name / "a.conf", "a\n")
    # The directory exists in the guest but belongs to root (the tests run as root): the
    # guest account cannot write in it, so the guest refuses the file.
    blocker = guest.home / name
    blocker.mkdir(mode=0o755)
    if guest.uid == os.getuid():
        blocker.chmod(0o555)
    try:
        p = project(f'files = ["~/{name}"]\n', name="syncfail")
        p.register()
        results = [sync(p, mode=mode, path_file=tmp_path / "p") for mode in ("require", "off")]
        for result in results:
            err = result.stderr.decode()
            assert result.returncode == 1 and result.stdout == b"", err
            assert err.startswith("mariner: error: the guest refused 1 change(s)"), err
            assert "hint: what did get through is recorded" in err
        assert served(tmp_path / "p") == ["agent", "direct"]
    finally:
        shutil.rmtree(blocker, ignore_errors=True)


def test_a_sync_waiting_for_the_lock_does_not_stall_the_agent(home, guest, project, tree,
                                                              agents, tmp_path):
    """While another sync (`sync --watch`, `up`) holds the VM's dotfiles lock, a sync through
    the agent waits for it without blocking the agent: exec is served meanwhile."""
    import subprocess
    import time

    from mariner_dev import paths
    from mariner_dev.fsutil import file_lock
    from support.fakehost import wait_for
    from support.fixtures import REPO, mariner_cmd

    p = project(f'files = ["~/{tree}"]\n', name="synclock")
    cfg, _ = p.register()
    assert sync(p, "--dry-run", mode="require", path_file=tmp_path / "p").returncode == 0
    accepted = tmp_path / "accepted"
    env = dict(os.environ, MARINER_AGENT="require", PYTHONPATH=str(REPO),
               MARINER_DEBUG_PATH_FILE=str(accepted))
    with file_lock(paths.vm_dir(cfg.name) / "dotfiles.lock"):
        waiting = subprocess.Popen([*mariner_cmd(), "sync"], cwd=p.dir, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # The agent took the request (it answers before it goes for the lock).
            wait_for(lambda: served(accepted) == ["agent"], timeout=20,
                     what="the agent to accept the sync")
            started = time.monotonic()
            result = run_mariner("exec", "-w", "/", "--", "echo", "served", cwd=p.dir,
                                 env={"MARINER_AGENT": "require"})
            assert result.stdout == b"served\n", result.stderr
            assert time.monotonic() - started < 5
            assert waiting.poll() is None            # still waiting for the lock
        except BaseException:
            waiting.kill()
            raise
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert f"~/{tree}/a.conf" in out.decode()
