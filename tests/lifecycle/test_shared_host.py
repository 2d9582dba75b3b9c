"""One host, several users; names that are never stuck. On the fake host with a real sshd guest.

Another user's VM is played by a directory in the shared microvm state directory whose `flake`
file points at a flake directory that is not ours, as `microvm -c` run by that user leaves it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def backend(monkeypatch) -> str:
    """Several users of one microvm.nix host share its state directory: the microvm backend
    (runner-mode VMs live in each user's own directory; tests/lifecycle/test_up_vsock_cid.py)."""
    monkeypatch.setenv("MARINER_BACKEND", "microvm")
    return "microvm"



def _microvms() -> Path:
    return Path(os.environ["MARINER_MICROVMS_DIR"])


def _home() -> Path:
    return Path(os.environ["MARINER_HOME"])


def _registry() -> dict:
    return json.loads((_home() / "registry.json").read_text())["vms"]


def _unit_state(name: str) -> str:
    return json.loads((_microvms() / name / ".fake-unit.json").read_text())["state"]


def test_a_stale_record_never_touches_another_users_vm(project):
    project.up_json()
    # Our VM went away on the host and another user created one with the same name: the
    # `flake` file now names their flake directory; our registry still has our record.
    vm = _microvms() / project.name
    theirs = f"path:/home/alice/.local/state/mariner/vms/{project.name}/flake"
    (vm / "flake").write_text(theirs)
    project.clear_log()
    for command, verb in ((["up"], "rebuild or start"), (["down"], "stop")):
        proc = project.mariner(*command, check=2)
        assert "belongs to another user" in proc.stderr and verb in proc.stderr
        assert theirs in proc.stderr
    assert project.changing_calls() == []
    assert _unit_state(project.name) == "active"
    # destroy drops only our own stale record and says whose the VM is
    proc = project.mariner("destroy", "--force", check=0)
    assert "belongs to another user" in proc.stderr and "left alone" in proc.stderr
    assert project.changing_calls() == []
    assert vm.is_dir() and (vm / "flake").read_text() == theirs
    assert _unit_state(project.name) == "active"
    assert project.name not in _registry()
    assert f"Host mariner-{project.name}" not in (_home() / "ssh_config").read_text()
    # and from now on the name is theirs: a new `up` is refused as before
    proc = project.mariner("up", check=2)
    assert "did not create" in proc.stderr and "[vm] name" in proc.stderr


def test_destroy_force_removes_our_records_when_the_host_is_down(project):
    project.up_json()
    vm = _microvms() / project.name
    proc = project.mariner("destroy", "--force", env={"MARINER_FAKE_HOST_DOWN": "1"}, check=1)
    assert "were removed, but not the VM on the host" in proc.stderr
    last, hint = proc.stderr.strip().splitlines()[-2:]   # the host's problem comes last
    assert last.startswith("mariner: error: ") and "Host is down" in last
    assert "mariner doctor" in hint
    assert str(vm) in proc.stderr          # what is left on the host, and where
    assert "Traceback" not in proc.stderr
    assert project.name not in _registry()
    assert not (_home() / "vms" / project.name).exists()
    assert f"mariner-{project.name}" not in (_home() / "known_hosts").read_text()
    assert vm.is_dir()                      # the host was not reachable: nothing done there


def test_destroy_without_force_keeps_the_records_when_the_host_is_down(project):
    from mariner_dev import lifecycle
    from mariner_dev.config import load_project
    from mariner_dev.errors import HostError

    project.up_json()
    os.environ["MARINER_FAKE_HOST_DOWN"] = "1"
    try:
        lifecycle.destroy(load_project(project_dir=project.dir))
    except HostError as exc:
        assert "--force" in (exc.hint or "")
    else:
        raise AssertionError("destroy succeeded with the host down")
    finally:
        del os.environ["MARINER_FAKE_HOST_DOWN"]
    assert project.name in _registry()


def test_destroy_by_name_from_anywhere_after_the_project_is_gone(project, tmp_path):
    project.up_json()
    shutil.rmtree(project.dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(project.argv("destroy", "--name",
                           project.name, "--force"), cwd=elsewhere, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"VM {project.name} destroyed" in proc.stderr
    assert not (_microvms() / project.name).exists()
    assert project.name not in _registry()
    # a name that is not ours is not destroyed by name either
    (_microvms() / "handmade").mkdir()
    proc = subprocess.run(project.argv("destroy", "--name",
                           "handmade", "--force"), cwd=elsewhere, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "did not create" in proc.stderr
    assert (_microvms() / "handmade").is_dir()
    proc = subprocess.run(project.argv("destroy", "--name", "../x",
                           "--force"), cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_claim_whose_project_and_vm_are_gone_is_released(project):
    project.up_json()
    project.mariner("down", check=0)
    # the VM was removed on the host behind mariner's back, and the project deleted
    shutil.rmtree(_microvms() / project.name)
    shutil.rmtree(project.dir)
    # a second project with the same directory name (so the same VM name) takes the name
    second = dataclasses.replace(project, dir=project.dir.parent / "again" / "api")
    second.dir.mkdir(parents=True)
    os.chmod(second.dir.parent, 0o755)
    os.chown(second.dir, project.guest_uid, -1)
    second.write()
    result = second.up_json()   # a new VM with a new host key: the old pin was dropped
    assert result["created"] and result["state"] == "running"
    assert _registry()[project.name]["project"] == str(second.dir)


def test_a_claim_whose_project_is_gone_but_whose_vm_exists_is_kept(project):
    project.up_json()
    moved = project.dir.with_name("moved")
    project.dir.rename(moved)
    # not the same project: a new directory at another path with the same name
    second = dataclasses.replace(project, dir=project.dir.parent / "other" / "api")
    second.dir.mkdir(parents=True)
    second.write()
    proc = second.mariner("up", check=2)
    assert "belongs to the project" in proc.stderr and "destroy --name" in proc.stderr
    assert _registry()[project.name]["project"] == str(project.dir)


def test_a_start_whose_cid_another_running_vm_holds_moves_to_another_cid(project):
    first = project.up_json()
    cid = project.status_json()["cid"]
    project.mariner("down", check=0)
    # Another user's VM runs with our cid (it booted a build with our cid; its current build,
    # which allocation reads, has another one: rebuilt since, not restarted).
    intruder = _microvms() / "intruder"
    for build, value in (("old", cid), ("new", 254)):
        (intruder / build / "share" / "microvm").mkdir(parents=True)
        (intruder / build / "share" / "microvm" / "vsock-cid").write_text(f"{value}\n")
    (intruder / "flake").write_text("path:/home/alice/flake")
    (intruder / "current").symlink_to(intruder / "new")
    (intruder / "booted").symlink_to(intruder / "old")
    (intruder / ".fake-unit.json").write_text(json.dumps({"state": "active",
                                                          "substate": "running"}))
    assert first["created"]
    proc = project.mariner("up", check=0)
    assert f"vsock cid {cid} was taken by VM 'intruder' on this host" in proc.stderr
    new_cid = project.status_json()["cid"]
    assert new_cid not in (cid, 254)
    journal = (_microvms() / project.name / ".fake-journal").read_text()
    assert "unable to set guest cid: Address already in use" in journal   # it did fail first
    assert project.status_json()["state"] == "running"
    vm = _microvms() / project.name
    assert (vm / "current" / "share" / "microvm" / "vsock-cid").read_text().strip() \
        == str(new_cid)
    assert _registry()[project.name]["cid"] == new_cid
