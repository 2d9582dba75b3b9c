"""The agent holds `[ports] forward` from its start (`up`, or first use) until it is stopped:
data both ways, through a VM restart, replaced when the list changes, a port in use reported
while everything else keeps working, and `status` lists what the agent actually holds."""

from __future__ import annotations

import json
import os
import socket

import pytest

from mariner_dev import remote
from mariner_dev.remote import client, proto
from mariner_dev.remote.target import GuestTarget, target_for
from support.fakehost import fakehost, wait_for  # noqa: F401  (fixture)
from support.fixtures import run_mariner
from support.guest_sshd import free_port

from sync_helpers import EchoServer, echo_roundtrip


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def roundtrip(port: int, payload: bytes, timeout: float = 20.0) -> bytes:
    return echo_roundtrip(port, payload, timeout)


def forwarding(project, name: str, forwards: list[str], on=None):
    """A registered project whose `[ports] forward` is `forwards`: (cfg, record, target)."""
    listed = ", ".join(f'"{f}"' for f in forwards)
    p = project("", extra=f"[ports]\nforward = [{listed}]\n", name=name, on=on)
    cfg, record = p.register()
    return p, cfg, record, target_for(cfg, record)


def exec_via_agent(p, *args, path_file):
    return run_mariner("exec", "-w", "/", "--", *args, cwd=p.dir, env={
        "MARINER_AGENT": "require", "MARINER_DEBUG_PATH_FILE": str(path_file)})


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def forward_states(target) -> dict[str, str]:
    return {f["forward"]: f["state"] for f in client.agent_forwards(target)["forwards"]}


def test_forwards_carry_data_from_start_until_stop(project, echo, agents):
    host_port = free_port()
    p, cfg, record, target = forwarding(project, "fwstart", [f"{host_port}:{echo.port}"])
    remote.start_agent(cfg, record)                 # what `up` does once SSH answers
    payload = os.urandom(512 * 1024)
    assert roundtrip(host_port, payload) == payload
    assert roundtrip(host_port, b"again\n") == b"again\n"
    table = client.agent_forwards(target)["forwards"]
    assert [(f["forward"], f["state"], f["total"]) for f in table] == \
        [(f"{host_port}:{echo.port}", "listening", 2)]
    remote.stop_agent(cfg.name)
    assert refused(host_port)


def test_first_use_starts_the_agent_with_the_forwards(project, echo, agents, tmp_path):
    host_port = free_port()
    p, cfg, record, target = forwarding(project, "fwfirst", [f"{host_port}:{echo.port}"])
    result = exec_via_agent(p, "true", path_file=tmp_path / "p")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p").read_text().split() == ["agent"]
    assert roundtrip(host_port, b"first use\n") == b"first use\n"


def test_forwards_survive_a_vm_restart(project, own_guest, echo, agents):
    host_port = free_port()
    p, cfg, record, target = forwarding(project, "fwrestart", [f"{host_port}:{echo.port}"],
                                        on=own_guest)
    remote.start_agent(cfg, record)
    assert roundtrip(host_port, b"before\n") == b"before\n"
    pid = client.agent_pid(cfg.name)
    own_guest.sshd.restart()            # every session and the agent's connection are cut

    def carries():
        try:
            return roundtrip(host_port, b"after\n", timeout=5) == b"after\n"
        except OSError:
            return False

    wait_for(carries, timeout=30, what="the forward to carry data after the restart")
    assert client.agent_pid(cfg.name) == pid


def test_a_changed_forward_list_replaces_the_agent_on_up(project, echo, agents, tmp_path):
    first, second = free_port(), free_port()
    p, cfg, record, target = forwarding(project, "fwchange", [f"{first}:{echo.port}"])
    remote.start_agent(cfg, record)
    old = client.agent_pid(cfg.name)
    assert roundtrip(first, b"one\n") == b"one\n"
    p.write("", f'[ports]\nforward = ["{second}:{echo.port}"]\n')
    # exec neither checks nor changes the agent's forwards: only `up` does.
    assert exec_via_agent(p, "true", path_file=tmp_path / "p").returncode == 0
    assert client.agent_pid(cfg.name) == old
    remote.start_agent(p.load(), record)
    new = client.agent_pid(cfg.name)
    assert new not in (None, old)
    assert roundtrip(second, b"two\n") == b"two\n"
    assert refused(first)
    remote.start_agent(p.load(), record)
    assert client.agent_pid(cfg.name) == new          # the same list: kept


def test_a_port_in_use_is_reported_and_the_agent_still_serves(project, echo, agents, tmp_path,
                                                             capfd):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken, free = busy.getsockname()[1], free_port()
    try:
        p, cfg, record, target = forwarding(project, "fwbusy", [f"{taken}:{echo.port}",
                                                                f"{free}:{echo.port}"])
        capfd.readouterr()
        remote.start_agent(cfg, record)
        warnings = capfd.readouterr().err.strip().splitlines()
        assert len(warnings) == 1, warnings
        assert f"127.0.0.1:{taken} is already in use" in warnings[0]
        assert f"sport = :{taken}" in warnings[0] and "[ports] forward" in warnings[0]
        assert roundtrip(free, b"other forward\n") == b"other forward\n"
        result = exec_via_agent(p, "echo", "still serving", path_file=tmp_path / "p")
        assert result.stdout == b"still serving\n", result.stderr
        assert (tmp_path / "p").read_text().split() == ["agent"]
        assert forward_states(target) == {f"{taken}:{echo.port}": "failed",
                                          f"{free}:{echo.port}": "listening"}
        # Freed, the port is taken at the agent's next try.
        busy.close()
        wait_for(lambda: forward_states(target)[f"{taken}:{echo.port}"] == "listening",
                 timeout=proto.PORT_RETRY + 10, what="the agent to take the freed port")
        assert roundtrip(taken, b"now mine\n") == b"now mine\n"
    finally:
        busy.close()


def test_status_asks_the_agent_without_disturbing_it(project, echo, agents):
    host_port = free_port()
    p, cfg, record, target = forwarding(project, "fwprobe", [f"{host_port}:{echo.port}"])
    remote.start_agent(cfg, record)
    pid = client.agent_pid(cfg.name)
    # A question from a client that wants another agent (here: another address) is
    # answered and changes nothing; only a real client replaces the agent.
    other = GuestTarget.from_json(dict(target.to_json(), port=target.port + 1))
    info = client.agent_forwards(other)
    assert info["stale"] and info["forwards"][0]["state"] == "listening"
    assert client.agent_pid(cfg.name) == pid
    assert client.ping(target)["pid"] == pid


def test_status_json_lists_the_forwards_the_agent_holds(fakehost, tmp_path):
    """`mariner up` (fake host, real sshd guest) starts the agent with the forwards and warns
    about a port in use; `mariner status` shows the state of each."""
    from support.fakehost import guest_user, write_project

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken, free = busy.getsockname()[1], free_port()
    name = "tf" + os.urandom(4).hex()
    directory = tmp_path / "api"
    write_project(directory, name, ssh_port=free_port(), user=guest_user(),
                  extra=f'[ports]\nforward = [{free}, "{taken}:80"]\n')

    def mariner(*args, env=None):
        proc = run_mariner(*args, cwd=directory, timeout=120, env=env)
        assert b"Traceback" not in proc.stderr, proc.stderr
        return proc

    try:
        up = mariner("up", "--json")
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["state"] == "running"
        warnings = [line for line in up.stderr.decode().splitlines() if "warning:" in line]
        assert len(warnings) == 1 and f"127.0.0.1:{taken}" in warnings[0], up.stderr
        proc = mariner("status", "--json", env={"PYTHONPROFILEIMPORTTIME": "1"})
        status = json.loads(proc.stdout)
        imported = {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines()
                    if line.startswith("import time:")}
        # (modules imported through importlib, as remote's lazy names are, are not listed)
        assert "mariner_dev.lifecycle" in imported
        assert not {m for m in imported if m.split(".")[0] in ("asyncssh", "cryptography")}
        assert status["agent"] is True
        assert [(f["forward"], f["state"]) for f in status["forwards"]] == \
            [(str(free), "listening"), (f"{taken}:80", "failed")]
        assert "already in use" in status["forwards"][1]["error"]
        text = mariner("status").stdout.decode()
        assert f"127.0.0.1:{free} -> guest 127.0.0.1:{free}  listening" in text
        assert f"127.0.0.1:{taken} -> guest 127.0.0.1:80  failed:" in text
        assert mariner("down").returncode == 0
        status = json.loads(mariner("status", "--json").stdout)
        assert status["agent"] is False
        assert {f["state"] for f in status["forwards"]} == {"not held"}
        assert refused(free)
    finally:
        busy.close()
        remote.stop_agent(name)
