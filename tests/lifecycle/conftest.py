"""A project whose VM runs on the fake host (tests/fakehost/bin) with a real sshd as its guest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.approval import approve_host_settings
from support.fakehost import fakehost  # noqa: F401  (fixture)
from support.jsondoc import document
from support.tools import REPO, require_tool

FAKEHOST_BIN = REPO / "tests" / "fakehost" / "bin"
GUEST_USER = "mariner-guest"


BACKENDS = ("microvm", "runner")


@dataclass
class Project:
    """A test project on disk plus helpers to run mariner on it and read the fake host's log.

    `backend` is the host backend the test plays: "microvm" (the fake microvm/systemctl/
    journalctl) or "runner" (the fake nix, whose runner boots the same real-sshd guest under
    mariner's own supervisor). The *_calls helpers name each backend's commands."""

    dir: Path
    name: str
    log: Path
    guest_root: Path
    guest_uid: int
    backend: str = "microvm"
    # Runner mode as root: mariner runs as the project's owner (the guest account), an
    # unprivileged account, through `python` (setpriv and the system's python3); `owned` is
    # what the account owns (handed back to it before each command: the test writes as root).
    account: object | None = None
    python: tuple[str, ...] = ()
    owned: Path | None = None

    @property
    def host_vms_dir(self) -> Path:
        """Where the backend keeps its VMs (one directory each)."""
        if self.backend == "runner":
            return Path(os.environ["XDG_DATA_HOME"]) / "mariner" / "vms"
        return Path(os.environ["MARINER_MICROVMS_DIR"])

    @property
    def vm_dir(self) -> Path:
        return self.host_vms_dir / self.name

    def is_build(self, call: list[str], create: bool | None = None) -> bool:
        """A build of this VM (`create`: the first one / True, a rebuild / False, any / None)."""
        if self.backend == "runner":
            return call[0] == "nix" and "build" in call
        kinds = {True: ["-c"], False: ["-u"], None: ["-c", "-u"]}[create]
        return call[0] == "microvm" and len(call) > 1 and call[1] in kinds

    def is_start(self, call: list[str]) -> bool:
        if self.backend == "runner":
            return call[0] == "microvm-run"
        return call[:2] in (["systemctl", "start"], ["systemctl", "restart"])

    def is_stop(self, call: list[str]) -> bool:
        if self.backend == "runner":
            return call[0] == "microvm-shutdown"
        return call[:2] in (["systemctl", "stop"], ["systemctl", "restart"])

    @property
    def config(self) -> Path:
        return self.dir / "mariner.toml"

    def write(self, extra: str = "", approve: bool = True, **vm: object) -> None:
        """Write mariner.toml and (unless `approve` is False) approve its host settings, as
        the developer who wrote it would with `mariner trust`."""
        vm_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in vm.items())
        self.config.write_text(
            f'[vm]\nname = "{self.name}"\nuser = "{GUEST_USER}"\nuid = {self.guest_uid}\n'
            f"{vm_lines}\n"
            f'[network]\nmode = "user"\n\n'
            f'[workspace]\nmount = "{self.guest_root}/workspaces/{self.name}"\n\n{extra}\n')
        if approve:
            approve_host_settings(self.dir)

    def user_config(self, text: str) -> None:
        """The per-user config ([dotfiles], [ssh]: never in a project's mariner.toml)."""
        path = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def mariner(self, *args: str, env: dict | None = None, timeout: float = 120,
                check: int | None = None) -> subprocess.CompletedProcess:
        """Run the real `mariner` entry point in a subprocess, in the project directory."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.run(self.argv(*args), cwd=self.dir,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
        assert "Traceback" not in proc.stderr, proc.stderr
        if check is not None:
            assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    def argv(self, *args: str) -> list[str]:
        """The command line of `mariner ARGS` as the developer: this interpreter, or in
        runner mode as root the unprivileged account (its files handed back to it first)."""
        if self.account is not None:
            self.hand_back()
            return [*self.python, "-m", "mariner_dev", *args]
        return [sys.executable, "-m", "mariner_dev", *args]

    def hand_back(self) -> None:
        """Runner mode as root: what the test wrote as root under the account's directory
        becomes the account's again (a no-op otherwise)."""
        if self.account is not None:
            from support import unprivileged

            unprivileged.give_to(self.account, self.owned)

    def up_json(self, *args: str, check: int | None = 0, env: dict | None = None) -> dict:
        proc = self.mariner("up", "--json", *args, check=check, env=env)
        return document("up", proc.stdout, proc.returncode)  # checked against its schema

    def status_json(self) -> dict:
        proc = self.mariner("status", "--json", check=0)
        return document("status", proc.stdout, proc.returncode)

    def host_calls(self) -> list[list[str]]:
        """Every fake host command run so far: [prog, *argv]."""
        if not self.log.exists():
            return []
        calls = []
        for line in self.log.read_text().splitlines():
            entry = json.loads(line)
            calls.append([entry["prog"], *entry["argv"]])
        return calls

    def clear_log(self) -> None:
        self.log.write_text("")

    def changing_calls(self) -> list[list[str]]:
        """Host commands that change something (builds, starts, stops, removals)."""
        reads = {"is-active", "show", "status", "list-units"}
        out = []
        for call in self.host_calls():
            prog = call[0]
            if prog == "journalctl":
                continue
            if prog == "nix" and "build" not in call:
                continue
            if prog == "systemctl" and len(call) > 1 and call[1] in reads:
                continue
            out.append(call)
        return out


@pytest.fixture
def fake_host(fakehost):
    """The fake host first on PATH (tests/support/fakehost.py); its log file."""
    require_tool("nix-instantiate")
    require_tool("sshd")
    return fakehost.log_file


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    """Each lifecycle test runs on both host backends."""
    monkeypatch.setenv("MARINER_BACKEND", request.param)
    return request.param


@pytest.fixture
def project(fake_host, isolated_env, backend, monkeypatch):
    """A project owned by the guest account, in a directory the guest account can reach.

    On the runner backend, when the suite runs as root, mariner runs as that account (runner
    mode needs no root): its HOME, MARINER_HOME, XDG directories and the fake host's files
    move into a directory it owns, and the guest's sshd (started by the account's runner) runs
    as it too."""
    from support.fakehost import stop_runner_vms
    from support.guest_sshd import ensure_guest_user

    uid, _home = ensure_guest_user(GUEST_USER)
    base = Path(tempfile.mkdtemp(prefix="mrl-", dir="/tmp"))
    os.chmod(base, 0o755)
    directory = base / "api"
    directory.mkdir()
    guest_root = base / "guest"
    guest_root.mkdir()
    os.chown(directory, uid, -1)
    name = "t" + uuid.uuid4().hex[:10]
    proj = Project(dir=directory, name=name, log=fake_host, guest_root=guest_root, guest_uid=uid,
                   backend=backend)
    if backend == "runner" and os.geteuid() == 0:
        _as_the_account(proj, base, monkeypatch)
    proj.write()
    try:
        yield proj
    finally:
        if proj.account is not None:
            # The account's agents (mariner refuses, rightly, to use another uid's runtime
            # directory, root's included) and VMs, before their directories go with `base`.
            _kill_agents(Path(os.environ["XDG_RUNTIME_DIR"]))
            stop_runner_vms()
        else:
            _stop_agents(proj.host_vms_dir)
        shutil.rmtree(base, ignore_errors=True)


def _kill_agents(runtime: Path) -> None:
    """SIGTERM every agent whose lock file is in `runtime` (`<name>.lock`: pid and start time)
    and wait for it to exit."""
    import signal
    import time

    from mariner_dev.procid import start_time

    for lock in runtime.glob("**/*.lock"):
        try:
            fields = lock.read_text().split()
            pid, started = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        if start_time(pid) != started:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while start_time(pid) == started and time.monotonic() < deadline:
            time.sleep(0.02)


def _as_the_account(proj: Project, base: Path, monkeypatch) -> None:
    from support import unprivileged

    # OpenSSH gives a session's PTY to group tty, which the guest's sshd (running as the
    # account, as it would not in a real VM) may only do as a member where /dev/pts is not
    # mounted with gid=5.
    account = unprivileged.ensure_account(GUEST_USER, groups=("tty",))
    env_dir = base / "env"
    env_dir.mkdir()
    places = {"HOME": "home", "MARINER_HOME": "mariner-home", "XDG_STATE_HOME": "xdg-state",
              "XDG_CONFIG_HOME": "xdg-config", "XDG_CACHE_HOME": "xdg-cache",
              "XDG_DATA_HOME": "xdg-data", "XDG_RUNTIME_DIR": "run",
              "MARINER_FAKE_NIX_STORE": "nix-store", "MARINER_FAKE_VSOCK_DIR": "vsock-cids",
              "NIX_STATE_DIR": "nix-state"}
    for variable, sub in places.items():
        (env_dir / sub).mkdir(mode=0o700)
        monkeypatch.setenv(variable, str(env_dir / sub))
    (env_dir / "kvm").write_text("")        # the fake runner needs no KVM
    monkeypatch.setenv("MARINER_KVM", str(env_dir / "kvm"))
    proj.log = env_dir / "fakehost.log"
    proj.log.write_text("")
    monkeypatch.setenv("MARINER_FAKEHOST_LOG", str(proj.log))
    for variable, value in unprivileged.account_env(account, {}).items():
        monkeypatch.setenv(variable, value)
    python, pythonpath = unprivileged.python_argv(account)
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    proj.account, proj.python, proj.owned = account, tuple(python), base


def _stop_agents(vms_dir: Path) -> None:
    """Whatever a test left running: the VMs' background agents (the fakehost fixture stops
    the guests)."""
    from mariner_dev import remote

    if not vms_dir.is_dir():
        return
    for vm in vms_dir.iterdir():
        if vm.is_dir() and not vm.name.startswith("."):
            remote.stop_agent(vm.name)
