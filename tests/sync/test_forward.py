"""Port forwards over the real sshd: data both ways, clean close, port in use, VM restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from mariner_dev.forward import Forwarder, PortInUse, parse_forward
from mariner_dev.model import PortForward
from mariner_dev.remote.target import target_for
from mariner_dev.sync.link import GuestLink
from support.fixtures import REPO
from support.guest_sshd import free_port

from sync_helpers import EchoServer, LineReader, Lines, LoopThread, echo_roundtrip
from support.fakehost import wait_for


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_parse_forward():
    assert parse_forward("8000") == PortForward(8000, 8000)
    assert parse_forward("15432:5432") == PortForward(15432, 5432)
    for bad in ("", "x", "0", "70000", "1:2:3", "80:", ":80"):
        with pytest.raises(Exception) as info:
            parse_forward(bad)
        assert "PORT or HOST:GUEST" in str(info.value)


def test_a_forward_carries_data_both_ways_and_closes_cleanly(project, echo, loop):
    cfg, record = project().register()
    lines = Lines()
    link = GuestLink(target_for(cfg, record), lines)
    host_port = free_port()
    fw = Forwarder([PortForward(host_port, echo.port)], link.get, lines)
    loop.call(fw.start())
    payload = os.urandom(3 * 1024 * 1024 + 17)
    assert echo_roundtrip(host_port, payload) == payload
    assert echo_roundtrip(host_port, b"second") == b"second"
    # The client's half-close reached the service in the guest, and its EOF came back.
    wait_for(lambda: echo.eofs == 2, 5, "the guest service to see both EOFs")
    wait_for(lambda: fw.table()[0]["active"] == 0, 5, "the connections to end")
    assert fw.table()[0]["total"] == 2
    loop.call(fw.close())
    loop.call(link.close())
    assert port_free(host_port)
    assert lines.snapshot() == []


def test_a_port_in_use_fails_the_whole_set(project, echo, loop):
    cfg, record = project().register()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    other = free_port()
    fw = Forwarder([PortForward(other, echo.port), PortForward(busy, 80)],
                   GuestLink(target_for(cfg, record)).get)
    with pytest.raises(PortInUse) as info:
        loop.call(fw.start())
    assert f"127.0.0.1:{busy} is already in use" in info.value.message
    assert port_free(other)          # nothing of the set is left listening
    taken.close()


def test_a_refused_guest_port_is_reported_and_the_client_closed(project, loop):
    cfg, record = project().register()
    lines = Lines()
    link = GuestLink(target_for(cfg, record), lines)
    dead = free_port()
    host_port = free_port()
    fw = Forwarder([PortForward(host_port, dead)], link.get, lines)
    loop.call(fw.start())
    assert echo_roundtrip(host_port, b"hello?") == b""
    wait_for(lambda: lines.having(f"the guest refused 127.0.0.1:{dead}"), 5, "the report")
    loop.call(fw.close())
    loop.call(link.close())


def test_forwards_survive_a_vm_restart(project, own_guest, echo, loop):
    cfg, record = project(on=own_guest).register()
    lines = Lines()
    link = GuestLink(target_for(cfg, record), lines)
    host_port = free_port()
    fw = Forwarder([PortForward(host_port, echo.port)], link.get, lines)
    loop.call(fw.start())
    assert echo_roundtrip(host_port, b"before") == b"before"
    own_guest.sshd.stop()
    wait_for(lambda: lines.having("lost the connection"), 10, "the drop to be noticed")
    own_guest.sshd.start()
    assert echo_roundtrip(host_port, b"after") == b"after"
    assert lines.having("reconnected to VM")
    loop.call(fw.close())
    loop.call(link.close())


def _mariner(args, cwd, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "mariner_dev", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_cli_forward_runs_until_ctrl_c(project, echo):
    p = project()
    p.register()
    host_port = free_port()
    proc = _mariner(["forward", f"{host_port}:{echo.port}"], p.dir)
    lines = LineReader(proc.stdout)
    try:
        header = lines.next()
        row = lines.next()
        assert "HOST" in header and "GUEST" in header, header
        assert f"127.0.0.1:{host_port}" in row and f"127.0.0.1:{echo.port}" in row
        assert echo_roundtrip(host_port, b"via the cli") == b"via the cli"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert b"forwards stopped." in err and b"Traceback" not in err
    assert port_free(host_port)


def test_cli_forward_port_in_use_is_one_line(project, run_cli):
    p = project()
    p.register()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    code, out, err = run_cli("forward", str(port), cwd=p.dir)
    taken.close()
    assert code == 1
    assert f"127.0.0.1:{port} is already in use" in err
    assert "Traceback" not in err


def test_cli_forward_without_a_vm_says_run_up(project, run_cli):
    p = project()
    code, out, err = run_cli("forward", "8000", cwd=p.dir)
    assert code == 1 and "run `mariner up`" in err
