"""The cheap reachability check must not mistake a silent listener (QEMU's user-mode port
forward before the guest's sshd runs) for a guest that answers SSH."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from mariner_dev.remote.target import GuestTarget, tcp_reachable


def _listener(reply: bytes | None):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if reply is not None:
                conn.sendall(reply)
            threading.Timer(1.0, conn.close).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def _target(port: int) -> GuestTarget:
    return GuestTarget(name="x", host="127.0.0.1", port=port, user="u", identity=Path("/k"),
                       alias="mariner-x", known_hosts=Path("/kh"))


def test_silent_listener_is_not_reachable():
    server = _listener(None)
    try:
        assert tcp_reachable(_target(server.getsockname()[1]), timeout=0.3) is False
    finally:
        server.close()


def test_listener_that_closes_at_once_is_not_reachable():
    server = _listener(b"")
    try:
        assert tcp_reachable(_target(server.getsockname()[1]), timeout=0.3) is False
    finally:
        server.close()


def test_ssh_banner_is_reachable():
    server = _listener(b"SSH-2.0-OpenSSH_9.2\r\n")
    try:
        assert tcp_reachable(_target(server.getsockname()[1]), timeout=1.0) is True
    finally:
        server.close()


def test_closed_port_is_not_reachable():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    assert tcp_reachable(_target(port), timeout=0.3) is False
