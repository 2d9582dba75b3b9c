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
