"""MicrovmHost against the fake host: the commands it runs and the state it reads back."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest

from mariner_dev.errors import HostError
from mariner_dev.host.microvm import MicrovmHost, NixBuildError, gcroots_dir
from support import guest_sshd
from support.fakehost import (client_key, guest_user, port_open, render_vm, wait_for,
                              write_project)


@pytest.fixture
def vm(tmp_path, fakehost):
    """A rendered user-mode VM `api`: (backend, flake dir, ssh port, client key)."""
    port = guest_sshd.free_port()
    key = client_key(tmp_path / "keys")
    project = tmp_path / "api"
    write_project(project, "api", ssh_port=port)
    flake = render_vm(project, tmp_path / "flake", cid=7, ssh_port=port,
                      public_key=key.with_name(key.name + ".pub").read_text().strip())
    return MicrovmHost(), flake, port, key, project


def ssh_as_guest(port: int, key: Path, command: str = "echo hello") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
         f"{guest_user()}@127.0.0.1", command],
        capture_output=True, text=True, timeout=30)


def test_create_runs_microvm_with_an_absolute_path_flake(vm, fakehost):
    backend, flake, *_ = vm
    backend.create("api", flake)
    assert fakehost.commands("microvm") == [["microvm", "-c", "api", "-f", f"path:{flake}"]]
    status = backend.status("api")
    assert status.exists and status.unit == "inactive" and not status.running
    assert status.flakeref == f"path:{flake}"
    assert status.current and status.current.endswith("-microvm-api")
    assert status.booted is None and status.since is None and status.uptime is None
    assert backend.list_vms() == ["api"] and backend.exists("api")
    assert os.path.islink(gcroots_dir() / "api")


def test_create_refuses_a_relative_flake_dir(vm, fakehost):
    backend, flake, *_ = vm
    with pytest.raises(ValueError):
        backend.create("api", Path(os.path.relpath(flake)))
    assert fakehost.commands() == []


def test_create_refuses_an_existing_vm_without_building(vm, fakehost):
    backend, flake, *_ = vm
    backend.create("api", flake)
    fakehost.clear_log()
    with pytest.raises(HostError, match="already exists"):
        backend.create("api", flake)
    assert fakehost.commands("microvm") == []


def test_create_needs_a_flake_nix(tmp_path, fakehost):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HostError, match="flake.nix does not exist"):
        MicrovmHost().create("api", tmp_path / "empty")


@pytest.mark.parametrize("name", ["-f", "../etc", "a/b", "", ".hidden"])
def test_bad_names_never_reach_a_command(fakehost, tmp_path, name):
    backend = MicrovmHost()
    for call in (lambda: backend.create(name, tmp_path), lambda: backend.start(name),
                 lambda: backend.stop(name), lambda: backend.destroy(name),
                 lambda: backend.status(name)):
        with pytest.raises(HostError, match="not a usable VM name"):
            call()
    assert fakehost.commands() == []


def test_start_boots_the_guest_from_the_flake(vm, fakehost):
    backend, flake, port, key, _ = vm
    backend.create("api", flake)
    backend.start("api")
    status = backend.status("api")
    assert status.running and status.booted == status.current and not status.restart_pending
    assert status.uptime is not None and 0 <= status.uptime < 30 and status.since is not None
    wait_for(lambda: port_open(port), what="the guest's sshd")
    result = ssh_as_guest(port, key)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"
    assert ["systemctl", "start", "microvm@api"] in fakehost.commands("systemctl")


def test_the_guest_authorizes_only_the_key_in_the_flake(vm, fakehost, tmp_path):
    backend, flake, port, _, _ = vm
    other = client_key(tmp_path / "other")
    backend.create("api", flake)
    backend.start("api")
    wait_for(lambda: port_open(port), what="the guest's sshd")
    result = ssh_as_guest(port, other)
    assert result.returncode == 255 and "Permission denied" in result.stderr


def test_start_of_a_vm_that_was_never_built_runs_nothing(fakehost):
    with pytest.raises(HostError, match="has not been built"):
        MicrovmHost().start("api")
    assert fakehost.commands() == []


def test_stop_waits_until_inactive_and_the_guest_is_gone(vm, fakehost, monkeypatch):
    backend, flake, port, *_ = vm
    backend.create("api", flake)
    backend.start("api")
    wait_for(lambda: port_open(port), what="the guest's sshd")
    keydir = fakehost.unit_record("api").get("keydir")
    monkeypatch.setenv("MARINER_FAKE_STOP_DELAY", "0.3")
    backend.stop("api")
    status = backend.status("api")
    assert status.unit == "inactive" and status.booted is None
    assert not port_open(port)
    assert keydir is None or not os.path.exists(keydir)
    backend.stop("api")  # stopping a stopped VM is fine


def test_stop_without_wait_returns_before_the_unit_is_down(vm, fakehost, monkeypatch):
    backend, flake, port, *_ = vm
    backend.create("api", flake)
    backend.start("api")
    monkeypatch.setenv("MARINER_FAKE_STOP_DELAY", "1")
    backend.stop("api", wait=False)
    assert ["systemctl", "stop", "--no-block", "microvm@api"] in fakehost.commands()
    assert backend.wait_for_unit("api", ["inactive"], timeout=10) == "inactive"


def test_update_rebuilds_and_restart_boots_the_new_system(vm, fakehost, tmp_path):
    backend, flake, port, key, project = vm
    backend.create("api", flake)
    backend.start("api")
    before = backend.status("api")
    # the same config rendered again changes nothing that Nix would build
    render_vm(project, flake, cid=7, ssh_port=port,
              public_key=key.with_name(key.name + ".pub").read_text().strip())
    backend.update("api")
    assert backend.status("api").current == before.current
    (project / "mariner.toml").write_text((project / "mariner.toml").read_text()
                                          + '\n[nix]\npackages = ["ripgrep"]\n')
    render_vm(project, flake, cid=7, ssh_port=port,
              public_key=key.with_name(key.name + ".pub").read_text().strip())
    backend.update("api")
    after = backend.status("api")
    assert after.current != before.current and after.booted == before.current
    assert after.running and after.restart_pending
    assert ["microvm", "-u", "api"] in fakehost.commands("microvm")
    backend.restart("api")
    restarted = backend.status("api")
    assert restarted.running and restarted.booted == after.current
    assert not restarted.restart_pending
    wait_for(lambda: port_open(port), what="the guest's sshd after the restart")


def test_restart_of_a_stopped_vm_starts_it(vm, fakehost):
    backend, flake, *_ = vm
    backend.create("api", flake)
    backend.restart("api")
    assert backend.status("api").running


def test_update_of_an_unknown_vm(fakehost):
    with pytest.raises(HostError, match="does not exist"):
        MicrovmHost().update("api")
    assert fakehost.commands() == []


def test_destroy_removes_state_dir_and_gc_roots(vm, fakehost):
    backend, flake, port, *_ = vm
    backend.create("api", flake)
    backend.start("api")
    wait_for(lambda: port_open(port), what="the guest's sshd")
    (fakehost.vm_dir("api") / "persist.img").write_bytes(b"volume")
    backend.destroy("api")
    assert not os.path.lexists(fakehost.vm_dir("api"))
    assert not os.path.lexists(gcroots_dir() / "api")
    assert not os.path.lexists(gcroots_dir() / "booted-api")
    assert not port_open(port)
    status = backend.status("api")
    assert not status.exists and status.unit == "inactive" and status.current is None
    assert backend.list_vms() == []
    backend.destroy("api")  # destroying an absent VM is a no-op


def test_destroy_clears_a_failed_unit(vm, fakehost, monkeypatch):
    backend, flake, *_ = vm
    monkeypatch.setenv("MARINER_FAKE_BOOT_FAIL", "1")
    backend.create("api", flake)
    backend.start("api")
    backend.wait_for_unit("api", ["failed"], timeout=10)
    backend.destroy("api")
    assert ["systemctl", "reset-failed", "microvm@api"] in fakehost.commands()
    assert backend.status("api").unit == "inactive"


def test_privileged_commands_carry_the_sudo_prefix(vm, fakehost, monkeypatch, caplog):
    backend, flake, *_ = vm
    monkeypatch.setenv("MARINER_SUDO", "env MARINER_VIA_SUDO=1")
    with caplog.at_level(logging.INFO, logger="mariner.host"):
        backend.create("api", flake)
        backend.start("api")
        backend.status("api")
        list(backend.logs("api"))
        backend.destroy("api")
    commands = [m[2:] for m in caplog.messages if m.startswith("$ ")]
    env = subprocess.run(["which", "env"], capture_output=True, text=True).stdout.strip()
    prefixed = [c for c in commands if c.startswith(f"{env} MARINER_VIA_SUDO=1 /")]
    plain = [c for c in commands if c not in prefixed]
    assert any(" -c api -f path:" in c for c in prefixed)
    assert any(c.endswith("systemctl start microvm@api") for c in prefixed)
    assert any(c.endswith("systemctl stop microvm@api") for c in prefixed)
    assert any("rm -rf --one-file-system -- " in c for c in prefixed)
    assert plain and all(" show " in c or "journalctl" in c for c in plain)


def test_status_of_several_vms_is_one_systemctl_call(tmp_path, fakehost):
    backend = MicrovmHost()
    key = client_key(tmp_path / "keys")
    public = key.with_name(key.name + ".pub").read_text().strip()
    for index, name in enumerate(["alpha", "beta"]):
        port = guest_sshd.free_port()
        write_project(tmp_path / name, name, ssh_port=port)
        backend.create(name, render_vm(tmp_path / name, tmp_path / f"flake-{name}",
                                       cid=10 + index, ssh_port=port, public_key=public))
    backend.start("beta")
    (fakehost.microvms_dir / ".mariner-allocate.lock").write_text("")
    fakehost.clear_log()
    statuses = backend.statuses(backend.list_vms())
    assert list(statuses) == ["alpha", "beta"]
    assert statuses["alpha"].unit == "inactive" and statuses["beta"].unit == "active"
    assert len(fakehost.commands("systemctl")) == 1


def test_logs_tail_and_follow(vm, fakehost):
    backend, flake, port, *_ = vm
    backend.create("api", flake)
    assert list(backend.logs("api")) == ["-- No entries --"]
    backend.start("api")
    wait_for(lambda: port_open(port), what="the guest's sshd")
    everything = list(backend.logs("api"))
    assert any("Started microvm@api.service" in line for line in everything)
    assert backend.log_tail("api", 2) == everything[-2:]
    assert ["journalctl", "-u", "microvm@api", "--no-pager", "-n", "2"] \
        in fakehost.commands("journalctl")
    follow = backend.logs("api", follow=True)
    assert next(follow) == everything[-10:][0]
    stopper = threading.Timer(0.3, lambda: backend.stop("api"))
    stopper.start()
    try:
        assert any("Stopped microvm@api.service" in line for line in follow)
    finally:
        stopper.join()


def test_logs_follow_can_be_closed(vm, fakehost):
    backend, flake, *_ = vm
    backend.create("api", flake)
    backend.start("api")
    follow = backend.logs("api", follow=True, lines=1)
    assert next(follow)
    follow.close()  # terminates journalctl -f; would hang the test otherwise


def test_boot_failure_shows_in_status_and_journal(vm, fakehost, monkeypatch):
    backend, flake, port, *_ = vm
    monkeypatch.setenv("MARINER_FAKE_BOOT_FAIL", "1")
    backend.create("api", flake)
    backend.start("api")
    assert backend.wait_for_unit("api", ["failed"], timeout=10) == "failed"
    status = backend.status("api")
    assert status.booted is None and status.uptime is None
    assert any("Kernel panic" in line for line in backend.log_tail("api", 10))
    assert not port_open(port)


def test_boot_delay_leaves_the_unit_active_before_ssh_answers(vm, fakehost, monkeypatch):
    backend, flake, port, *_ = vm
    monkeypatch.setenv("MARINER_FAKE_BOOT_DELAY", "1")
    backend.create("api", flake)
    backend.start("api")
    assert backend.status("api").running and not port_open(port)
    wait_for(lambda: port_open(port), timeout=10, what="the delayed guest")


def test_stop_during_boot_cancels_the_boot(vm, fakehost, monkeypatch):
    import time

    backend, flake, port, *_ = vm
    monkeypatch.setenv("MARINER_FAKE_BOOT_DELAY", "0.6")
    backend.create("api", flake)
    backend.start("api")
    backend.stop("api")
    time.sleep(1.0)
    assert not port_open(port) and backend.status("api").unit == "inactive"


def test_build_failure_names_the_config_key(vm, fakehost, monkeypatch):
    backend, flake, *_ = vm
    monkeypatch.setenv("MARINER_FAKE_BUILD_FAIL", (
        "error:\n       … while evaluating the option `environment.systemPackages':\n\n"
        "       error: evaluation aborted with the following error message: "
        "'cannot find attribute `ripgrepp''"))
    with pytest.raises(NixBuildError) as info:
        backend.create("api", flake)
    error = info.value
    assert error.config_key == "nix.packages"
    assert str(error) == "building VM api failed: nixpkgs has no package `ripgrepp`"
    assert error.returncode == 1 and "ripgrepp" in error.stderr_tail
    assert "nix.packages" in error.hint
    assert not backend.exists("api")


def test_a_flake_nix_cannot_evaluate_is_a_build_error(vm, fakehost):
    backend, flake, *_ = vm
    vm_nix = flake / "vm.nix"
    vm_nix.write_text(vm_nix.read_text().replace("lib.mkForce 1000", "1001"))
    with pytest.raises(NixBuildError) as info:
        backend.create("api", flake)
    assert info.value.config_key == "vm.uid"
    assert "conflicting definition values" in str(info.value)
