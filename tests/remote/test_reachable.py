"""The cheap reachability check must not mistake a silent listener (QEMU's user-mode port
forward before the guest's sshd runs) for a guest that answers SSH."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from mariner_dev.remote.target import GuestTarget, tcp_reachable


@contextlib.contextmanager
def _listener(reply: bytes | None):
    """A TCP listener that sends `reply` (None: nothing) to each client and hangs up after a
    second; its thread ends with the block."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.05)
    stopping = threading.Event()

    def serve():
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                if reply is not None:
                    conn.sendall(reply)
                stopping.wait(1.0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stopping.set()
        thread.join(10)
        server.close()


def _target(port: int) -> GuestTarget:
    return GuestTarget(name="x", host="127.0.0.1", port=port, user="u", identity=Path("/k"),
                       alias="mariner-x", known_hosts=Path("/kh"))


def test_silent_listener_is_not_reachable():
    with _listener(None) as port:
        assert tcp_reachable(_target(port), timeout=0.3) is False


def test_listener_that_closes_at_once_is_not_reachable():
    with _listener(b"") as port:
        assert tcp_reachable(_target(port), timeout=0.3) is False


def test_ssh_banner_is_reachable():
    with _listener(b"SSH-2.0-OpenSSH_9.2\r\n") as port:
        assert tcp_reachable(_target(port), timeout=1.0) is True


def test_closed_port_is_not_reachable():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    assert tcp_reachable(_target(port), timeout=0.3) is False
