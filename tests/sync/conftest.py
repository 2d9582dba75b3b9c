"""The guest for the sync and forward tests: a real OpenSSH sshd on 127.0.0.1 (support.fixtures).

The guest account is shared by every test: each test syncs into a fresh directory of its own
under the guest's home (`guest_root`), removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

from support.fixtures import start_guest, stop_guest
from support.tools import require_tool
from sync_helpers import fresh_root


@pytest.fixture(scope="session")
def guest(tmp_path_factory):
    require_tool("sshd")
    g = start_guest(tmp_path_factory.mktemp("sync-guest"))
    yield g
    stop_guest(g)


@pytest.fixture
def own_guest(tmp_path):
    """A guest of the test's own, for tests that stop and restart it."""
    g = start_guest(tmp_path / "own-guest")
    yield g
    stop_guest(g)


@pytest.fixture
def guest_root(guest):
    """A fresh directory in the guest's home standing for `~` in this test."""
    root = fresh_root(guest)
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Project:
    """A project whose mariner.toml targets a guest, registered as its running user-mode VM."""

    def __init__(self, guest, directory: Path, name: str):
        self.guest = guest
        self.dir = directory
        self.name = name

    def write(self, dotfiles: str = "", extra: str = "") -> "Project":
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "mariner.toml").write_text(textwrap.dedent(f"""\
            [vm]
            name = "{self.name}"
            user = "{self.guest.user}"

            [network]
            mode = "user"
            ssh_port = {self.guest.port}
            """) + "\n" + textwrap.dedent(extra))
        # [dotfiles] and [ssh] are the developer's: the per-user config, never mariner.toml
        user_config = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
        user_config.parent.mkdir(parents=True, exist_ok=True)
        user_config.write_text("[dotfiles]\n" + textwrap.dedent(dotfiles) + "\n")
        from support.fixtures import authorize_mariner_key

        from support.approval import approve_host_settings

        approve_host_settings(self.dir)   # as the developer who wrote it would
        authorize_mariner_key(self.guest, self.load())
        return self

    def load(self):
        from mariner_dev.config import load_project

        return load_project(project_dir=self.dir)

    def register(self):
        """Record the VM as mariner's and pin the guest's host key, as `up` would have."""
        from mariner_dev import paths
        from mariner_dev.remote.trust import pin_host_key
        from mariner_dev.state import Registry, VmRecord

        cfg = self.load()
        record = VmRecord(name=cfg.name, project=str(cfg.project_dir),
                          config_file=str(cfg.config_file), cid=42, network_mode="user",
                          ssh_port=self.guest.port, created=True)
        with Registry().transaction() as vms:
            vms[cfg.name] = record
        pin_host_key(paths.known_hosts_file(), f"mariner-{cfg.name}",
                     self.guest.sshd.host_public_key())
        return cfg, record


@pytest.fixture
def project(guest, tmp_path):
    """`project(dotfiles_toml, extra_toml)` -> a written Project (default guest: `guest`)."""

    def make(dotfiles: str = "", extra: str = "", name: str = "synct", on=None) -> Project:
        return Project(on or guest, tmp_path / "projects" / name, name).write(dotfiles, extra)

    return make


@pytest.fixture(autouse=True)
def agents():
    """Stop the per-VM agents each test started: `mariner sync` starts one on first use, and
    it outlives the mariner process (and would keep trying a guest that is gone)."""
    from support.fixtures import kill_agents

    yield
    kill_agents(Path(os.environ["XDG_RUNTIME_DIR"]))


@pytest.fixture
def home() -> Path:
    """The (isolated) host home the dotfiles live in."""
    return Path(os.environ["HOME"])
