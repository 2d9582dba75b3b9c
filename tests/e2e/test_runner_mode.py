"""The runner backend against a real VM: `nix build` (the e2e fake, realrunner.py) produces a
runner whose microvm-run is real QEMU and whose virtiofsd-run starts Debian's virtiofsd per
share; mariner's own supervisor runs them, with no microvm, systemctl or sudo, all as the
developer's own unprivileged account (created when the suite runs as root). The tests run in
file order on one VM: up, exec, sync, shell, down (clean, disk kept), up, a crash, destroy."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from mariner_dev.host import supervisor
from realhost import DEFAULT_GID
from realvm import GUEST_UID, free_port, make_vm, teardown_vm, wait_for
from support import unprivileged

pytestmark = pytest.mark.e2e


ACCOUNT = "mariner-dev"


@pytest.fixture(scope="module")
def vm(e2e_image):
    # Runner mode needs no root: the developer's own account (uid GUEST_UID, the project's
    # owner) runs mariner, QEMU and virtiofsd. Its files live where it can reach them (pytest's
    # own tmp dirs are root's, 0700), the guest image is linked there too.
    account = unprivileged.ensure_account(ACCOUNT, uid=GUEST_UID, group=DEFAULT_GID)
    if unprivileged.is_root():
        assert (account.pw_uid, account.pw_gid) == (GUEST_UID, DEFAULT_GID), account
    base = Path(tempfile.mkdtemp(prefix="mre2e-runner-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield from _vm(base, e2e_image, account)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _vm(base, e2e_image, account):
    image = base / "image"
    image.mkdir()
    for name in ("rootfs.img", "vmlinuz", "initrd.img"):
        try:
            os.link(e2e_image / name, image / name)
        except OSError:
            shutil.copy2(e2e_image / name, image / name)
    # The account's `nix build` evaluates through the pinned upstream sources: a copy it can
    # read, wherever ../shared is.
    from support import upstream

    shutil.copytree(upstream.locate_src(), base / "upstream-src", symlinks=True)
    vm = make_vm(base, image, "e2e-runner", ssh_port=free_port(),
                 user_toml='[dotfiles]\nfiles = ["~/.gitconfig"]\n')
    vm.env = unprivileged.account_env(account, vm.env)
    vm.env["MARINER_BACKEND"] = "runner"
    vm.env["MARINER_FAKE_NIX_STORE"] = str(base / "nix-store")  # the fake nix's store
    vm.env["NIX_STATE_DIR"] = str(base / "nix-state")   # nix-instantiate, as the account
    vm.env["MARINER_UPSTREAM_SRC"] = str(base / "upstream-src")
    # QEMU runs with TCG here (machines' /dev/kvm is root's, or hangs): the backend's preflight
    # is shown a KVM device the account may open.
    vm.env["MARINER_E2E_ACCEL"] = "tcg"
    (base / "kvm").write_text("")
    vm.env["MARINER_KVM"] = str(base / "kvm")
    (base / "nix-state").mkdir()
    # No supplementary groups: Debian's C virtiofsd (the stand-in for the real runner's) drops
    # them with setgroups(), which a user namespace of an unprivileged account refuses.
    python, vm.env["PYTHONPATH"] = unprivileged.python_argv(account,
                                                            supplementary_groups=False)
    vm.python = tuple(python)
    (vm.home / ".gitconfig").write_text("[user]\n\tname = Runner Mode\n")
    for key in ("MARINER_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
                "XDG_DATA_HOME", "MARINER_FAKE_NIX_STORE"):
        Path(vm.env[key]).mkdir(parents=True, exist_ok=True)
    if unprivileged.is_root():
        os.chown(base, account.pw_uid, account.pw_gid)
    # (not the image: hard links to the cache's own files)
    unprivileged.give_to(account, *[p for p in base.iterdir() if p.name != "image"],
                         Path(vm.env["XDG_RUNTIME_DIR"]))
    try:
        yield vm
    finally:
        teardown_vm(vm)
        state = _state(vm)
        record = supervisor.read_record(str(state))
        for pid, start in ((record.get("qemu_pid"), record.get("qemu_start")),
                           (record.get("virtiofsd_pid"), record.get("virtiofsd_start")),
                           (record.get("pid"), record.get("start"))):
            if supervisor.alive(pid, start):
                os.killpg(pid, signal.SIGKILL)
                pytest.fail(f"process {pid} of the runner backend survived destroy")


def _state(vm) -> Path:
    return Path(vm.env["XDG_DATA_HOME"]) / "mariner" / "vms" / vm.name


def _record(vm) -> dict:
    return supervisor.read_record(str(_state(vm)))


def _pids(vm) -> list[int]:
    """The supervisor, QEMU and virtiofsd-run (with its virtiofsd children, in its group)."""
    record = _record(vm)
    return [pid for pid, start in ((record.get("pid"), record.get("start")),
                                   (record.get("qemu_pid"), record.get("qemu_start")),
                                   (record.get("virtiofsd_pid"), record.get("virtiofsd_start")))
            if supervisor.alive(pid, start)]


def _console(vm) -> str:
    return vm.mariner("logs", check=0).stdout


def test_up_builds_and_boots_under_mariners_supervisor(vm):
    result = vm.up()
    assert result["created"] and result["started"] and result["state"] == "running"
    status = vm.status()
    assert status["state"] == "running" and status["backend"] == "runner"
    state = _state(vm)
    assert (state.stat().st_mode & 0o777) == 0o700
    assert (state / "current" / "bin" / "microvm-run").exists()
    assert (state / "disk.qcow2").is_file()  # the runner's volumes, relative to <state>
    assert not (Path(vm.env["MARINER_MICROVMS_DIR"]) / vm.name).exists()
    assert len(_pids(vm)) == 3
    for pid in _pids(vm):   # the supervisor, QEMU and virtiofsd-run: the developer's, not root's
        uid = next(int(line.split()[2]) for line in open(f"/proc/{pid}/status")
                   if line.startswith("Uid:"))
        assert uid == (GUEST_UID if unprivileged.is_root() else os.getuid()), (pid, uid)
    console = _console(vm)
    started = console.index("virtiofsd-run started")
    assert started < console.index("e2e runner: qemu-system-x86_64")  # virtiofsd first
    assert "Linux version" in console  # the serial console is in console.log


def test_exec_reaches_the_mounted_project_with_the_developers_ownership(vm):
    out = vm.mariner("exec", "--", "cat", "README", check=0).stdout
    assert out == "a project mounted into a real VM\n"
    vm.mariner("exec", "--", "sh", "-c", "echo from-guest > written-in-vm", check=0)
    written = vm.project / "written-in-vm"
    assert written.read_text() == "from-guest\n" and written.stat().st_uid == vm.uid
    assert vm.mariner("exec", "--", "cat", "/data/table.csv", check=0).stdout.startswith("id,")


def test_sync_and_a_shell_command(vm):
    vm.mariner("sync", check=0)
    assert vm.guest_text("cat ~/.gitconfig") == "[user]\n\tname = Runner Mode"
    proc = subprocess.run([*vm.mariner_argv(), "shell", "pwd; exit 3"],
                          cwd=vm.project / "src" / "pkg", env=vm.env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert proc.stdout.strip().endswith(f"{vm.workspace}/src/pkg")


def test_down_is_a_clean_power_off_and_up_keeps_the_disk(vm):
    vm.guest("echo kept across down and up > ~/on-the-disk")  # no sync: a clean stop keeps it
    pids = _pids(vm)
    vm.close_ssh()
    vm.mariner("down", check=0)
    assert not [pid for pid in pids if supervisor.alive(pid, supervisor.start_time(pid))]
    assert vm.status()["state"] == "stopped"
    assert _record(vm)["state"] == "stopped"
    console = _console(vm)
    assert re.search(r"reboot: (Restarting system|Power down)", console), console[-2000:]
    assert "terminating QEMU" not in console
    assert not list(_state(vm).glob("*.sock"))  # QMP gone, virtiofsd stopped
    again = vm.up()
    assert again["started"] and not again["created"]
    assert vm.guest_text("cat ~/on-the-disk") == "kept across down and up"
    assert console.count("virtiofsd-run started") + 1 == _console(vm).count("virtiofsd-run started")


def test_a_crashed_qemu_is_failed_with_its_console_and_up_restarts_it(vm):
    qemu = _record(vm)["qemu_pid"]
    vm.close_ssh()
    os.kill(qemu, signal.SIGKILL)
    wait_for(lambda: vm.status()["state"] == "failed", 30, "the crash to show")
    assert "QEMU killed by signal 9" in _console(vm)
    assert not _pids(vm)  # the supervisor stopped virtiofsd and ended
    recovered = vm.up()
    assert recovered["started"]
    assert vm.guest_text("cat ~/on-the-disk") == "kept across down and up"


def test_destroy_removes_the_state_directory(vm):
    pids = _pids(vm)
    vm.close_ssh()
    vm.mariner("destroy", "--force", check=0)
    assert not _state(vm).exists()
    assert not [pid for pid in pids if supervisor.alive(pid, supervisor.start_time(pid))]
    assert vm.status()["state"] == "absent"
    listing = json.loads(vm.mariner("list", "--json", check=0).stdout)
    assert listing["backend"] == "runner" and vm.name not in json.dumps(listing["vms"])
