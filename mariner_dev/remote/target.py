"""Where a VM's SSH server is and how mariner proves who it is: no asyncssh here (cheap import)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

ALIAS_PREFIX = "mariner-"
VSOCK_SSH_PORT = 22


def alias_for(name: str) -> str:
    """The ssh-config Host and HostKeyAlias of a VM: `mariner-<name>`."""
    return ALIAS_PREFIX + name


@dataclass(frozen=True)
class GuestTarget:
    """Everything needed to open an SSH connection to one VM's guest."""

    name: str
    host: str | None         # None: reachable over AF_VSOCK only
    port: int
    user: str
    identity: Path
    alias: str
    known_hosts: Path
    vsock_cid: int | None = None
    forward_agent: bool = False

    def describe(self) -> str:
        if self.host is None:
            return f"vsock cid {self.vsock_cid}"
        return f"{self.host}:{self.port}"

    def to_json(self) -> dict:
        data = asdict(self)
        data["identity"] = str(self.identity)
        data["known_hosts"] = str(self.known_hosts)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "GuestTarget":
        data = dict(data)
        data["identity"] = Path(data["identity"])
        data["known_hosts"] = Path(data["known_hosts"])
        return cls(**data)

    def fingerprint(self) -> str:
        """Changes whenever anything about how to reach the guest changes (agent replacement)."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def target_for(cfg, record) -> GuestTarget:
    """The target of a project's VM: bridge 10.0.0.<cid>:22, user mode 127.0.0.1:<ssh_port>."""
    from .. import paths
    from ..keys import identity_for

    mode = getattr(record, "network_mode", None) or cfg.network.mode
    if mode == "user":
        port = record.ssh_port or cfg.network.ssh_port
        if not port:
            from ..errors import GuestUnreachable
            raise GuestUnreachable(f"VM {cfg.name} has no SSH port recorded; run `mariner up`")
        host, cid = "127.0.0.1", record.cid
    else:
        host, port, cid = f"10.0.0.{record.cid}", 22, record.cid
    return GuestTarget(
        name=cfg.name,
        host=host,
        port=int(port),
        user=cfg.vm.user,
        identity=Path(identity_for(cfg)).absolute(),
        alias=alias_for(cfg.name),
        known_hosts=paths.known_hosts_file(),
        vsock_cid=cid,
        forward_agent=bool(cfg.ssh.forward_agent),
    )


def tcp_reachable(target: GuestTarget, timeout: float = 1.0) -> bool:
    """True when the guest's sshd answers with its banner (no SSH handshake).

    A bare connect is not enough: with user-mode networking QEMU itself accepts connections
    on the forwarded port from the moment it starts, long before the guest's sshd listens."""
    if target.host is None:
        return vsock_reachable(target, timeout)
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
            return _reads_ssh_banner(sock)
    except OSError:
        return False


def _reads_ssh_banner(sock: socket.socket) -> bool:
    """The server speaks first in SSH: its first bytes are `SSH-` (RFC 4253 allows other
    lines before it, which no sshd sends by default)."""
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        if not chunk:
            return False
        data += chunk
    return data == b"SSH-"


def vsock_reachable(target: GuestTarget, timeout: float = 1.0) -> bool:
    if target.vsock_cid is None or not hasattr(socket, "AF_VSOCK"):
        return False
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError:
        return False
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((target.vsock_cid, VSOCK_SSH_PORT))
            return _reads_ssh_banner(sock)
        except OSError:
            return False


def transport_preference() -> str:
    """MARINER_TRANSPORT=tcp|vsock|auto (default auto: TCP when reachable, else vsock)."""
    from .dispatch import transport_mode

    return transport_mode()
