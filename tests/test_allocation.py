"""Reserving names, cids and SSH ports: unique on the host, stable for a VM, owned by a project."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from mariner_dev.allocation import SSH_PORT_RANGE, reserve
from mariner_dev.config import load_project
from mariner_dev.errors import MarinerError, OwnershipError
from mariner_dev.state import Registry


def make(tmp_path: Path, dirname: str, body: str = "") -> Path:
    project = tmp_path / dirname
    project.mkdir(parents=True)
    (project / "mariner.toml").write_text(body)
    return project


def cfg_of(project: Path):
    return load_project(project_dir=project)


def test_cids_are_unique_and_stable(tmp_path):
    a = reserve(cfg_of(make(tmp_path, "a")))
    b = reserve(cfg_of(make(tmp_path, "b")))
    assert a.cid != b.cid and {a.cid, b.cid} <= set(range(3, 255))
    assert reserve(cfg_of(tmp_path / "a")).cid == a.cid  # stable on the next up
    assert Registry().get("a").project == str(tmp_path / "a")


def test_explicit_cid_clash_names_the_other_vm(tmp_path):
    a = reserve(cfg_of(make(tmp_path, "a", "[vm]\ncid = 9\n")))
    assert a.cid == 9
    with pytest.raises(MarinerError) as err:
        reserve(cfg_of(make(tmp_path, "b", "[vm]\ncid = 9\n")))
    assert err.value.exit_code == 2
    assert "vm.cid" in str(err.value) and "'a'" in str(err.value)
    assert Registry().get("b") is None


def test_cid_of_another_users_vm_in_the_microvm_dir_is_avoided(tmp_path):
    # Another user's mariner VM: its flake (outside our registry) records cid 3 and a port.
    other_flake = tmp_path / "other-flake"
    other_flake.mkdir()
    (other_flake / "mariner.json").write_text(json.dumps({"cid": 3, "ssh_port": 22999}))
    vm = Path(os.environ["MARINER_MICROVMS_DIR"]) / "theirs"
    vm.mkdir()
    (vm / "flake").write_text(f"path:{other_flake}\n")
    record = reserve(cfg_of(make(tmp_path, "mine", '[network]\nmode = "user"\n')))
    assert record.cid != 3
    assert record.ssh_port != 22999 and record.ssh_port in SSH_PORT_RANGE


def test_user_mode_port_is_free_unique_and_stable(tmp_path):
    a = reserve(cfg_of(make(tmp_path, "a", '[network]\nmode = "user"\n')))
    b = reserve(cfg_of(make(tmp_path, "b", '[network]\nmode = "user"\n')))
    assert a.ssh_port != b.ssh_port
    assert reserve(cfg_of(tmp_path / "a")).ssh_port == a.ssh_port
    bridge = reserve(cfg_of(make(tmp_path, "c")))
    assert bridge.ssh_port is None


def test_a_port_in_use_is_not_allocated(tmp_path, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", SSH_PORT_RANGE[0]))
    busy.listen()
    try:
        monkeypatch.setattr("mariner_dev.allocation.SSH_PORT_RANGE",
                            range(SSH_PORT_RANGE[0], SSH_PORT_RANGE[0] + 2))
        record = reserve(cfg_of(make(tmp_path, "a", '[network]\nmode = "user"\n')))
        assert record.ssh_port == SSH_PORT_RANGE[0] + 1
    finally:
        busy.close()


def test_explicit_ssh_port_clash(tmp_path):
    reserve(cfg_of(make(tmp_path, "a", '[network]\nmode = "user"\nssh_port = 22400\n')))
    with pytest.raises(MarinerError) as err:
        reserve(cfg_of(make(tmp_path, "b", '[network]\nmode = "user"\nssh_port = 22400\n')))
    assert "network.ssh_port" in str(err.value)


def test_a_name_belongs_to_one_project(tmp_path):
    reserve(cfg_of(make(tmp_path, "one/api")))
    before = Registry().file.read_text()
    with pytest.raises(OwnershipError) as err:
        reserve(cfg_of(make(tmp_path, "two/api")))
    assert err.value.exit_code == 2 and "[vm] name" in str(err.value)
    assert Registry().file.read_text() == before


def test_a_vm_mariner_did_not_create_is_refused(tmp_path):
    (Path(os.environ["MARINER_MICROVMS_DIR"]) / "api").mkdir()
    with pytest.raises(OwnershipError) as err:
        reserve(cfg_of(make(tmp_path, "api")))
    assert "did not create" in str(err.value)
    assert not Registry().file.exists()


def _their_vm(name: str, cid: int, link: str = "current") -> Path:
    """Another user's VM as the host shows it: a runner recording its vsock cid, and a flake
    file pointing into a MARINER_HOME we cannot read."""
    vm = Path(os.environ["MARINER_MICROVMS_DIR"]) / name
    runner = vm / ".runner"
    (runner / "share" / "microvm").mkdir(parents=True)
    (runner / "share" / "microvm" / "vsock-cid").write_text(f"{cid}\n")
    (vm / link).symlink_to(runner)
    (vm / "flake").write_text(f"path:/home/alice/.local/state/mariner/vms/{name}/flake")
    return vm


def test_cids_the_host_runners_record_are_avoided(tmp_path):
    for index, cid in enumerate(range(3, 8)):
        _their_vm(f"theirs{index}", cid)
    record = reserve(cfg_of(make(tmp_path, "mine")))
    assert record.cid == 8
    # an explicit cid that another user's VM holds names it
    with pytest.raises(MarinerError) as err:
        reserve(cfg_of(make(tmp_path, "pinned", "[vm]\ncid = 5\n")))
    assert err.value.exit_code == 2 and "'theirs2'" in str(err.value)


def test_the_host_lock_is_an_flock_on_the_state_directory(tmp_path, monkeypatch):
    import subprocess
    import sys

    from mariner_dev import allocation

    microvms = Path(os.environ["MARINER_MICROVMS_DIR"])
    microvms.chmod(0o555)   # read-only is enough: no lock file is ever created
    old_lock = Path("/tmp/.mariner-allocate.lock")   # where older versions fell back to
    before = sorted(os.listdir(microvms)), old_lock.exists() and old_lock.stat().st_mtime_ns
    record = reserve(cfg_of(make(tmp_path, "a")))
    assert record.cid == 3
    assert sorted(os.listdir(microvms)) == before[0]
    assert (old_lock.exists() and old_lock.stat().st_mtime_ns) == before[1]
    # another user's mariner holds it: the wait is bounded and says what it waits for
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(microvms)!r}, os.O_RDONLY)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(allocation, "HOST_LOCK_TIMEOUT", 0.5)
        with pytest.raises(MarinerError) as err:
            reserve(cfg_of(make(tmp_path, "b")))
        assert "held the host's cid allocation lock" in str(err.value)
        assert str(microvms) in str(err.value)
        assert Registry().get("b") is None
    finally:
        holder.kill()
        holder.wait()
    assert reserve(cfg_of(tmp_path / "b")).cid == 4


def test_an_unusable_state_directory_is_one_clear_line(tmp_path, monkeypatch, run_cli):
    not_a_dir = tmp_path / "microvms-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("MARINER_MICROVMS_DIR", str(not_a_dir))
    project = make(tmp_path, "a")
    code, out, err = run_cli("render", cwd=project)
    assert code == 1 and out == "" and "Traceback" not in err
    assert f"cannot open the microvm state directory {not_a_dir}" in err
    assert Registry().get("a") is None


def test_a_claim_whose_project_and_vm_are_gone_is_released(tmp_path):
    import shutil

    first = reserve(cfg_of(make(tmp_path, "one/api")))
    shutil.rmtree(tmp_path / "one")
    second = reserve(cfg_of(make(tmp_path, "two/api")))
    assert second.project == str(tmp_path / "two" / "api") and second.cid == first.cid
    # but not while the VM still exists on the host
    shutil.rmtree(tmp_path / "two")
    (Path(os.environ["MARINER_MICROVMS_DIR"]) / "api").mkdir()
    with pytest.raises(OwnershipError):
        reserve(cfg_of(make(tmp_path, "three/api")))


def test_an_unusable_lock_path_is_one_clear_line(tmp_path, run_cli):
    project = make(tmp_path, "a")
    home = Path(os.environ["MARINER_HOME"])
    home.mkdir(parents=True)
    (home / "locks").write_text("not a directory")
    code, out, err = run_cli("down", cwd=project)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"mariner: error: cannot use {home / 'locks' / 'a.lock'} to lock VM 'a': File exists"]
