"""The runner backend's render, evaluated through the real nix-mariner and microvm.nix modules
(tests/support/upstream.py): the host's /nix/store share is read-only and there is only one
(a second `ro-store` entry would fail microvm.nix's duplicate-tag assertion), virtiofsd's
sockets get no group, and vsock is off where /dev/vhost-vsock is not usable, with nix-mariner's
own values kept on the microvm backend for contrast."""

from __future__ import annotations

import pytest

from mariner_dev.host import choice
from support.fakehost import render_vm, write_project
from support.upstream import evaluate, upstream_src

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1u7sBfK8zQ1kY9Vn1tYf6m7hW3o9QJ1xk0a8b2c3d4 t"


@pytest.fixture
def flakes(tmp_path, monkeypatch):
    """The same project rendered for each backend (and runner mode with vsock), evaluated."""
    upstream_src()
    write_project(tmp_path / "proj", "rr", ssh_port=2301)
    out = {}
    for name, backend, vsock in (("microvm", "microvm", True), ("runner", "runner", False),
                                 ("runner-vsock", "runner", True)):
        monkeypatch.setenv("MARINER_BACKEND", backend)
        monkeypatch.setattr(choice, "vhost_vsock_usable", lambda vsock=vsock: vsock)
        out[name] = render_vm(tmp_path / "proj", tmp_path / f"flake-{name}", cid=9,
                              ssh_port=2301, public_key=KEY)
    return evaluate(out)


def _store(e: dict) -> list[dict]:
    return [s for s in e["shares"] if s["tag"] == "ro-store"]


def test_runner_mode_shares_the_store_read_only_once(flakes):
    e = flakes["runner"]
    assert e["failedAssertions"] == []
    assert _store(e) == [{"tag": "ro-store", "source": "/nix/store",
                          "mountPoint": "/nix/.ro-store", "proto": "9p", "readOnly": True,
                          "socket": None}]
    assert [s["tag"] for s in e["shares"]] == ["ro-store", "workspace"]
    # nix-mariner's own entry, writable, on the host module's backend
    assert [s["readOnly"] for s in _store(flakes["microvm"])] == [False]


def test_runner_mode_virtiofsd_sockets_have_no_group(flakes):
    runner = flakes["runner"]["virtiofsd"]["workspace"]
    assert not [arg for arg in runner if arg.startswith("--socket-group")]
    assert "--socket-group=kvm" in flakes["microvm"]["virtiofsd"]["workspace"]


def test_runner_mode_vsock_only_where_vhost_vsock_is_usable(flakes):
    assert flakes["runner"]["cid"] is None
    assert flakes["runner-vsock"]["cid"] == 9 and flakes["microvm"]["cid"] == 9
    assert flakes["runner-vsock"]["failedAssertions"] == []
