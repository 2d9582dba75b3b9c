"""Reserving a VM's name, cid and (user mode) SSH port, unique on this host."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from . import paths
from .errors import MarinerError, OwnershipError
from .fsutil import file_lock
from .model import ProjectConfig
from .nixrender import read_metadata
from .state import Registry, VmRecord

CID_RANGE = range(3, 255)              # nix-mariner's address and MAC derivations need 3..254
SSH_PORT_RANGE = range(22200, 23200)   # where allocated user-mode SSH ports come from


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """A host-wide lock around allocation, shared by every user's mariner."""
    directory = paths.microvms_dir()
    if not (directory.is_dir() and os.access(directory, os.W_OK)):
        directory = Path(tempfile.gettempdir())
    with file_lock(directory / ".mariner-allocate.lock", what="the host's cid allocation",
                   timeout=60):
        yield


def foreign_vms() -> dict[str, tuple[int | None, int | None]]:
    """VMs in the microvm state directory, with the (cid, SSH port) their mariner flake
    records, if it is one of mariner's (possibly another user's)."""
    out: dict[str, tuple[int | None, int | None]] = {}
    directory = paths.microvms_dir()
    try:
        entries = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return out
    for entry in entries:
        cid = port = None
        try:
            ref = (entry / "flake").read_text().strip()
        except OSError:
            ref = ""
        if ref.startswith("path:"):
            meta = read_metadata(Path(ref[len("path:"):]))
            if meta and isinstance(meta.get("cid"), int):
                cid = meta["cid"]
            if meta and isinstance(meta.get("ssh_port"), int):
                port = meta["ssh_port"]
        out[entry.name] = (cid, port)
    return out


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def check_ownership(cfg: ProjectConfig, record: VmRecord | None, *, verb: str = "update",
                    foreign_ok: bool = False) -> None:
    """Refuse a VM name that belongs to another project or (unless `foreign_ok`, for
    read-only commands) a VM that mariner did not create: mariner never touches them."""
    if record is not None:
        if Path(record.project) != cfg.project_dir:
            raise OwnershipError(
                f"VM {cfg.name!r} belongs to the project {record.project}; set a different "
                f"[vm] name in {cfg.config_file} (mariner does not {verb} another project's VM)",
                exit_code=2)
        return
    if not foreign_ok and (paths.microvms_dir() / cfg.name).exists():
        raise OwnershipError(
            f"a VM named {cfg.name!r} exists in {paths.microvms_dir()} and mariner did not "
            f"create it, so it does not {verb} it; set a different [vm] name in "
            f"{cfg.config_file}", exit_code=2)


def reserve(cfg: ProjectConfig, registry: Registry | None = None) -> VmRecord:
    """The VM's registry record, created or updated so its cid and SSH port are unique."""
    registry = registry or Registry()
    with host_lock(), registry.transaction() as vms:
        record = vms.get(cfg.name)
        check_ownership(cfg, record)
        others = {name: rec for name, rec in vms.items() if name != cfg.name}
        used_cids = {rec.cid: name for name, rec in others.items()}
        used_ports = {rec.ssh_port: name for name, rec in others.items() if rec.ssh_port}
        for name, (cid, port) in foreign_vms().items():
            if name == cfg.name:
                continue
            if cid is not None:
                used_cids.setdefault(cid, name)
            if port is not None:
                used_ports.setdefault(port, name)
        cid = _choose_cid(cfg, record, used_cids)
        ssh_port = _choose_port(cfg, record, used_ports) if cfg.network.mode == "user" else None
        if record is None:
            record = VmRecord(name=cfg.name, project=str(cfg.project_dir),
                              config_file=str(cfg.config_file), cid=cid,
                              network_mode=cfg.network.mode, ssh_port=ssh_port)
        else:
            record.cid = cid
            record.ssh_port = ssh_port
            record.network_mode = cfg.network.mode
            record.config_file = str(cfg.config_file)
        vms[cfg.name] = record
        return record


def _choose_cid(cfg: ProjectConfig, record: VmRecord | None, used: dict[int, str]) -> int:
    wanted = cfg.vm.cid
    if wanted is not None:
        if wanted in used:
            raise MarinerError(f"{cfg.config_file}: vm.cid: {wanted} is already used by VM "
                               f"{used[wanted]!r} on this host; choose another or remove the "
                               f"key to have one allocated", exit_code=2)
        return wanted
    if record is not None and record.cid not in used and record.cid in CID_RANGE:
        return record.cid
    for cid in CID_RANGE:
        if cid not in used:
            return cid
    raise MarinerError("no free cid left on this host (3-254 are all taken); "
                       "`mariner destroy` a VM you no longer need")


def _choose_port(cfg: ProjectConfig, record: VmRecord | None, taken: dict[int, str]) -> int:
    wanted = cfg.network.ssh_port
    if wanted is not None:
        if wanted in taken:
            raise MarinerError(f"{cfg.config_file}: network.ssh_port: {wanted} is already used "
                               f"by VM {taken[wanted]!r}; choose another port", exit_code=2)
        return wanted
    if record is not None and record.ssh_port and record.ssh_port not in taken:
        return record.ssh_port
    forwarded = {p.host for p in cfg.ports}
    # Random order: another user's stopped VM (another registry) does not hold its port open,
    # so the lowest free port is the one most likely to be claimed twice.
    import random

    for port in random.sample(SSH_PORT_RANGE, len(SSH_PORT_RANGE)):
        if port not in taken and port not in forwarded and port_is_free(port):
            return port
    raise MarinerError("no free loopback port for SSH; set [network] ssh_port")
