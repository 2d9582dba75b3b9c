"""Pytest fixtures for tests that talk to a real guest sshd (import with `from support.fixtures
import *` in a conftest).

- `guest` (module): a running GuestSshd on a free 127.0.0.1 port, with a fresh client key.
- `remote_home` (module): a MARINER_HOME and a short runtime dir shared by a module's tests,
  so one background agent serves the whole module; `remote_isolation` points the
  environment at them for each test (after the root conftest's isolation).
- `project` (module): a project whose mariner.toml targets `guest` (user-mode networking),
  registered in mariner's registry, host key pinned; its workspace mount is a symlink standing
  in for virtiofs.
- `make_project(guest, name, ...)`: the same for a guest of a test's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import guest_sshd
from support.guest_sshd import GuestSshd, ensure_guest_user, free_port, generate_client_key

REPO = Path(__file__).resolve().parent.parent.parent
GUEST_USER = guest_sshd.DEFAULT_GUEST_USER if os.geteuid() == 0 else None


@dataclass
class Guest:
    sshd: GuestSshd
    user: str
    uid: int
    home: Path
    key: Path
    scratch: Path          # world-readable directory for projects the guest account can reach

    @property
    def port(self) -> int:
        return self.sshd.port


def start_guest(base: Path, authorized_key: Path | None = None) -> Guest:
    """A fresh sshd with its own client key under `base` (a directory of the caller's)."""
    import getpass

    user = GUEST_USER or getpass.getuser()
    uid, home = ensure_guest_user(user) if GUEST_USER else (os.getuid(), Path.home())
    base.mkdir(parents=True, exist_ok=True)
    key = generate_client_key(base / "client" / "id_ed25519")
    scratch = Path(tempfile.mkdtemp(prefix="mrg-", dir="/tmp"))
    os.chmod(scratch, 0o755)
    # sshd reads AuthorizedKeysFile as the guest account: it must not sit in a 0700 tmp dir.
    authorized = scratch / "authorized_keys"
    authorized.write_text((authorized_key or key.with_name(key.name + ".pub")).read_text())
    os.chmod(authorized, 0o644)
    sshd = GuestSshd(base / "sshd", free_port(), user, authorized)
    sshd.start()
    return Guest(sshd=sshd, user=user, uid=uid, home=home, key=key, scratch=scratch)


def stop_guest(guest: Guest) -> None:
    guest.sshd.stop()
    shutil.rmtree(guest.scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    g = start_guest(tmp_path_factory.mktemp("guest"))
    yield g
    stop_guest(g)


@dataclass
class RemoteHome:
    mariner_home: Path
    runtime: Path

    def env(self) -> dict[str, str]:
        return {"MARINER_HOME": str(self.mariner_home), "XDG_RUNTIME_DIR": str(self.runtime)}


def kill_agents(runtime: Path) -> None:
    """Stop every agent whose lock file is in `runtime` (what a test run leaves behind)."""
    from mariner_dev.fsutil import lock_is_held

    for lock in runtime.glob("mariner/*.lock"):
        if not lock_is_held(lock):
            continue
        from mariner_dev.procid import signal_process, start_time

        try:
            fields = lock.read_text().split()
            pid = int(fields[0])
            started = int(fields[1]) if len(fields) > 1 else start_time(pid)
        except (OSError, ValueError, IndexError):
            continue
        if not signal_process(pid, started, signal.SIGTERM):
            continue
        deadline = time.monotonic() + 5
        while lock_is_held(lock) and time.monotonic() < deadline:
            time.sleep(0.02)
        if lock_is_held(lock):
            signal_process(pid, started, signal.SIGKILL)


@pytest.fixture(scope="module")
def remote_home(tmp_path_factory):
    base = tmp_path_factory.mktemp("remote-home")
    runtime = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))
    os.chmod(runtime, 0o700)
    home = RemoteHome(mariner_home=base / "mariner-home", runtime=runtime)
    yield home
    kill_agents(runtime)
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def remote_isolation(isolated_env, remote_home, monkeypatch):
    for key, value in remote_home.env().items():
        monkeypatch.setenv(key, value)
    yield remote_home


@dataclass
class Project:
    dir: Path
    mount: str             # the guest path of the project (a symlink to `dir`)
    name: str
    cfg: object
    record: object
    target: object


def make_project(guest: Guest, env: dict[str, str], *, name: str | None = None,
                 extra_toml: str = "", pin: bool = True) -> Project:
    """Write, register and (with pin) trust a project whose VM is `guest`; its host settings
    ([ports] forward, ...) approved as `mariner trust` would."""
    from mariner_dev import remote
    from support.approval import approve_host_settings
    from mariner_dev.config import load_project
    from mariner_dev.state import Registry, VmRecord

    name = name or "t" + uuid.uuid4().hex[:8]
    directory = guest.scratch / f"proj-{name}"
    (directory / "pkg" / "sub dir").mkdir(parents=True)
    for path in (directory, directory / "pkg", directory / "pkg" / "sub dir"):
        os.chmod(path, 0o777)
    mount = guest.scratch / f"ws-{name}"
    mount.symlink_to(directory)
    (directory / "mariner.toml").write_text(
        f'[vm]\nname = "{name}"\nuser = "{guest.user}"\n'
        f'[network]\nmode = "user"\nssh_port = {guest.port}\n'
        f'[workspace]\nmount = "{mount}"\n'
        f'[env]\nFROM_TOML = "toml value"\n' + extra_toml)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = load_project(project_dir=directory)
        approve_host_settings(directory)
        authorize_mariner_key(guest, cfg)
        record = VmRecord(name=name, project=str(directory), config_file=str(cfg.config_file),
                          cid=3 + int(uuid.uuid4().int % 200), network_mode="user",
                          ssh_port=guest.port, created=True)
        with Registry().transaction() as vms:
            vms[name] = record
        target = remote.target_for(cfg, record)
        if pin:
            remote.wait_for_ssh(target, timeout=20, pin=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Project(dir=directory, mount=str(mount), name=name, cfg=cfg, record=record,
                   target=target)


def authorize_mariner_key(guest: Guest, cfg) -> None:
    """Let mariner's own key (MARINER_HOME, as `up` renders it) log in to `guest`: [ssh]
    identity is per-user config only, so test projects use the key mariner generates."""
    from mariner_dev.keys import public_key_for

    public = public_key_for(cfg)
    authorized = guest.scratch / "authorized_keys"
    if public not in authorized.read_text():
        with authorized.open("a") as fh:
            fh.write(public + "\n")


@pytest.fixture(scope="module")
def project(guest, remote_home):
    env = remote_home.env()
    env["HOME"] = str(remote_home.mariner_home.parent / "home")
    return make_project(guest, env)


def mariner_cmd() -> list[str]:
    """How tests run the real CLI in a subprocess."""
    return [sys.executable, "-m", "mariner_dev"]


def run_mariner(*args: str, cwd: Path | None = None, input: bytes | None = None,
                env: dict | None = None, timeout: float = 60,
                stdin=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + (os.pathsep + full_env["PYTHONPATH"]
                                          if full_env.get("PYTHONPATH") else "")
    if env:
        full_env.update(env)
    kwargs = {"input": input} if input is not None else {"stdin": stdin if stdin is not None
                                                         else subprocess.DEVNULL}
    return subprocess.run([*mariner_cmd(), *args], cwd=cwd, env=full_env, capture_output=True,
                          timeout=timeout, **kwargs)
