"""The developer mariner acts for (sudo, root, plain user) and the guest ids derived from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mariner_dev.config import load_project
from mariner_dev.developer import Developer, developer

AS_ROOT = os.geteuid() == 0


def other_owned_dir(tmp_path: Path) -> Path:
    """A directory owned by someone other than the current user (uid 1500 when root)."""
    if AS_ROOT:
        directory = tmp_path / "proj"
        directory.mkdir()
        os.chown(directory, 1500, 1600)
        return directory
    return Path("/")  # owned by root, which is not us


@pytest.fixture
def as_root(monkeypatch):
    """mariner running as root: real when the tests run as root, else the effective uid only."""
    if not AS_ROOT:
        monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv("SUDO_UID", raising=False)
    monkeypatch.delenv("SUDO_GID", raising=False)


def test_under_sudo_the_developer_is_the_sudo_user(as_root, monkeypatch, tmp_path):
    monkeypatch.setenv("SUDO_UID", "1234")
    monkeypatch.setenv("SUDO_GID", "2345")
    dev = developer(other_owned_dir(tmp_path))
    assert (dev.uid, dev.gid) == (1234, 2345)
    assert (dev.guest_uid, dev.guest_gid) == (1234, 2345)


def test_as_root_without_sudo_the_developer_owns_the_project(as_root, tmp_path):
    directory = other_owned_dir(tmp_path)
    st = os.stat(directory)
    dev = developer(directory)
    assert dev.uid == st.st_uid
    if AS_ROOT:
        # uid 1500 has no account here: its gid is the directory's group
        assert (dev.uid, dev.gid, dev.name, dev.home) == (1500, 1600, "1500", None)
        assert (dev.guest_uid, dev.guest_gid) == (1500, 1600)


def test_sudo_run_by_root_falls_back_to_the_project_owner(as_root, monkeypatch, tmp_path):
    monkeypatch.setenv("SUDO_UID", "0")
    monkeypatch.setenv("SUDO_GID", "0")
    directory = other_owned_dir(tmp_path)
    assert developer(directory).uid == os.stat(directory).st_uid


@pytest.mark.parametrize("uid, gid", [("", "100"), ("12x", "100"), ("1234", "")])
def test_malformed_sudo_ids_are_ignored(as_root, monkeypatch, tmp_path, uid, gid):
    monkeypatch.setenv("SUDO_UID", uid)
    monkeypatch.setenv("SUDO_GID", gid)
    directory = other_owned_dir(tmp_path)
    assert developer(directory).uid == os.stat(directory).st_uid


def test_a_root_owned_project_gives_the_guest_fallback_ids(as_root, tmp_path):
    directory = tmp_path / "rootproj"
    directory.mkdir()
    if AS_ROOT:
        os.chown(directory, 0, 0)
        dev = developer(directory)
        assert (dev.uid, dev.gid, dev.name) == (0, 0, "root")
    dev = Developer(0, 0, "root", Path("/root"))
    assert (dev.guest_uid, dev.guest_gid) == (1000, 100)


@pytest.mark.parametrize("uid, gid, guest", [
    (999, 999, (1000, 100)),          # system account and group
    (65534, 65534, (1000, 100)),      # nobody / nogroup
    (1000, 100, (1000, 100)),         # NixOS's own default
    (1001, 1001, (1001, 1001)),       # a Debian-style user with a personal group
    (65533, 100, (65533, 100)),
])
def test_guest_ids(uid, gid, guest):
    dev = Developer(uid, gid, "x", None)
    assert (dev.guest_uid, dev.guest_gid) == guest


# The module's own source runs in the child, which may not be able to read this checkout.
_PROBE = (Path(developer.__code__.co_filename).read_text()
          + "\nimport json, sys\nd = developer(sys.argv[1])\nprint(json.dumps([d.uid, d.gid]))\n")
# The test venv's interpreter may live under /root; the system one is readable by anyone.
_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def run_as(uid: int, gid: int, directory: Path, env: dict[str, str]) -> list[int]:
    """developer() in a real process running as uid:gid (needs root to switch)."""
    def drop():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    out = subprocess.run([_PYTHON, "-c", _PROBE, str(directory)], env=env,
                         preexec_fn=drop, capture_output=True, text=True, check=True,
                         cwd="/")
    return json.loads(out.stdout)


def test_a_plain_user_is_the_developer_and_sudo_variables_do_not_change_that(tmp_path):
    directory = other_owned_dir(tmp_path)
    env = dict(os.environ, SUDO_UID="1234", SUDO_GID="2345")
    if AS_ROOT:
        assert run_as(4321, 4322, directory, env) == [4321, 4322]
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SUDO_UID", "1234")
            mp.setenv("SUDO_GID", "2345")
            dev = developer(directory)
        assert (dev.uid, dev.gid) == (os.getuid(), os.getgid())


def write_project(directory: Path, text: str = "", owner: int | None = None) -> Path:
    (directory / "mariner.toml").write_text(text)
    if owner is not None and AS_ROOT:
        # the developer's project is theirs: shares (the project included) must be
        os.chown(directory, owner, owner)
    return directory


def test_the_guest_user_defaults_to_the_developers_ids(as_root, monkeypatch, tmp_path):
    monkeypatch.setenv("SUDO_UID", "1234")
    monkeypatch.setenv("SUDO_GID", "2345")
    cfg = load_project(project_dir=write_project(tmp_path, owner=1234))
    assert (cfg.vm.uid, cfg.vm.gid) == (1234, 2345)


def test_vm_uid_and_gid_override_the_developer(as_root, monkeypatch, tmp_path):
    monkeypatch.setenv("SUDO_UID", "1234")
    monkeypatch.setenv("SUDO_GID", "2345")
    cfg = load_project(project_dir=write_project(tmp_path, "[vm]\nuid = 1500\ngid = 100\n",
                                                 owner=1234))
    assert (cfg.vm.uid, cfg.vm.gid) == (1500, 100)
