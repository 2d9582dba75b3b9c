"""Runner mode needs no root: on the runner backend the lifecycle suite runs mariner as the
project's owner, an unprivileged account (created when the suite runs as root; the developer
running the tests otherwise). This checks that it really did."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def backend(monkeypatch) -> str:
    monkeypatch.setenv("MARINER_BACKEND", "runner")
    return "runner"


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[2]) for line in fh if line.startswith("Uid:"))


def test_mariner_its_agent_and_the_vm_run_as_the_developer(project):
    developer = project.guest_uid if os.geteuid() == 0 else os.getuid()
    assert developer != 0
    project.up_json()
    out = project.mariner("exec", "--", "id", "-u", check=0).stdout
    assert out.strip() == str(project.guest_uid)
    from mariner_dev.host import supervisor

    record = supervisor.read_record(str(project.vm_dir))
    for key in ("pid", "qemu_pid"):        # the supervisor and the (fake) QEMU
        assert _uid_of(record[key]) == developer, key
    owners = {p.lstat().st_uid for p in [project.vm_dir, *project.vm_dir.rglob("*")]}
    assert owners == {developer}
    state = project.status_json()
    assert state["backend"] == "runner" and state["agent"] is True
