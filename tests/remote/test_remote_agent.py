"""The per-VM agent: its socket, replacing stale or foreign agents, reconnects, exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mariner_dev import remote
from mariner_dev.remote import client, proto
from support.fixtures import REPO, make_project, run_mariner, start_guest, stop_guest


def _exec(project, *args, mode="require", path_file=None, **kw):
    env = {"MARINER_AGENT": mode}
    if path_file:
        env["MARINER_DEBUG_PATH_FILE"] = str(path_file)
    return run_mariner("exec", *args, cwd=project.dir, env=env, **kw)


def _wait(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_start_stop_and_socket_permissions(project):
    remote.stop_agent(project.name)
    assert not remote.agent_running(project.name)
    remote.start_agent(project.cfg, project.record)
    assert remote.agent_running(project.name)
    path = client.socket_path(project.name)
    assert len(os.fsencode(str(path))) < 108
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # start_agent again reuses the running one.
    pid = client.agent_pid(project.name)
    remote.start_agent(project.cfg, project.record)
    assert client.agent_pid(project.name) == pid
    remote.stop_agent(project.name)
    assert not remote.agent_running(project.name)
    assert not path.exists()


def test_first_use_starts_the_agent(project, tmp_path):
    remote.stop_agent(project.name)
    result = _exec(project, "--", "echo", "hi", path_file=tmp_path / "p")
    assert (result.returncode, result.stdout) == (0, b"hi\n")
    assert (tmp_path / "p").read_text().split() == ["agent"]
    assert remote.agent_running(project.name)


def test_stale_socket_without_agent_is_replaced(project, tmp_path):
    remote.stop_agent(project.name)
    path = client.socket_path(project.name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A socket file nobody listens on, as a crashed agent leaves behind.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    result = _exec(project, "--", "echo", "ok", path_file=tmp_path / "p")
    assert result.stdout == b"ok\n", result.stderr
    assert (tmp_path / "p").read_text().split() == ["agent"]


def test_killed_agent_is_replaced(project, tmp_path):
    assert _exec(project, "--", "true").returncode == 0
    old = client.agent_pid(project.name)
    os.kill(old, signal.SIGKILL)
    assert _wait(lambda: not remote.agent_running(project.name))
    result = _exec(project, "--", "echo", "again", path_file=tmp_path / "p")
    assert result.stdout == b"again\n", result.stderr
    assert (tmp_path / "p").read_text().split() == ["agent"]
    assert client.agent_pid(project.name) not in (None, old)


def test_agent_of_another_build_is_replaced(project, tmp_path):
    remote.stop_agent(project.name)
    # An "older build": a copy of the package whose remote code differs by one comment.
    old_tree = tmp_path / "old"
    shutil.copytree(REPO / "mariner_dev", old_tree / "mariner_dev",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(old_tree / "mariner_dev" / "remote" / "agent.py", "a") as fh:
        fh.write("\n# an older build\n")
    env = dict(os.environ, PYTHONPATH=str(old_tree))
    subprocess.Popen([sys.executable, "-m", "mariner_dev.remote.agent",
                      json.dumps(project.target.to_json())], env=env, cwd="/",
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    assert _wait(lambda: client.socket_path(project.name).exists()
                 and remote.agent_running(project.name))
    old = client.agent_pid(project.name)
    with pytest.raises(client.AgentUnavailable) as info:
        client.ping(project.target)
    assert info.value.stale
    result = _exec(project, "--", "echo", "new", path_file=tmp_path / "p")
    assert result.stdout == b"new\n", result.stderr
    assert (tmp_path / "p").read_text().split() == ["agent"]
    new = client.agent_pid(project.name)
    assert new not in (None, old)
    assert client.ping(project.target)["pid"] == new


def test_a_client_of_protocol_1_gets_a_json_stale_answer(project, tmp_path):
    """A client of the previous release (JSON answers only) is told "stale" in JSON, and the
    agent steps down for the client's build, as before."""
    assert _exec(project, "--", "true").returncode == 0
    old = client.agent_pid(project.name)
    hello = {"proto": 1, "build": "an older build", "target": project.target.fingerprint(),
             "op": "ping", "request": None}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(client.socket_path(project.name)))
        sock.sendall(proto.frame(proto.HELLO, json.dumps(hello).encode()))
        kind, length = proto.parse_header(sock.recv(proto.HEADER_SIZE, socket.MSG_WAITALL))
        answer = json.loads(sock.recv(length, socket.MSG_WAITALL))
    assert kind == proto.ERROR and answer["kind"] == "stale", answer
    assert _wait(lambda: client.agent_pid(project.name) != old)
    result = _exec(project, "--", "echo", "new", path_file=tmp_path / "p")
    assert result.stdout == b"new\n", result.stderr
    assert (tmp_path / "p").read_text().split() == ["agent"]


def test_require_fails_with_125_when_the_vm_is_down(remote_isolation, tmp_path):
    guest = start_guest(tmp_path / "g")
    try:
        proj = make_project(guest, remote_isolation.env())
        guest.sshd.stop()
        for mode in ("require", "off"):
            result = _exec(proj, "--", "true", mode=mode)
            assert result.returncode == 125, (mode, result.stderr)
            lines = result.stderr.decode().strip().splitlines()
            assert len(lines) == 1 and proj.name in lines[0] and "mariner up" in lines[0], lines
    finally:
        remote.stop_agent(proj.name)
        stop_guest(guest)


def test_exec_on_a_vm_that_is_down_leaves_no_agent_behind(remote_isolation, tmp_path):
    # An agent started then would hold [ports] forward on the host for a VM that is down.
    guest = start_guest(tmp_path / "g")
    try:
        proj = make_project(guest, remote_isolation.env(), extra_toml="[ports]\nforward = [8000]\n")
        guest.sshd.stop()
        remote.stop_agent(proj.name)
        result = _exec(proj, "--", "true", mode="auto")
        assert result.returncode == 125, result.stderr
        assert "mariner up" in result.stderr.decode()
        assert not remote.agent_running(proj.name)
        assert not client.socket_path(proj.name).exists()
    finally:
        remote.stop_agent(proj.name)
        stop_guest(guest)


def test_agent_reconnects_after_the_vm_restarts_and_exits_when_it_is_gone(remote_isolation,
                                                                         tmp_path):
    from mariner_dev.state import Registry

    guest = start_guest(tmp_path / "g")
    try:
        proj = make_project(guest, remote_isolation.env())
        assert _exec(proj, "--", "true").returncode == 0
        pid = client.agent_pid(proj.name)
        # A VM restart: every session and the agent's connection are cut.
        guest.sshd.restart()
        result = _exec(proj, "--", "echo", "back", path_file=tmp_path / "p")
        assert result.stdout == b"back\n", result.stderr
        assert (tmp_path / "p").read_text().split() == ["agent"]
        assert client.agent_pid(proj.name) == pid
        # The VM is destroyed (gone from the registry): the agent exits by itself.
        with Registry().transaction() as vms:
            del vms[proj.name]
        assert _wait(lambda: not remote.agent_running(proj.name), timeout=15)
        assert not client.socket_path(proj.name).exists()
    finally:
        remote.stop_agent(proj.name)
        stop_guest(guest)


def test_off_never_starts_an_agent(project, tmp_path):
    remote.stop_agent(project.name)
    result = _exec(project, "--", "true", mode="off", path_file=tmp_path / "p")
    assert result.returncode == 0
    assert (tmp_path / "p").read_text().split() == ["direct"]
    assert not remote.agent_running(project.name)


def test_fast_path_imports_no_heavy_modules(project):
    assert _exec(project, "--", "true").returncode == 0  # agent up, cache warm
    result = run_mariner("exec", "--", "true", cwd=project.dir, env={
        "MARINER_AGENT": "require", "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "mariner_dev.remote.client" in imported
    heavy = {m for m in imported if m.split(".")[0] in
             ("asyncssh", "typer", "click", "rich", "tomlkit", "cryptography")}
    assert not heavy


# What the exec client used to import and no longer does, with what each cost at start-up here:
# json (re and enum with it) ~9 ms, typing ~3 ms, pathlib (urllib.parse, ipaddress) ~5 ms, the
# Python layers of socket and signal (an enum class per constant set) ~8 ms, contextlib ~2 ms.
FAST_PATH_FORBIDDEN = ("json", "re", "enum", "pathlib", "typing", "socket", "signal",
                       "selectors", "contextlib", "dataclasses", "hashlib", "asyncssh", "typer",
                       "click", "rich", "tomlkit", "cryptography")


def test_fast_path_imports_only_the_light_modules(project):
    """The console script's own path (cli.main), with -S so that no site-packages .pth file
    imports anything first: every module named here would have been imported by mariner."""
    assert _exec(project, "--", "true").returncode == 0  # agent up, cache warm
    env = dict(os.environ, MARINER_AGENT="require", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", "-c",
         "import sys; from mariner_dev.cli import main; sys.exit(main(sys.argv[1:]))",
         "exec", "--", "sh", "-c", "echo ok; exit 3"],
        cwd=project.dir, env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    assert (result.returncode, result.stdout) == (3, b"ok\n"), result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "mariner_dev.remote.client" in imported
    assert not {m for m in imported if m.split(".")[0] in FAST_PATH_FORBIDDEN}


def test_cached_resolution_follows_config_edits(project, tmp_path):
    toml = project.dir / "mariner.toml"
    original = toml.read_text()
    try:
        assert _exec(project, "--", "sh", "-c", 'echo "$FROM_TOML"').stdout == b"toml value\n"
        toml.write_text(original.replace('"toml value"', '"edited value"'))
        assert _exec(project, "--", "sh", "-c", 'echo "$FROM_TOML"').stdout == b"edited value\n"
    finally:
        toml.write_text(original)
