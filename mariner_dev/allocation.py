"""Reserving a VM's name, cid and (user mode) SSH port, unique on this host."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from . import paths
from .errors import MarinerError, OwnershipError
from .model import ProjectConfig
from .nixrender import read_metadata
from .state import Registry, VmRecord

CID_RANGE = range(3, 255)              # nix-mariner's address and MAC derivations need 3..254
SSH_PORT_RANGE = range(22200, 23200)   # where allocated user-mode SSH ports come from


HOST_LOCK_TIMEOUT = 30.0


def lock_directory(cfg: ProjectConfig | None = None) -> Path:
    """What allocation locks: the microvm state directory, shared by every user of a
    microvm.nix host; in runner mode the user's own VM directory (created, private): runner
    VMs are the user's alone, a cid another user's VM holds is replaced when the VM starts,
    and a host's /var/lib/microvms that this user may not read must not stop them."""
    if cfg is not None and cfg.backend == "runner":
        return paths.ensure_private_dir(vms_dir(cfg))
    return paths.microvms_dir()


@contextlib.contextmanager
def host_lock(timeout: float | None = None, directory: Path | None = None) -> Iterator[None]:
    """A host-wide lock around allocation, shared by every user's mariner: an flock on the
    microvm state directory itself (or `directory`, see lock_directory), opened read-only, so
    it needs no file anyone can write (a world-writable lock file in /tmp lets any local user
    hold every mariner up). Held only while cids and ports are chosen; a wait for it is
    bounded."""
    timeout = HOST_LOCK_TIMEOUT if timeout is None else timeout
    directory = directory or paths.microvms_dir()
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield  # no state directory: no VM exists on this host yet, none to collide with
        return
    except OSError as exc:
        raise MarinerError(
            f"cannot open the microvm state directory {directory} to lock the host's cid "
            f"allocation: {exc.strerror}",
            hint="it must be readable by every user who runs mariner; `mariner doctor` "
                 "checks the host") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise MarinerError(f"cannot lock {directory} for the host's cid "
                                       f"allocation: {exc.strerror}") from None
            if time.monotonic() > deadline:
                raise MarinerError(
                    f"another mariner (maybe another user's) has held the host's cid "
                    f"allocation lock ({directory}) for {timeout:g} s; try again",
                    hint="`fuser -v " + str(directory) + "` shows who holds it")
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def running_with_cid(cid: int, but: str) -> str | None:
    """The VM (any user's, other than `but`) that runs with vsock cid `cid`: its `booted`
    runner, linked at start and removed at stop, records the cid it was started with."""
    directory = paths.microvms_dir()
    try:
        entries = sorted(e.name for e in os.scandir(directory)
                         if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
    except OSError:
        return None
    for name in entries:
        if name != but and read_vsock_cid(directory / name, "booted") == cid:
            return name
    return None


def read_vsock_cid(vm_dir: Path, link: str = "current") -> int | None:
    """The vsock cid the VM's runner (`current` or `booted`) was built with, if it has one."""
    try:
        with open(vm_dir / link / "share" / "microvm" / "vsock-cid", "rb") as fh:
            text = fh.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def vms_dir(cfg: ProjectConfig) -> Path:
    """The directory where the project's host backend keeps one directory per VM."""
    from .host.choice import make

    return make(cfg.backend).vms_dir


def foreign_vms(directory: Path | None = None) -> dict[str, tuple[int | None, int | None]]:
    """VMs in the microvm state directory, with their (cid, SSH port): the cid from the
    runner's vsock-cid file, else (and the port) from the mariner flake they were built from,
    when it is one of mariner's and readable (another user's MARINER_HOME usually is not)."""
    out: dict[str, tuple[int | None, int | None]] = {}
    directory = directory or paths.microvms_dir()
    try:
        entries = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return out
    for entry in entries:
        cid = read_vsock_cid(entry)
        port = None
        try:
            ref = (entry / "flake").read_text().strip()
        except OSError:
            ref = ""
        if ref.startswith("path:"):
            meta = read_metadata(Path(ref[len("path:"):]))
            if cid is None and meta and isinstance(meta.get("cid"), int):
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


def stale_claim(record: VmRecord, host_dir: Path | None = None) -> bool:
    """A registry record whose project directory is gone and whose VM does not exist on the
    host (in the backend's directory of VMs `host_dir`, nor in the microvm state directory):
    nothing holds the name any more, so it is released when another project wants it. A VM
    that still exists keeps its name: a project that merely names it must not take it over
    with its disk."""
    homes = {paths.microvms_dir(), *([host_dir] if host_dir is not None else [])}
    return (not os.path.isdir(record.project)
            and not any(os.path.lexists(home / record.name) for home in homes))


def check_ownership(cfg: ProjectConfig, record: VmRecord | None, *, verb: str = "update",
                    foreign_ok: bool = False) -> VmRecord | None:
    """Refuse a VM name that belongs to another project or (unless `foreign_ok`, for
    read-only commands) a VM that mariner did not create: mariner never touches them.
    Returns the record that stands: None for a stale claim (see `stale_claim`)."""
    return check_claim(cfg.name, record, project_dir=cfg.project_dir,
                       config_file=cfg.config_file, verb=verb, foreign_ok=foreign_ok,
                       host_dir=vms_dir(cfg))


def check_claim(name: str, record: VmRecord | None, *, project_dir: Path | None,
                config_file: Path | None = None, verb: str = "update",
                foreign_ok: bool = False, host_dir: Path | None = None) -> VmRecord | None:
    """check_ownership for a VM known by name; with no `project_dir` (`destroy --name`) any
    record of this user's registry stands."""
    where = f" in {config_file}" if config_file else ""
    if record is not None:
        if project_dir is not None and Path(record.project) != project_dir:
            if stale_claim(record, host_dir):
                return None
            raise OwnershipError(
                f"VM {name!r} belongs to the project {record.project}; set a different "
                f"[vm] name{where} (mariner does not {verb} another project's VM)",
                exit_code=2, hint=f"if that project is gone, `mariner destroy --name {name}` "
                                  f"frees the name")
        return record
    host_dir = host_dir or paths.microvms_dir()   # the backend's directory of VMs
    if not foreign_ok and (host_dir / name).exists():
        raise OwnershipError(
            f"a VM named {name!r} exists in {host_dir} and mariner did not "
            f"create it, so it does not {verb} it; set a different [vm] name{where}",
            exit_code=2)
    return None


def reserve(cfg: ProjectConfig, registry: Registry | None = None,
            taken: dict[int, str] | None = None) -> VmRecord:
    """The VM's registry record, created or updated so its cid and SSH port are unique on
    the host; `taken` adds cids found in use ({cid: the VM that holds it})."""
    registry = registry or Registry()
    with host_lock(directory=lock_directory(cfg)), registry.transaction() as vms:
        claimed = vms.get(cfg.name)
        record = check_ownership(cfg, claimed)
        released = claimed is not None and record is None   # a stale claim
        others = {name: rec for name, rec in vms.items() if name != cfg.name}
        used_cids = {rec.cid: name for name, rec in others.items()}
        used_ports = {rec.ssh_port: name for name, rec in others.items() if rec.ssh_port}
        for name, (cid, port) in foreign_vms(vms_dir(cfg)).items():
            if name == cfg.name:
                continue
            if cid is not None:
                used_cids.setdefault(cid, name)
            if port is not None:
                used_ports.setdefault(port, name)
        for cid, holder in (taken or {}).items():
            used_cids.setdefault(cid, holder)
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
    if released:  # its agent, pinned key and files go too (outside the host-wide lock)
        from .state import forget_vm_files

        forget_vm_files(cfg.name)
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
