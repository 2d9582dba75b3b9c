"""A real VM's life through mariner: up waits for the booting guest, logs are its console,
down is a clean power-off that keeps the disk, a crashed VM is failed and up recovers it,
destroy removes it. The tests run in file order on one VM."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest

from realvm import (E2E_BIN, alive, free_port, make_vm, ssh_banner, teardown_vm, vm_pids,
                      wait_for)

pytestmark = pytest.mark.e2e

# `up` may still pin the host key, write the ssh-config and start its agent after the guest
# first answers; each SSH handshake costs about a second under TCG.
UP_AFTER_ANSWER = 8.0


@pytest.fixture(scope="module")
def vm(module_base, e2e_image):
    vm = make_vm(module_base, e2e_image, "e2e-life", ssh_port=free_port())
    try:
        yield vm
    finally:
        teardown_vm(vm)


def _port(vm) -> int:
    text = (vm.project / "mariner.toml").read_text()
    return int(re.search(r"^ssh_port = (\d+)$", text, re.M).group(1))


def _unit_state(vm) -> str:
    proc = subprocess.run([str(E2E_BIN / "systemctl"), "is-active", f"microvm@{vm.name}"],
                          env=vm.env, capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()


def test_up_boots_the_vm_and_returns_soon_after_the_guest_answers(vm):
    port = _port(vm)
    first_answer: list[float] = []
    last_silence: list[float] = [0.0]  # when the last probe that got no banner began
    observed: list[tuple[float, str]] = []  # (when `mariner status` returned, its state)
    done = threading.Event()

    def watch_ssh():
        while not done.is_set():
            began = time.monotonic()
            if ssh_banner(port, timeout=5):  # sshd re-execs per connection: slow under TCG
                first_answer.append(time.monotonic())
                return
            last_silence[0] = began
            time.sleep(0.2)

    def watch_status():
        while not done.is_set() and not first_answer:
            if vm.vm_dir.exists():
                try:
                    state = vm.status()["state"]
                except (AssertionError, ValueError) as exc:  # reported by the asserts below
                    state = f"status failed: {exc}"
                observed.append((time.monotonic(), state))
            time.sleep(0.2)

    watchers = [threading.Thread(target=watch_ssh, daemon=True),
                threading.Thread(target=watch_status, daemon=True)]
    for watcher in watchers:
        watcher.start()
    started = time.monotonic()
    result = vm.up()
    returned = time.monotonic()
    done.set()
    for watcher in watchers:
        watcher.join(timeout=30)
    assert result["state"] == "running" and result["created"] and result["started"]
    assert result["ssh_port"] == port
    assert first_answer, f"up returned before the guest ever answered SSH: {observed}"
    answered = first_answer[0]
    print(f"boot to SSH {answered - started:.1f} s, up returned {returned - started:.1f} s")
    assert returned - answered < UP_AFTER_ANSWER, \
        f"up returned {returned - answered:.1f} s after the guest answered"
    # QEMU accepts TCP on the forwarded port long before the guest's sshd listens: a status
    # taken while the guest was certainly not answering yet (before the last probe that got
    # no banner began) must not say running. Between then and `answered` either is right.
    early = {state for when, state in observed if when < last_silence[0]}
    assert "starting" in early and early <= {"absent", "stopped", "starting"}, observed
    assert _unit_state(vm) == "active"
    assert vm.status()["state"] == "running"


def test_logs_are_the_serial_console(vm):
    logs = vm.mariner("logs", check=0).stdout
    assert "Linux version" in logs
    assert "mariner-guest-config: user dev (uid 1234, gid 100)" in logs
    assert f"virtiofs workspace mounted at {vm.workspace}" in logs
    assert re.search(r"virtiofs \S+ mounted at /data \(read-only\)", logs), logs[-3000:]


def test_down_powers_off_cleanly_and_up_keeps_the_disk(vm):
    # written without sync: only a clean shutdown is sure to keep the last seconds of writes
    vm.guest("echo kept across down and up > ~/on-the-disk")
    pids = vm_pids(vm)
    assert len(pids) == 4, vm.unit()  # launcher, QEMU, a virtiofsd for the workspace and /data
    vm.close_ssh()
    vm.mariner("down", check=0)
    assert not [pid for pid in pids if alive(pid)]
    assert _unit_state(vm) == "inactive"
    assert vm.status()["state"] == "stopped"
    journal = vm.journal()
    assert re.search(r"\[\s*\d+\.\d+\] reboot: Power down", journal), journal[-2000:]
    assert "killing QEMU" not in journal
    assert (vm.vm_dir / "disk.qcow2").is_file()

    again = vm.up()
    assert again["started"] and not again["created"]
    assert vm.guest_text("cat ~/on-the-disk") == "kept across down and up"


def test_a_vm_whose_qemu_dies_is_failed_and_up_restarts_it(vm):
    qemu = vm.unit()["qemu_pid"]
    vm.close_ssh()
    subprocess.run(["kill", "-KILL", str(qemu)], check=True)
    wait_for(lambda: _unit_state(vm) == "failed", 20, "the unit to fail")
    assert vm.status()["state"] == "failed"
    assert "qemu-system-x86_64 exited with status -9" in vm.journal()
    recovered = vm.up()
    assert recovered["started"]
    assert vm.guest_text("cat ~/on-the-disk") == "kept across down and up"


def test_up_while_the_guest_boots_waits_for_it(vm):
    # the host started the VM on its own (microvm.nix autostarts VMs at boot): mariner finds
    # the unit active and the SSH port accepting connections (QEMU's), the guest not there yet
    vm.close_ssh()
    vm.mariner("down", check=0)
    subprocess.run([str(E2E_BIN / "systemctl"), "start", f"microvm@{vm.name}"], env=vm.env,
                   check=True, capture_output=True, timeout=60)
    wait_for(lambda: _unit_state(vm) == "active", 30, "QEMU to start")
    assert not ssh_banner(_port(vm), timeout=0.5)  # still booting
    vm.up()
    assert ssh_banner(_port(vm), timeout=5), "up returned before the guest answered SSH"
    assert vm.mariner("exec", "--", "cat", "/home/dev/on-the-disk").stdout == \
        "kept across down and up\n"


def test_destroy_removes_the_vm_and_its_disk(vm):
    pids = vm_pids(vm)
    vm.close_ssh()
    vm.mariner("destroy", "--force", check=0)
    assert not vm.vm_dir.exists()
    assert not [pid for pid in pids if alive(pid)]
    assert vm.status()["state"] == "absent"
    listing = json.loads(vm.mariner("list", "--json", check=0).stdout)
    assert vm.name not in json.dumps(listing)
