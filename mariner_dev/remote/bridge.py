"""stdio <-> AF_VSOCK: the ProxyCommand that lets OpenSSH reach a vsock-only VM.

    python -m mariner_dev.remote.bridge CID [PORT]
"""

from __future__ import annotations

import os
import select
import socket
import sys


def bridge(sock: socket.socket, fd_in: int = 0, fd_out: int = 1) -> None:
    """Copy fd_in -> sock and sock -> fd_out until both directions reach EOF."""
    open_in, open_sock = True, True
    while open_sock:
        readable, _, _ = select.select([sock] + ([fd_in] if open_in else []), [], [])
        if fd_in in readable:
            data = os.read(fd_in, 65536)
            if data:
                sock.sendall(data)
            else:
                open_in = False
                sock.shutdown(socket.SHUT_WR)
        if sock in readable:
            data = sock.recv(65536)
            if not data:
                open_sock = False
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd_out, view):]


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit():
        sys.stderr.write("usage: python -m mariner_dev.remote.bridge CID [PORT]\n")
        return 2
    cid, port = int(argv[0]), int(argv[1]) if len(argv) > 1 else 22
    if not hasattr(socket, "AF_VSOCK"):
        sys.stderr.write("mariner: this system has no AF_VSOCK support\n")
        return 1
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.connect((cid, port))
    except OSError as exc:
        sys.stderr.write(f"mariner: cannot connect to vsock cid {cid} port {port}: {exc}\n")
        return 1
    with sock:
        bridge(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
