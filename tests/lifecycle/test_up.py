"""`mariner up/down/destroy/status/list/logs` on the fake host, with a real sshd as the guest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.jsondoc import document



def test_first_up_creates_boots_and_pins(project):
    result = project.up_json()
    assert result["outcome"] == "success"
    assert result["name"] == project.name
    assert result["created"] and result["started"] and not result["updated"]
    assert result["state"] == "running"
    assert result["address"] == "127.0.0.1" and isinstance(result["ssh_port"], int)
    assert result["user"] == "mariner-guest"
    assert result["workspace"] == f"{project.guest_root}/workspaces/{project.name}"

    calls = project.changing_calls()
    flake_dir = Path(os.environ["MARINER_HOME"]) / "vms" / project.name / "flake"
    if project.backend == "microvm":
        assert ["microvm", "-c", project.name, "-f", f"path:{flake_dir}"] in calls
        assert ["systemctl", "start", f"microvm@{project.name}"] in calls
    else:
        assert ["nix", "--extra-experimental-features", "nix-command flakes", "build", "-o",
                str(project.vm_dir / "current"), f"path:{flake_dir}#nixosConfigurations."
                f"{project.name}.config.microvm.declaredRunner"] in calls
        assert ["microvm-run"] in calls

    # The guest's host key is pinned under the VM's alias, and an ssh-config entry exists.
    known = (Path(os.environ["MARINER_HOME"]) / "known_hosts").read_text()
    assert f"mariner-{project.name} " in known
    ssh_config = (Path(os.environ["MARINER_HOME"]) / "ssh_config").read_text()
    assert f"Host mariner-{project.name}" in ssh_config

    status = project.status_json()
    assert status["state"] == "running" and not status["outdated"]
    assert status["cid"] is not None and 3 <= status["cid"] <= 254
    # no vsock on this host: the first pin was taken over TCP, and status says so
    assert status["host_key_pinned_over"] == "tcp"
    assert "pinned over TCP" in project.mariner("status", check=0).stdout


def test_up_pins_a_running_vm_that_has_no_pin(project):
    """An `up` interrupted between start and first contact leaves a running VM unpinned: the
    next `up` takes the pin (over vsock where it can) instead of leaving exec refused."""
    project.up_json()
    known_hosts = Path(os.environ["MARINER_HOME"]) / "known_hosts"
    known_hosts.unlink()
    project.clear_log()
    result = project.up_json()
    assert not (result["created"] or result["started"]) and project.changing_calls() == []
    assert f"mariner-{project.name} " in known_hosts.read_text()
    assert project.mariner("exec", "--", "true", env={"MARINER_AGENT": "off"}).returncode == 0


def test_second_up_changes_nothing(project):
    project.up_json()
    project.clear_log()
    result = project.up_json()
    assert not (result["created"] or result["updated"] or result["started"])
    assert result["state"] == "running"
    assert project.changing_calls() == []


def test_drift_rebuilds_and_restarts(project):
    project.up_json()
    project.write(cpus=3)
    status = project.status_json()
    assert status["outdated"] is True
    assert "vm.cpus" in status["changed_keys"]
    project.clear_log()
    result = project.up_json()
    assert result["updated"] and result["started"] and not result["created"]
    calls = project.changing_calls()
    assert any(project.is_build(c, create=False) for c in calls)
    assert any(project.is_stop(c) for c in calls) and any(project.is_start(c) for c in calls)
    status = project.status_json()
    assert status["outdated"] is False and status["state"] == "running"


def test_no_restart_defers_and_status_says_so(project):
    project.up_json()
    project.write(cpus=3)
    project.clear_log()
    result = project.up_json("--no-restart")
    assert result["updated"] and not result["started"]
    assert result["restart_pending"] is True
    assert not any(project.is_start(c) or project.is_stop(c) for c in project.changing_calls())
    status = project.status_json()
    assert status["restart_pending"] is True and status["outdated"] is False


def test_up_after_no_restart_applies_the_pending_restart(project):
    project.up_json()
    project.write(cpus=3)
    assert project.up_json("--no-restart")["restart_pending"] is True
    project.clear_log()
    result = project.up_json()
    assert result["started"] and not result["updated"] and result["restart_pending"] is False
    assert any(project.is_start(c) for c in project.changing_calls())
    assert any(project.is_stop(c) for c in project.changing_calls())
    status = project.status_json()
    assert status["restart_pending"] is False and status["state"] == "running"


def test_down_then_up_again(project):
    project.up_json()
    proc = project.mariner("down", check=0)
    assert "stopped" in proc.stderr
    assert project.status_json()["state"] == "stopped"
    text = project.mariner("status", check=0).stdout
    assert "state:    stopped" in text and "next:     `mariner up` starts it" in text
    # exec and shell name the state rather than a connection error, and the next step.
    for command in (["exec", "--", "true"], ["shell", "--", "true"]):
        err = project.mariner(*command, check=125).stderr
        assert err.splitlines() == [f"mariner: error: VM {project.name} is stopped",
                                    "  hint: `mariner up` starts it"], err
    project.clear_log()
    result = project.up_json()
    assert result["started"] and not result["created"]
    assert any(project.is_start(c) for c in project.changing_calls())
    assert not any(project.is_build(c) for c in project.changing_calls())


def test_destroy_removes_everything(project):
    project.up_json()
    home = Path(os.environ["MARINER_HOME"])
    vm_dir = project.vm_dir
    assert vm_dir.exists()
    proc = project.mariner("destroy", check=2)  # no terminal, no --force: refuses
    assert "--force" in proc.stderr
    assert vm_dir.exists()
    project.mariner("destroy", "--force", check=0)
    assert not vm_dir.exists()
    assert project.status_json()["state"] == "absent"
    registry = json.loads((home / "registry.json").read_text())
    assert project.name not in registry["vms"]
    assert f"mariner-{project.name}" not in (home / "known_hosts").read_text()
    assert f"Host mariner-{project.name}" not in (home / "ssh_config").read_text()
    assert not (home / "vms" / project.name).exists()


def test_list_shows_mariner_and_foreign_vms(project):
    project.up_json()
    foreign = project.host_vms_dir / "handmade"
    foreign.mkdir()
    proc = project.mariner("list", "--json", check=0)
    vms = {vm["name"]: vm for vm in document("list", proc.stdout, 0)["vms"]}
    assert vms[project.name]["project"] == str(project.dir)
    assert vms[project.name]["state"] == "running" and vms[project.name]["managed"]
    assert vms["handmade"]["managed"] is False and vms["handmade"]["project"] is None


def test_logs_show_the_journal(project):
    project.up_json()
    proc = project.mariner("logs", "-n", "5", check=0)
    lines = proc.stdout.splitlines()
    assert 0 < len(lines) <= 5


def test_post_create_runs_once_and_post_start_every_start(project):
    marker = project.dir / "hooks.log"
    project.write(extra=f'[hooks]\npost_create = "echo create >> {marker}"\n'
                        f'post_start = "echo start-$PWD >> {marker}"\n')
    project.up_json()
    workspace = f"{project.guest_root}/workspaces/{project.name}"
    assert marker.read_text().splitlines() == ["create", f"start-{workspace}"]
    project.up_json()  # no-op: no hook runs
    assert marker.read_text().splitlines() == ["create", f"start-{workspace}"]
    project.mariner("down", check=0)
    project.up_json()
    assert marker.read_text().splitlines() == ["create", f"start-{workspace}", f"start-{workspace}"]


def test_failing_hook_exits_1_and_runs_again_next_time(project):
    project.write(extra='[hooks]\npost_create = "echo hook-output; exit 3"\n')
    result = project.up_json(check=1)
    assert result["outcome"] == "error" and result["hook_exit"] == 3
    assert "post_create" in result["message"]
    assert project.status_json()["state"] == "running"
    proc = project.mariner("up", check=1)
    assert "hook-output" in proc.stderr
    assert "post_create" in proc.stderr and "3" in proc.stderr
    project.write(extra='[hooks]\npost_create = "true"\n')
    project.up_json(check=0)
    project.write(extra='[hooks]\npost_create = "exit 9"\n')  # already done: not run again
    project.up_json(check=0)


def test_failing_post_start_runs_again_on_the_next_up(project):
    marker = project.dir / "hooks.log"
    project.write(extra=f'[hooks]\npost_start = "echo start >> {marker}; exit 4"\n')
    result = project.up_json(check=1)
    assert result["hook"] == "post_start" and result["hook_exit"] == 4
    project.write(extra=f'[hooks]\npost_start = "echo start >> {marker}"\n')
    project.up_json(check=0)  # the VM is running, but its post_start never succeeded
    assert marker.read_text().splitlines() == ["start", "start"]
    project.up_json(check=0)  # now it did: a no-op up runs no hook
    assert marker.read_text().splitlines() == ["start", "start"]


def test_ctrl_c_while_waiting_for_ssh_then_up_runs_post_start(project):
    marker = project.dir / "hooks.log"
    project.write(extra=f'[hooks]\npost_start = "echo start >> {marker}"\n')
    env = dict(os.environ, MARINER_FAKE_BOOT_DELAY="2")
    proc = subprocess.Popen(project.argv("up"), cwd=project.dir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(project.is_start(c) for c in project.host_calls()):
        assert proc.poll() is None, ("`up` ended before the start", proc.communicate())
        assert time.monotonic() < deadline, "no start within 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert not marker.exists()
    project.up_json()  # the guest has booted meanwhile or boots now: the hook runs once
    assert marker.read_text().splitlines() == ["start"]


def test_boot_timeout_shows_journal(project):
    proc = project.mariner("up", "--timeout", "3", env={"MARINER_FAKE_BOOT_DELAY": "60"}, check=1)
    assert "did not answer SSH" in proc.stderr
    assert "within 3 s" in proc.stderr


def test_vm_dying_while_booting(project):
    proc = project.mariner("up", "--timeout", "30", env={"MARINER_FAKE_BOOT_FAIL": "1"}, check=1)
    assert "stopped while booting" in proc.stderr
    assert project.status_json()["state"] == "failed"


def test_build_failure_names_the_key(project):
    project.write(extra='[nix]\npackages = ["nosuchpkg"]\n')
    error = ("error: attribute 'nosuchpkg' missing\n\n"
             "       at /nix/store/xxx-source/vm.nix:20:3:\n"
             "       while evaluating the option `environment.systemPackages':\n")
    proc = project.mariner("up", env={"MARINER_FAKE_BUILD_FAIL": error}, check=1)
    assert "nosuchpkg" in proc.stderr
    assert "nix.packages" in proc.stderr
    assert len(proc.stderr.splitlines()) < 15
    assert project.status_json()["state"] == "absent"
    project.write()
    assert project.up_json()["created"] is True


def test_other_project_cannot_take_the_name(project):
    project.up_json()
    other = project.dir.parent / "other"
    other.mkdir()
    (other / "mariner.toml").write_text(project.config.read_text())
    before = (Path(os.environ["MARINER_HOME"]) / "registry.json").read_text()
    for command in (["up"], ["down"], ["destroy", "-f"], ["status"]):
        proc = subprocess.run(project.argv(*command), cwd=other,
                              capture_output=True, text=True)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "[vm] name" in proc.stderr and "Traceback" not in proc.stderr
    assert (Path(os.environ["MARINER_HOME"]) / "registry.json").read_text() == before
    assert project.status_json()["state"] == "running"


def test_refuses_a_vm_it_did_not_create(project):
    project.vm_dir.mkdir(parents=True)
    proc = project.mariner("up", check=2)
    assert "did not create" in proc.stderr
    assert project.changing_calls() == []


def test_two_concurrent_ups_create_once(project):
    env = dict(os.environ, MARINER_FAKE_BUILD_DELAY="2")
    cmd = project.argv("up", "--json")
    first = subprocess.Popen(cmd, cwd=project.dir, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.Popen(cmd, cwd=project.dir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    creates = [c for c in project.host_calls() if project.is_build(c, create=True)]
    assert len(creates) == 1
    assert json.loads(out1)["created"] is True
    assert json.loads(out2)["created"] is False


def test_fail_if_locked(project):
    env = dict(os.environ, MARINER_FAKE_BUILD_DELAY="3")
    first = subprocess.Popen(project.argv("up"), cwd=project.dir,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        lock = Path(os.environ["MARINER_HOME"]) / "locks" / f"{project.name}.lock"
        from mariner_dev.fsutil import lock_is_held

        while not lock_is_held(lock):
            assert time.monotonic() < deadline, "first up never took the lock"
            time.sleep(0.05)
        proc = project.mariner("up", "--fail-if-locked", check=1)
        assert "another mariner command" in proc.stderr
        proc = project.mariner("destroy", "--force", check=1)
        assert "another mariner command" in proc.stderr
    finally:
        first.communicate(timeout=120)
    assert first.returncode == 0


def test_ctrl_c_during_build_then_up_completes(project):
    env = dict(os.environ, MARINER_FAKE_BUILD_DELAY="3")
    proc = subprocess.Popen(project.argv("up"), cwd=project.dir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while not any(project.is_build(c, create=True) for c in project.host_calls()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    registry = json.loads((Path(os.environ["MARINER_HOME"]) / "registry.json").read_text())
    assert project.name in registry["vms"]
    result = project.up_json()
    assert result["state"] == "running"
    assert project.status_json()["state"] == "running"


def test_corrupt_registry_is_a_clear_error(project):
    project.up_json()
    registry = Path(os.environ["MARINER_HOME"]) / "registry.json"
    registry.write_text("{ not json")
    proc = project.mariner("status", check=1)
    assert "registry" in proc.stderr and "corrupt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_up_syncs_dotfiles_on_first_boot_and_when_they_change(project):
    import pwd
    import uuid

    guest_home = Path(pwd.getpwnam("mariner-guest").pw_dir)
    name = f".mariner-lifecycle-{uuid.uuid4().hex[:8]}"
    secret = f"{name}.pem"
    home = Path(os.environ["HOME"])
    (home / name).write_text("[user]\n  name = dev\n")
    (home / secret).write_text("-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
    try:
        project.user_config(f'[dotfiles]\nfiles = ["~/{name}", "~/{secret}"]\n')
        proc = project.mariner("up", check=0)
        assert (guest_home / name).read_text() == "[user]\n  name = dev\n"
        assert not (guest_home / secret).exists()
        assert secret in proc.stderr and "allow" in proc.stderr  # the refusal is shown
        (guest_home / name).unlink()
        project.up_json()  # nothing changed: no sync, the guest-side deletion stays
        assert not (guest_home / name).exists()
        project.user_config(f'[dotfiles]\nfiles = ["~/{name}"]\n')
        project.up_json()  # [dotfiles] changed: synced again, the file restored
        assert (guest_home / name).exists()
    finally:
        for leftover in (name, secret):
            (guest_home / leftover).unlink(missing_ok=True)


def test_a_noop_up_applies_a_changed_forward_list(project):
    from support.guest_sshd import free_port

    first, second = free_port(), free_port()
    project.write(extra=f"[ports]\nforward = [{first}]\n")
    project.up_json()
    assert [(f["forward"], f["state"]) for f in project.status_json()["forwards"]] == \
        [(str(first), "listening")]
    project.write(extra=f"[ports]\nforward = [{second}]\n")
    project.clear_log()
    result = project.up_json()
    assert not (result["created"] or result["updated"] or result["started"])
    assert project.changing_calls() == []  # no rebuild, no restart: only the agent changes
    status = project.status_json()
    assert [(f["forward"], f["state"]) for f in status["forwards"]] == [(str(second), "listening")]
    assert not status.get("notes")


def test_a_vm_that_still_exists_keeps_its_name_when_its_project_is_gone(project):
    """Only a claim with neither its project nor its VM left is released: a project that merely
    names an existing VM (a cloned repository's mariner.toml) must not take it over, disk and
    all, on either backend."""
    from support.approval import approve_host_settings

    project.up_json()
    config = project.config.read_text()
    project.mariner("down", check=0)
    shutil.rmtree(project.dir)
    other = project.dir.parent / "other"
    other.mkdir()
    (other / "mariner.toml").write_text(config)
    approve_host_settings(other)
    proc = subprocess.run(project.argv("up"), cwd=other, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"VM {project.name!r} belongs to the project {project.dir}" in proc.stderr
    assert project.vm_dir.is_dir()
