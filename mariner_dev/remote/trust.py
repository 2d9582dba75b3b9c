"""Host-key pinning in mariner's own known_hosts, one line per VM under `mariner-<name>`.

The file is in OpenSSH's format, so the generated ssh-config can point `UserKnownHostsFile` at
it together with `HostKeyAlias mariner-<name>` and `StrictHostKeyChecking yes`.

The attack on first contact: on the bridge, any VM (or anything on br-microvm) can answer for
10.0.0.<cid> before the new guest's sshd does, and whatever key it shows would be pinned. Over
AF_VSOCK the host kernel routes by cid to the one VM that holds it, so the first pin is taken
over vsock wherever the guest's sshd answers there (`microvm.vsock.ssh.enable`), and over TCP
only where vsock is unavailable. The line records which (`pinned-over=vsock|tcp`, after the
key, where OpenSSH reads a comment) and `status` says it.
"""

from __future__ import annotations

from pathlib import Path

from .. import paths
from ..errors import GuestUnreachable
from ..fsutil import file_lock, write_atomic
from .target import alias_for


def _lines(known_hosts: Path) -> list[str]:
    try:
        return known_hosts.read_text().splitlines()
    except FileNotFoundError:
        return []


def _hosts_of(line: str) -> list[str]:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return []
    return stripped.split()[0].split(",")


PIN_COMMENT = "pinned-over="
CHANNELS = ("vsock", "tcp")


def pin_channel(known_hosts: Path, alias: str) -> str | None:
    """How the pin of `alias` was taken: "vsock", "tcp", or None (no pin, or not recorded)."""
    for line in _lines(known_hosts):
        if alias in _hosts_of(line):
            for word in line.split()[3:]:
                if word.startswith(PIN_COMMENT) and word[len(PIN_COMMENT):] in CHANNELS:
                    return word[len(PIN_COMMENT):]
    return None


def fingerprint(key: str) -> str:
    """OpenSSH's SHA256 fingerprint of a 'type base64' key (what `ssh-keygen -l` prints)."""
    import base64
    import hashlib

    blob = base64.b64decode(key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def pinned_keys(known_hosts: Path, alias: str) -> list[str]:
    """The pinned host keys of `alias` as 'type base64' strings (empty when not pinned)."""
    keys = []
    for line in _lines(known_hosts):
        if alias in _hosts_of(line):
            fields = line.split()
            if len(fields) >= 3:
                keys.append(f"{fields[1]} {fields[2]}")
    return keys


def _rewrite(known_hosts: Path, alias: str, new_key: str | None) -> None:
    paths.ensure_private_dir(known_hosts.parent)
    with file_lock(known_hosts.with_name(known_hosts.name + ".lock"), what="known_hosts"):
        kept = [line for line in _lines(known_hosts) if alias not in _hosts_of(line)]
        if new_key is not None:
            kept.append(f"{alias} {new_key}")
        write_atomic(known_hosts, "".join(line + "\n" for line in kept), mode=0o600)


def pin_host_key(known_hosts: Path, alias: str, key: str, channel: str | None = None) -> None:
    """Pin `key` ('type base64') for `alias`, replacing any earlier pin; `channel` records
    whether it was learnt over vsock or TCP."""
    fields = key.split()
    comment = f" {PIN_COMMENT}{channel}" if channel in CHANNELS else ""
    _rewrite(known_hosts, alias, f"{fields[0]} {fields[1]}{comment}")


def forget_host_key(name: str, known_hosts: Path | None = None) -> None:
    """Drop the pin of VM `name` (destroy resets it; the next `up` pins the new VM's key)."""
    known_hosts = known_hosts or paths.known_hosts_file()
    alias = alias_for(name)
    if pinned_keys(known_hosts, alias):
        _rewrite(known_hosts, alias, None)


class HostKeyMismatch(GuestUnreachable):
    """The guest presented a host key other than the pinned one."""

    def __init__(self, name: str, known_hosts: Path):
        super().__init__(
            f"the host key of VM {name} does not match the key pinned in {known_hosts}: "
            f"refusing to connect; if the VM was re-created, `mariner destroy` resets the pin, "
            f"or pass --trust-new-host-key to re-pin it")


class NotPinned(GuestUnreachable):
    def __init__(self, name: str):
        super().__init__(
            f"VM {name} has not been started by `mariner up` yet (no host key is pinned)",
            hint="`mariner up` starts it and pins its key on the first connection; "
                 "--trust-new-host-key pins whatever key the VM shows now")
