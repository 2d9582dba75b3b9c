"""The fake host for tests: `microvm`, `systemctl` and `journalctl` from tests/fakehost/bin
first on PATH, with their argv log, and helpers to render a VM flake the fakes will boot.

Use it from any test module (tests/ is on sys.path, see tests/conftest.py):

    from support.fakehost import fakehost  # noqa: F401  (the fixture)

    def test_something(fakehost):
        ...
        assert fakehost.commands("microvm") == [["microvm", "-c", "api", "-f", "path:/..."]]

The knobs of the fakes (MARINER_FAKE_BOOT_DELAY, MARINER_FAKE_BOOT_FAIL,
MARINER_FAKE_BUILD_FAIL, ...) are documented in tests/fakehost/fakelib.py; set them with
monkeypatch.setenv before the command runs.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

FAKEHOST = Path(__file__).resolve().parent.parent / "fakehost"
FAKEHOST_BIN = FAKEHOST / "bin"
sys.path.insert(0, str(FAKEHOST))

import fakelib  # noqa: E402

from support import guest_sshd  # noqa: E402


def guest_user() -> str:
    """The account that plays the guest user: a dedicated one as root, else ourselves."""
    return guest_sshd.DEFAULT_GUEST_USER if os.geteuid() == 0 else getpass.getuser()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class FakeHost:
    """Handle on the fake host of one test: its directories and the commands it ran."""

    microvms_dir: Path
    gcroots_dir: Path
    log_file: Path

    def records(self) -> list[dict]:
        try:
            text = self.log_file.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def commands(self, prog: str | None = None) -> list[list[str]]:
        """Every fake command run so far as [prog, *arguments], in order."""
        return [[record["prog"], *record["argv"]] for record in self.records()
                if prog is None or record["prog"] == prog]

    def clear_log(self) -> None:
        self.log_file.write_text("")

    def vm_dir(self, name: str) -> Path:
        return self.microvms_dir / name

    def unit_record(self, name: str) -> dict:
        """The fake unit's whole record (state, substate, pids, the guest's key dir...)."""
        return fakelib.read_unit(name)

    def unit_state(self, name: str) -> str:
        return self.unit_record(name).get("state", "inactive")

    def journal(self, name: str) -> str:
        try:
            return (self.vm_dir(name) / fakelib.JOURNAL_FILE).read_text()
        except FileNotFoundError:
            return ""

    def run(self, prog: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """Run one of the fakes directly (as the real command would be run)."""
        return subprocess.run([str(FAKEHOST_BIN / prog), *args], capture_output=True,
                              text=True, check=check)

    def stop_all(self) -> None:
        """Stop every VM's unit, and every VM the runner backend started, so no guest sshd
        outlives the test."""
        stop_runner_vms()
        if not self.microvms_dir.is_dir():
            return
        for directory in self.microvms_dir.iterdir():
            if directory.is_dir() and not directory.name.startswith("."):
                fakelib.stop_unit(directory.name)


def stop_runner_vms() -> None:
    """SIGTERM the fake QEMU (it halts its guest) and the supervisor of every runner-backend VM
    under $XDG_DATA_HOME/mariner/vms, then their process groups (virtiofsd-run)."""
    import signal

    from mariner_dev.host import supervisor
    from mariner_dev.host.userhost import state_root

    root = state_root()
    if not root.is_dir():
        return
    for directory in root.iterdir():
        record = supervisor.read_record(str(directory))
        procs = [(record.get("qemu_pid"), record.get("qemu_start"), False),
                 (record.get("virtiofsd_pid"), record.get("virtiofsd_start"), True),
                 (record.get("pid"), record.get("start"), True)]
        for pid, start, group in procs:
            if supervisor.alive(pid, start):
                try:
                    os.killpg(pid, signal.SIGTERM) if group else os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
                deadline = time.monotonic() + 10
                while supervisor.alive(pid, start) and time.monotonic() < deadline:
                    time.sleep(0.05)
        if (directory / "guest" / "sshd_config").exists():  # a QEMU killed under its guest
            subprocess.run([sys.executable, str(fakelib.GUEST_SSHD), "stop", "--state-dir",
                            str(directory / "guest")], capture_output=True, text=True)


@pytest.fixture
def fakehost(monkeypatch, tmp_path) -> FakeHost:
    """The fake host first on PATH; MARINER_MICROVMS_DIR/GCROOTS from the isolation fixture."""
    microvms = Path(os.environ.get("MARINER_MICROVMS_DIR") or tmp_path / "microvms")
    gcroots = Path(os.environ.get("MARINER_GCROOTS_DIR") or tmp_path / "gcroots")
    microvms.mkdir(parents=True, exist_ok=True)
    log_file = tmp_path / "fakehost.log"
    monkeypatch.setenv("MARINER_MICROVMS_DIR", str(microvms))
    monkeypatch.setenv("MARINER_GCROOTS_DIR", str(gcroots))
    monkeypatch.setenv("MARINER_FAKEHOST_LOG", str(log_file))
    monkeypatch.setenv("MARINER_FAKE_NIX_STORE", str(tmp_path / "nix-store"))
    (tmp_path / "vsock-cids").mkdir(exist_ok=True)
    monkeypatch.setenv("MARINER_FAKE_VSOCK_DIR", str(tmp_path / "vsock-cids"))
    monkeypatch.delenv("MARINER_VHOST_VSOCK", raising=False)
    # the fake runner needs no KVM: the runner backend's preflight is told of a usable one
    (tmp_path / "kvm").write_text("")
    monkeypatch.setenv("MARINER_KVM", str(tmp_path / "kvm"))
    monkeypatch.setenv("PATH", f"{FAKEHOST_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for knob in ("MARINER_FAKE_BUILD_FAIL", "MARINER_FAKE_BUILD_DELAY", "MARINER_FAKE_BOOT_DELAY",
                 "MARINER_FAKE_BOOT_FAIL", "MARINER_FAKE_STOP_DELAY", "MARINER_FAKE_GUEST_USER",
                 "MARINER_FAKE_NO_SHARES", "MARINER_FAKE_NIX_FEATURES"):
        monkeypatch.delenv(knob, raising=False)
    host = FakeHost(microvms, gcroots, log_file)
    try:
        yield host
    finally:
        host.stop_all()


def shell_command(directory: Path, name: str, body: str) -> Path:
    """A small /bin/sh stand-in command `directory/name` running `body`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def client_key(directory: Path) -> Path:
    """A fresh ed25519 client key pair in `directory` (returns the private key's path)."""
    return guest_sshd.generate_client_key(Path(directory) / "id_ed25519")


def write_project(project_dir: Path, name: str, *, ssh_port: int, extra: str = "",
                  user: str | None = None) -> Path:
    """A user-mode project whose VM the fakes can boot, its host settings approved (as
    `mariner trust` would); returns its mariner.toml."""
    from support.approval import approve_host_settings

    project_dir.mkdir(parents=True, exist_ok=True)
    config = project_dir / "mariner.toml"
    config.write_text(
        f'[vm]\nname = "{name}"\nuser = "{user or guest_user()}"\n\n'
        f'[network]\nmode = "user"\nssh_port = {ssh_port}\n\n'
        # The fake emulates the workspace share as a symlink at the mount point: keep it in
        # the test's temporary directory, not in /workspaces.
        f'[workspace]\nmount = "{project_dir.parent / ("guest-" + name)}"\n\n' + extra)
    approve_host_settings(project_dir)
    return config


def render_vm(project_dir: Path, flake_dir: Path, *, cid: int, ssh_port: int,
              public_key: str) -> Path:
    """Render the project's VM flake with mariner's own renderer into `flake_dir`."""
    from mariner_dev.config import load_project
    from mariner_dev.nixrender import render_flake, write_flake

    cfg = load_project(project_dir=project_dir)
    rendered = render_flake(cfg, cid=cid, ssh_port=ssh_port, public_key=public_key)
    return write_flake(rendered, flake_dir)
