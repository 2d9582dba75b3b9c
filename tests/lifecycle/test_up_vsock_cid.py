"""What only the runner backend does in `up`: a vsock cid that another user's VM holds (which
mariner cannot see in its own registry) is replaced by another, and the VM rebuilt with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def backend(monkeypatch) -> str:
    monkeypatch.setenv("MARINER_BACKEND", "runner")
    return "runner"


@pytest.fixture
def vhost_vsock(project, monkeypatch) -> Path:
    """A usable /dev/vhost-vsock for the fake QEMU (where the developer's account can open
    it), and the host's table of cids in use."""
    device = project.dir.parent / "vhost-vsock"
    device.write_text("")
    monkeypatch.setenv("MARINER_VHOST_VSOCK", str(device))
    return Path(os.environ["MARINER_FAKE_VSOCK_DIR"])


def test_a_vsock_cid_held_by_another_vm_is_replaced(project, vhost_vsock):
    (vhost_vsock / "3").write_text(str(os.getpid()))  # another user's VM runs with cid 3
    result = project.up_json()
    assert result["state"] == "running" and result["created"]
    status = project.status_json()
    assert status["cid"] not in (None, 3) and status["state"] == "running"
    assert not status["outdated"]
    vm_nix = (Path(os.environ["MARINER_HOME"]) / "vms" / project.name / "flake" / "vm.nix")
    assert f"mariner.cid = {status['cid']};" in vm_nix.read_text()
    assert "microvm.vsock.cid" not in vm_nix.read_text()  # vsock on: nix-mariner's cid is used
    assert (vhost_vsock / str(status["cid"])).exists()
    logs = project.mariner("logs", check=0).stdout
    assert "unable to set guest cid: Address already in use" in logs
    builds = [c for c in project.changing_calls() if project.is_build(c)]
    assert len(builds) == 2  # the first build, and the one with the new cid
    project.clear_log()
    assert not project.up_json()["updated"]  # the new cid stays: nothing to rebuild
    assert project.changing_calls() == []


def test_an_explicit_cid_held_by_another_vm_is_an_error(project, vhost_vsock):
    (vhost_vsock / "5").write_text(str(os.getpid()))
    project.write(cid=5)
    proc = project.mariner("up", check=1)
    assert "vsock cid 5" in proc.stderr and "[vm] cid" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) < 6
