"""mariner's own registry of VMs: which project owns which name, its cid, port and hashes."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

from . import paths
from .errors import MarinerError, StateError
from .fsutil import file_lock, write_atomic

REGISTRY_VERSION = 1


@dataclass
class VmRecord:
    """What mariner remembers about one VM it created."""

    name: str
    project: str                    # absolute project directory
    config_file: str
    cid: int
    network_mode: str
    ssh_port: int | None = None
    created: bool = False           # `microvm -c` succeeded
    built_hash: str | None = None   # hash of the flake the VM was last built from
    built_config: dict | None = None
    restart_pending: bool = False   # rebuilt while running, not restarted yet (--no-restart)
    post_create_done: bool = False
    post_start_pending: bool = False  # started, post_start not yet run successfully
    dotfiles_hash: str | None = None
    flake_dir: str | None = None

    @property
    def ssh_endpoint(self) -> tuple[str, int]:
        """Where the guest's sshd listens: 127.0.0.1:<ssh_port> in user mode, else the
        bridge address nix-mariner derives from the cid, 10.0.0.<cid>:22."""
        if self.network_mode == "user":
            return "127.0.0.1", int(self.ssh_port or 0)
        return f"10.0.0.{self.cid}", 22

    @classmethod
    def from_json(cls, data: dict) -> "VmRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Registry:
    """The registry file, read and written under a lock, always atomically."""

    def __init__(self, home: Path | None = None):
        self.home = home or paths.mariner_home()
        self.file = self.home / "registry.json"
        self.lock_file = self.home / "registry.lock"

    def load(self) -> dict[str, VmRecord]:
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"cannot read mariner's registry: {paths.describe_os_error(exc)}",
                             hint=paths.DIRECTORY_HINT) from None
        try:
            data = json.loads(text)
            version = data.get("version", REGISTRY_VERSION) if isinstance(data, dict) else None
            if isinstance(version, int) and version > REGISTRY_VERSION:
                raise StateError(
                    f"{self.file} was written by a newer mariner (registry version {version}; "
                    f"this one reads version {REGISTRY_VERSION})",
                    hint="use that newer mariner, or point MARINER_HOME elsewhere for this one")
            vms = data["vms"]
            return {name: VmRecord.from_json(rec) for name, rec in vms.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(
                f"{self.file}: the registry is corrupt ({exc.__class__.__name__}: {exc}); "
                f"move it aside and run `mariner up` again to re-register your VMs") from None

    def save(self, vms: dict[str, VmRecord]) -> None:
        paths.ensure_private_dir(self.home)
        data = {"version": REGISTRY_VERSION,
                "vms": {name: asdict(rec) for name, rec in sorted(vms.items())}}
        write_atomic(self.file, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, VmRecord]]:
        """Load, let the caller change the dict, save: all under the registry lock."""
        paths.ensure_private_dir(self.home)
        with file_lock(self.lock_file, what="the mariner registry", timeout=60):
            vms = self.load()
            yield vms
            self.save(vms)

    def get(self, name: str) -> VmRecord | None:
        return self.load().get(name)


# -- directories `render --out` created: the only existing non-empty ones it replaces ---------
# Kept here, by path and inode, not as a marker inside the directory: the VM can write the
# project, so it could plant a marker in a directory it wants destroyed.

def _rendered_dirs_file() -> Path:
    return paths.mariner_home() / "rendered-dirs.json"


def _load_rendered_dirs() -> dict[str, list[int]]:
    try:
        data = json.loads(_rendered_dirs_file().read_text())
        dirs = data["dirs"]
        return {str(k): [int(v[0]), int(v[1])] for k, v in dirs.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}  # unreadable: nothing counts as mariner's, so nothing is replaced


def rendered_dir_identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the directory `render --out` created at `path`, if it did."""
    entry = _load_rendered_dirs().get(str(Path(path).absolute()))
    return (entry[0], entry[1]) if entry else None


def record_rendered_dir(path: Path) -> None:
    """Remember that `render --out` created the directory now at `path`."""
    import os

    path = Path(path).absolute()
    st = os.lstat(path)
    paths.ensure_private_dir(paths.mariner_home())
    with file_lock(paths.mariner_home() / "rendered-dirs.lock", what="the rendered-dirs record",
                   timeout=60):
        dirs = _load_rendered_dirs()
        dirs[str(path)] = [st.st_dev, st.st_ino]
        # Entries whose directory is gone (or is another one now) are dropped.
        for key, (dev, ino) in list(dirs.items()):
            try:
                other = os.lstat(key)
            except OSError:
                del dirs[key]
                continue
            if (other.st_dev, other.st_ino) != (dev, ino):
                del dirs[key]
        write_atomic(_rendered_dirs_file(),
                     json.dumps({"version": 1, "dirs": dirs}, indent=2, sort_keys=True) + "\n",
                     mode=0o600)


def forget_vm_files(name: str) -> list[str]:
    """Remove what mariner keeps about VM `name` outside the registry: its background agent
    and attached processes, ssh-config entry, pinned host key and MARINER_HOME/vms/<name>.
    Never touches the host. Returns what could not be removed, one line each."""
    import shutil

    from . import remote, sshconfig

    problems: list[str] = []
    for what, step in (("its background agent", lambda: remote.stop_agent(name)),
                       ("its attached processes", lambda: stop_attached(name)),
                       ("its ssh-config entry", lambda: sshconfig.remove_entry(name)),
                       ("its pinned host key", lambda: remote.forget_host_key(name))):
        try:
            step()
        except (OSError, MarinerError) as exc:
            problems.append(f"could not remove {what}: {exc}")
    shutil.rmtree(paths.vm_dir(name), ignore_errors=True)
    return problems


def vm_lock_file(name: str) -> Path:
    """The per-VM lock that `up`, `down` and `destroy` take."""
    return paths.mariner_home() / "locks" / f"{name}.lock"


# -- processes attached to a VM (`sync --watch`, `forward`): `destroy` and `down` stop them --------

def attached_dir(name: str) -> Path:
    return paths.mariner_home() / "attached" / name


@contextlib.contextmanager
def attached(name: str, kind: str) -> Iterator[None]:
    """Record this process as attached to VM `name` (e.g. kind "sync-watch", "forward")."""
    import os

    from .procid import current

    directory = attached_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    pid, started = current()
    marker = directory / f"{pid}.json"
    write_atomic(marker, json.dumps({"pid": pid, "start": started, "kind": kind}) + "\n",
                 mode=0o600)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()


def stop_attached(name: str, timeout: float = 5.0) -> list[str]:
    """SIGTERM every live process attached to VM `name` and wait for it; returns their kinds.

    A marker names a process by pid and start time: one whose process is gone (its pid maybe
    reused by an unrelated process since) is removed, and nothing is signalled."""
    import os
    import signal
    import time

    from .procid import is_alive, signal_process

    stopped: list[str] = []
    directory = attached_dir(name)
    if not directory.is_dir():
        return stopped
    procs: list[tuple[int, int]] = []
    for marker in directory.glob("*.json"):
        try:
            info = json.loads(marker.read_text())
            pid, started = int(info["pid"]), info.get("start")
            if started is not None:
                started = int(started)
        except (OSError, ValueError, KeyError, TypeError):
            marker.unlink(missing_ok=True)
            continue
        if pid == os.getpid():
            continue
        if not signal_process(pid, started, signal.SIGTERM):
            marker.unlink(missing_ok=True)
            continue
        procs.append((pid, started))
        stopped.append(str(info.get("kind", "process")))
    deadline = time.monotonic() + timeout
    for pid, started in procs:
        while time.monotonic() < deadline and is_alive(pid, started):
            time.sleep(0.05)
    return stopped
