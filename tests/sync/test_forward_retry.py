"""A `[ports] forward` whose host port is taken is retried only for a bounded time after the
agent starts or `up` asks; the agent never binds the port later, behind the user's back (a
host service stopped, and within seconds host clients would have been talking to the VM)."""

from __future__ import annotations

import socket
import time

import pytest

from mariner_dev.remote import client
from mariner_dev.remote.target import target_for
from support.fakehost import wait_for
from support.guest_sshd import free_port

from sync_helpers import EchoServer, echo_roundtrip

RETRY, WINDOW = 0.3, 1.5


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def _busy() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def _free(port: int) -> bool:
    """Nothing listens on the port (what the host service that stopped left behind)."""
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _entry(target, forward: str) -> dict:
    return {f["forward"]: f for f in client.agent_forwards(target)["forwards"]}[forward]


def _start(project, name, forward, port_retry=(RETRY, WINDOW)):
    p = project("", extra=f'[ports]\nforward = ["{forward}"]\n', name=name)
    cfg, record = p.register()
    target = target_for(cfg, record)
    client.spawn_agent(target, client.configured_forwards(cfg.name), port_retry=port_retry)
    wait_for(lambda: _answers(target), timeout=15, what="the agent to answer")
    return target


def _answers(target) -> bool:
    try:
        client.agent_forwards(target)
        return True
    except client.AgentUnavailable:
        return False


def test_a_port_freed_after_the_retry_window_is_not_taken_until_up(project, echo, agents):
    busy = _busy()
    port = busy.getsockname()[1]
    forward = f"{port}:{echo.port}"
    try:
        target = _start(project, "fwlate", forward)
        entry = _entry(target, forward)
        assert entry["state"] == "failed" and entry["retrying"], entry
        wait_for(lambda: not _entry(target, forward)["retrying"], timeout=WINDOW + 5,
                 what="the agent to stop trying")
        busy.close()                       # the host service stops, after the window
        time.sleep(RETRY * 5)
        assert _free(port)                 # the agent did not take it
        entry = _entry(target, forward)
        assert entry["state"] == "failed"
        assert "not forwarded" in entry["error"] and "mariner up" in entry["error"], entry
        # `up` asks: now it is taken.
        info = client.ensure_agent(target, retry_ports=True, warn=lambda line: None)
        assert {f["forward"]: f["state"] for f in info["forwards"]} == {forward: "listening"}
        assert echo_roundtrip(port, b"after up\n") == b"after up\n"
    finally:
        busy.close()


def test_a_port_freed_within_the_window_is_taken(project, echo, agents):
    busy = _busy()
    port = busy.getsockname()[1]
    forward = f"{port}:{echo.port}"
    try:
        target = _start(project, "fwsoon", forward, port_retry=(RETRY, 30))
        assert _entry(target, forward)["state"] == "failed"
        busy.close()
        wait_for(lambda: _entry(target, forward)["state"] == "listening", timeout=10,
                 what="the agent to take the freed port")
        assert echo_roundtrip(port, b"soon\n") == b"soon\n"
    finally:
        busy.close()


def test_up_warns_that_the_retry_is_bounded(project, echo, agents):
    busy = _busy()
    port = busy.getsockname()[1]
    try:
        p = project("", extra=f'[ports]\nforward = ["{port}:{echo.port}", '
                              f'"{free_port()}:{echo.port}"]\n', name="fwwarn")
        cfg, record = p.register()
        lines = []
        client.ensure_agent(target_for(cfg, record), retry_ports=True, warn=lines.append)
        mine = [line for line in lines if f"127.0.0.1:{port} is already in use" in line]
        assert len(mine) == 1, lines
        assert "then no more" in mine[0] and "mariner up" in mine[0], lines
    finally:
        busy.close()
