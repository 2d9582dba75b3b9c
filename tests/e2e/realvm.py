"""A project whose VM runs under QEMU on the e2e host, and the ways tests drive it.

The function-scoped isolation of tests/conftest.py still runs around each test, but a module
shares one VM: `isolated_environment` gives the module its own HOME, MARINER_HOME,
MARINER_MICROVMS_DIR, XDG directories (as tests/conftest.py does for one test), and every
command goes through `RealVm`, which passes that environment explicitly.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import realhost
from support.fakehost import wait_for  # noqa: F401  (for the tests)

E2E = Path(__file__).resolve().parent
E2E_BIN = E2E / "bin"
GUEST_USER = "dev"
GUEST_UID = 1234  # CI runs as root: the tests set [vm] uid, as a developer's own uid would be


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ssh_banner(port: int, timeout: float = 1.0) -> bool:
    """True when an SSH server answers on the port (QEMU accepts the TCP connection itself
    before the guest listens, so only the banner shows the guest is there)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def isolated_environment(base: Path, image_dir: Path) -> dict:
    """What tests/conftest.py's isolation sets, for a whole module, plus the e2e host."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MARINER_AGENT", "SSH_AUTH_SOCK", "MARINER_FAKEHOST_LOG")
           and not k.startswith("MARINER_FAKE_")}
    runtime = Path(tempfile.mkdtemp(prefix="mre-", dir="/tmp"))  # sockets: keep it short
    runtime.chmod(0o700)
    for sub in ("home", "microvms"):
        (base / sub).mkdir()
    env.update({
        "HOME": str(base / "home"),
        "MARINER_HOME": str(base / "mariner-home"),
        "MARINER_MICROVMS_DIR": str(base / "microvms"),
        "MARINER_GCROOTS_DIR": str(base / "gcroots"),
        "XDG_STATE_HOME": str(base / "xdg-state"),
        "XDG_CONFIG_HOME": str(base / "xdg-config"),
        "XDG_CACHE_HOME": str(base / "xdg-cache"),
        "XDG_DATA_HOME": str(base / "xdg-data"),
        "XDG_RUNTIME_DIR": str(runtime),
        # the e2e host plays the microvm.nix host module; test_runner_mode.py sets "runner"
        "MARINER_BACKEND": "microvm",
        "NO_COLOR": "1", "COLUMNS": "120", "TERM": "xterm-256color",
        "MARINER_SUDO": "",
        "PATH": f"{E2E_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MARINER_E2E_IMAGE": str(image_dir),
        "MARINER_E2E_ACCEL": os.environ.get("MARINER_E2E_ACCEL") or "tcg",
    })
    return env


@dataclass
class RealVm:
    """A project whose VM runs under QEMU, and ways to drive it: mariner itself, and the
    test's own OpenSSH channel into the guest (independent of `mariner exec`)."""

    name: str
    project: Path
    base: Path
    env: dict
    uid: int
    gid: int
    up_result: dict | None = None
    # how mariner's Python starts: this interpreter, or (runner mode as the developer's own
    # account) setpriv and the system's python3
    python: tuple[str, ...] = ()

    @property
    def home(self) -> Path:
        return Path(self.env["HOME"])

    @property
    def vm_dir(self) -> Path:
        """The VM's directory on the host: the microvm.nix state directory's, or the runner
        backend's under $XDG_DATA_HOME."""
        if self.env.get("MARINER_BACKEND") == "runner":
            return Path(self.env["XDG_DATA_HOME"]) / "mariner" / "vms" / self.name
        return Path(self.env["MARINER_MICROVMS_DIR"]) / self.name

    @property
    def ssh_port(self) -> int:
        return int(self.up_result["ssh_port"])

    @property
    def workspace(self) -> str:
        return self.up_result["workspace"]

    def unit(self) -> dict:
        try:
            return json.loads((self.vm_dir / realhost.fakelib.UNIT_FILE).read_text())
        except FileNotFoundError:
            return {}

    def journal(self) -> str:
        try:
            return (self.vm_dir / realhost.fakelib.JOURNAL_FILE).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mariner(self, *args: str, cwd: Path | None = None, timeout: float = 300,
                check: int | None = None, input: str | None = None) -> subprocess.CompletedProcess:
        """Run the real `mariner` entry point in a subprocess (in the project by default)."""
        proc = subprocess.run([*self.mariner_argv(), *args],
                              cwd=cwd or self.project, env=self.env, capture_output=True,
                              text=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
        assert "Traceback" not in proc.stderr, proc.stderr
        if check is not None:
            assert proc.returncode == check, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def mariner_argv(self) -> list[str]:
        return [*(self.python or (sys.executable,)), "-m", "mariner_dev"]

    def up(self, *args: str) -> dict:
        # The developer approves the project's host settings (what a test wrote) first.
        self.mariner("trust", "--yes", check=0)
        proc = self.mariner("up", "--json", *args, timeout=600)
        lines = proc.stdout.strip().splitlines()
        assert proc.returncode == 0 and len(lines) == 1, (proc.returncode, proc.stdout,
                                                          proc.stderr, self.journal()[-3000:])
        self.up_result = json.loads(lines[0])
        return self.up_result

    def status(self) -> dict:
        return json.loads(self.mariner("status", "--json", check=0).stdout)

    def ssh_argv(self, *extra: str) -> list[str]:
        """OpenSSH into the guest with mariner's key and mariner's pinned host key (strict)."""
        mhome = Path(self.env["MARINER_HOME"])
        return ["ssh", "-F", "/dev/null", "-i", str(mhome / "keys" / "id_ed25519"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"HostKeyAlias=mariner-{self.name}",
                "-o", f"UserKnownHostsFile={mhome / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=20",
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self.base_short}/cm",
                "-o", "ControlPersist=120", "-p", str(self.ssh_port), *extra,
                f"{GUEST_USER}@127.0.0.1"]

    @property
    def base_short(self) -> Path:
        return Path(self.env["XDG_RUNTIME_DIR"])

    def guest(self, script: str, *, check: bool = True, timeout: float = 120,
              input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a shell script in the guest as the guest user (bytes out)."""
        proc = subprocess.run([*self.ssh_argv(), "bash", "-c", shlex.quote(script)],
                              input=input, capture_output=True, timeout=timeout, env=self.env,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check:
            assert proc.returncode == 0, (script, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def guest_text(self, script: str) -> str:
        return self.guest(script).stdout.decode().strip()

    def close_ssh(self) -> None:
        subprocess.run([*self.ssh_argv("-O", "exit")], capture_output=True, env=self.env,
                       timeout=30)


def make_vm(base: Path, image_dir: Path, name: str, *, gid: int | None = None,
            ssh_port: int | None = None, extra_toml: str = "", user_toml: str = "") -> RealVm:
    """A project owned by the guest uid (as a developer's project would be), with a read-only
    share; not started. `user_toml` is the per-user config ([dotfiles], [ssh])."""
    env = isolated_environment(base, image_dir)
    project = base / "project"
    (project / "src" / "pkg").mkdir(parents=True)
    (project / "README").write_text("a project mounted into a real VM\n")
    data = base / "dataset"
    data.mkdir()
    (data / "table.csv").write_text("id,value\n1,42\n")
    vm_lines = f'name = "{name}"\nuser = "{GUEST_USER}"\nuid = {GUEST_UID}\n'
    if gid is not None:
        vm_lines += f"gid = {gid}\n"
    # an explicit port from the ephemeral range: mariner's allocator starts at 22200 in every
    # isolated MARINER_HOME, so test runs sharing a machine would pick the same one
    port_line = f"ssh_port = {ssh_port or free_port()}\n"
    (project / "mariner.toml").write_text(
        f'[vm]\n{vm_lines}cpus = 2\nmemory = "1GiB"\n\n'
        f'[network]\nmode = "user"\n{port_line}\n'
        f'[[shares]]\nsource = "{data}"\ntarget = "/data"\nreadonly = true\n\n{extra_toml}')
    if user_toml:
        user_config = Path(env["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
        user_config.parent.mkdir(parents=True, exist_ok=True)
        user_config.write_text(user_toml)
    group = gid if gid is not None else realhost.DEFAULT_GID
    # the developer owns the project and the share (shares are an allowlist of such dirs)
    for path in [project, *project.rglob("*"), data, *data.rglob("*")]:
        os.chown(path, GUEST_UID, group)
    return RealVm(name=name, project=project, base=base, env=env, uid=GUEST_UID, gid=group)


def vm_pids(vm: RealVm) -> list[int]:
    """The unit's processes: launcher, QEMU, virtiofsd."""
    unit = vm.unit()
    return [p for p in (unit.get("boot_pid"), unit.get("qemu_pid"),
                        *(unit.get("virtiofsd_pids") or [])) if p]


def alive(pid: int) -> bool:
    return realhost.pid_alive(pid)


def teardown_vm(vm: RealVm) -> None:
    """Destroy the VM (if a test has not); anything left running is killed and reported."""
    if vm.up_result:
        vm.close_ssh()
    pids = vm_pids(vm)
    problems = []
    if vm.vm_dir.exists():
        proc = vm.mariner("destroy", "--force", timeout=300)
        if proc.returncode != 0:
            problems.append(f"mariner destroy failed: {proc.stderr.strip()}")
            subprocess.run([str(E2E_BIN / "systemctl"), "stop", f"microvm@{vm.name}"],
                           env=vm.env, capture_output=True, timeout=300)
    for pid in pids:
        if alive(pid):
            problems.append(f"process {pid} survived destroy")
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(vm.env["XDG_RUNTIME_DIR"], ignore_errors=True)
    assert not problems, problems


