"""Loading mariner.toml into the resolved model: defaults, sizes, names, paths, per-user merge."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from mariner_dev.config import (DEFAULT_MARINER_FLAKE, MARINER_REV, NAME_RE, find_config,
                                load_project, parse_size_mib, safe_vm_name)
from mariner_dev.developer import developer
from mariner_dev.errors import ConfigError
from mariner_dev.model import PortForward, ProjectConfig


def project(root: Path, text: str, name: str = "proj") -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mariner.toml").write_text(text)
    return directory


def user_config(text: str) -> Path:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, mib", [
    (8192, 8192), ("8192", 8192), ("8GiB", 8192), ("8G", 8192), ("8GB", 8192), ("8gib", 8192),
    ("512MiB", 512), ("512M", 512), ("1.5GiB", 1536), ("1T", 1024 * 1024), ("1024K", 1),
    (" 2 GiB ", 2048), ("0", 0),
])
def test_sizes(value, mib):
    assert parse_size_mib(value) == mib


@pytest.mark.parametrize("value", ["8 gigs", "1K", "1.3G", "8B", "-1", "", "GiB", "8 G B", True,
                                   "0x10"])
def test_not_sizes(value):
    assert parse_size_mib(value) is None


def test_sizes_in_a_config(tmp_path):
    cfg = load_project(project_dir=project(tmp_path, '[vm]\nmemory = "8G"\n[storage]\n'
                                           'persist = 1024\nnix_store = "1.5GiB"\n'
                                           'docker = "1T"\n'))
    assert cfg.vm.memory_mib == 8192
    assert (cfg.storage.persist_mib, cfg.storage.nix_store_mib,
            cfg.storage.docker_mib) == (1024, 1536, 1024 * 1024)


# -- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, name", [
    ("api", "api"), ("My Project", "my-project"), ("Foo_Bar.baz", "foo-bar-baz"),
    ("--x--", "x"), ("2024 Report", "2024-report"), ("a  -- b", "a-b"), ("___", ""),
    ("проект", "project-dfb992e6"), ("café", "cafe-850f7dc4"), ("cafe", "cafe"),
])
def test_safe_vm_name(raw, name):
    assert safe_vm_name(raw) == name


def test_long_names_are_cut_stably_and_stay_distinct():
    a, b = "x" * 80 + "-alpha", "x" * 80 + "-beta"
    assert safe_vm_name(a) == safe_vm_name(a)
    assert safe_vm_name(a) != safe_vm_name(b)
    for raw in (a, b, "Y" * 200, "a-" * 40):
        name = safe_vm_name(raw)
        assert len(name) <= 63 and NAME_RE.match(name), name


def test_name_defaults_to_the_directory(tmp_path):
    cfg = load_project(project_dir=project(tmp_path, "", name="My Web_App"))
    assert cfg.name == "my-web-app"
    assert cfg.workspace_mount == "/workspaces/my-web-app"


# -- finding the file -------------------------------------------------------------------------

def test_found_from_a_subdirectory(tmp_path, monkeypatch):
    root = project(tmp_path, '[vm]\nname = "found"\n')
    deep = root / "src" / "pkg"
    deep.mkdir(parents=True)
    assert find_config(deep) == root / "mariner.toml"
    monkeypatch.chdir(deep)
    cfg = load_project()
    assert cfg.name == "found" and cfg.project_dir == root
    assert cfg.guest_path(deep) == "/workspaces/found/src/pkg"


def test_missing_file_says_where_it_looked(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert not any((p / "mariner.toml").exists() for p in (tmp_path / "a" / "b").parents)
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path / "a" / "b")
    assert str(tmp_path / "a" / "b") in str(info.value)
    assert "any parent" in str(info.value) and "mariner init" in str(info.value)
    assert info.value.exit_code == 2


def test_a_mariner_toml_that_is_not_a_file_is_named(tmp_path):
    (tmp_path / "a" / "mariner.toml").mkdir(parents=True)
    (tmp_path / "a" / "sub").mkdir()
    for call in (lambda: load_project(tmp_path / "a" / "sub"),
                 lambda: load_project(project_dir=tmp_path / "a")):
        with pytest.raises(ConfigError) as info:
            call()
        assert f"{tmp_path / 'a' / 'mariner.toml'} is a directory" in str(info.value)
        assert info.value.exit_code == 2
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mariner.toml").symlink_to(tmp_path / "gone.toml")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        load_project(project_dir=tmp_path / "b")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_project(project_dir=tmp_path / "missing")


def test_a_user_config_that_is_not_a_file_is_reported(tmp_path):
    user = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
    user.mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        load_project(project_dir=project(tmp_path, ""))
    assert str(user) in str(info.value) and "cannot read" in str(info.value)


# -- defaults and the model -------------------------------------------------------------------

def test_defaults(tmp_path):
    cfg = load_project(project_dir=project(tmp_path, ""))
    assert cfg.vm.cpus == 2 and cfg.vm.memory_mib == 4096
    assert cfg.vm.hypervisor == "qemu" and cfg.vm.user == "vm"
    assert cfg.vm.cid is None
    dev = developer(cfg.project_dir)
    assert (cfg.vm.uid, cfg.vm.gid) == (dev.guest_uid, dev.guest_gid)
    assert cfg.network.mode == "bridge" and cfg.network.ssh_port is None
    assert cfg.network.interface is None
    assert cfg.shares == () and cfg.env == () and cfg.ports == ()
    assert cfg.nix.packages == () and cfg.nix.modules == ()
    assert cfg.nix.mariner == DEFAULT_MARINER_FLAKE and MARINER_REV in DEFAULT_MARINER_FLAKE
    assert cfg.storage.persist_mib == 8192 and cfg.storage.nix_store_mib == 32768
    assert cfg.docker_enable is False
    assert cfg.ssh.identity is None and cfg.ssh.forward_agent is False
    assert cfg.hooks.post_create is None and cfg.hooks.post_start is None
    assert cfg.user_config_file is None


def test_pinned_revision_matches_upstream_inventory():
    import json

    repo = Path(__file__).resolve().parents[2]
    inventory = json.loads((repo.parent / "shared" / "upstream" / "nix-options.json").read_text())
    assert MARINER_REV == inventory["sources"]["nix-mariner"]["rev"]


def test_model_is_immutable(tmp_path):
    cfg = load_project(project_dir=project(tmp_path, ""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vm.cpus = 64  # type: ignore[misc]
    assert isinstance(cfg, ProjectConfig)


def test_values_env_ports_and_tags(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = load_project(project_dir=project(tmp_path, """
[vm]
name = "api"
cid = 9
[network]
mode = "user"
ssh_port = 2201
[env]
ZED = "last"
ALPHA = "first"
[ports]
forward = [8000, "15432:5432"]
[[shares]]
source = "../data"
target = "/data/"
[[shares]]
source = "../data"
target = "/srv/my data"
[[shares]]
source = "../data"
target = "/srv/my-data"
"""))
    assert cfg.env == (("ALPHA", "first"), ("ZED", "last"))
    assert cfg.ports == (PortForward(8000, 8000), PortForward(15432, 5432))
    assert [str(p) for p in cfg.ports] == ["8000", "15432:5432"]
    assert [s.target for s in cfg.shares] == ["/data", "/srv/my data", "/srv/my-data"]
    tags = [s.tag for s in cfg.shares]
    assert tags[0] == "data" and len(set(tags)) == 3
    assert all(len(t) <= 36 and t not in ("workspace", "ro-store") for t in tags)
    data = cfg.to_json()
    assert data["env"] == {"ALPHA": "first", "ZED": "last"}
    assert data["ports"] == [{"host": 8000, "guest": 8000}, {"host": 15432, "guest": 5432}]


# -- paths ------------------------------------------------------------------------------------

def test_paths_are_resolved_to_absolute(tmp_path):
    home = Path.home()
    (home / "datasets").mkdir()
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_test").write_text("private")
    (home / ".ssh" / "id_test.pub").write_text("ssh-ed25519 AAAA test\n")
    root = project(tmp_path, """
[[shares]]
source = "~/datasets"
target = "/data"
[[shares]]
source = "sub/../sub"
target = "/sub"
[[shares]]
source = "../sibling"
target = "/sibling"
[nix]
modules = ["nix/extra.nix", "nix/dirmod"]
[workspace]
mount = "/work//space/../api/"
""")
    (root / "sub").mkdir()
    (tmp_path / "sibling").mkdir()
    (root / "nix" / "dirmod").mkdir(parents=True)
    (root / "nix" / "dirmod" / "default.nix").write_text("{ }")
    (root / "nix" / "extra.nix").write_text("{ }")
    cfg = load_project(project_dir=root)
    assert [s.source for s in cfg.shares] == [home / "datasets", root / "sub", tmp_path / "sibling"]
    assert cfg.nix.modules == (root / "nix" / "extra.nix", root / "nix" / "dirmod")
    assert cfg.workspace_mount == "/work/api"
    assert all(p.is_absolute() for p in [*cfg.nix.modules, *(s.source for s in cfg.shares)])


def test_user_config_paths_resolve_under_home(tmp_path):
    home = Path.home()
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_test").write_text("private")
    (home / ".ssh" / "id_test.pub").write_text("ssh-ed25519 AAAA me\n")
    user_config('[ssh]\nidentity = "~/.ssh/id_test"\n[dotfiles]\n'
                'files = ["~/.gitconfig", ".config/nvim"]\n')
    cfg = load_project(project_dir=project(tmp_path, "[vm]\n"))
    assert cfg.ssh.identity == home / ".ssh" / "id_test"
    assert cfg.dotfiles.files == (home / ".gitconfig", home / ".config" / "nvim")


def test_dotfiles_must_live_under_home(tmp_path):
    user_config('[dotfiles]\nfiles = ["/etc/passwd"]\n')
    with pytest.raises(ConfigError) as info:
        load_project(project_dir=project(tmp_path, "[vm]\n"))
    (problem,) = info.value.problems
    assert problem.key == "dotfiles.files[0]" and (problem.line, problem.column) == (2, 10)
    assert "not under your home directory" in problem.message
    user_config('[dotfiles]\nfiles = ["~"]\n')
    with pytest.raises(ConfigError) as info:
        load_project(project_dir=project(tmp_path, "[vm]\n"))
    (problem,) = info.value.problems
    assert "whole home directory" in problem.message


# -- the per-user config ----------------------------------------------------------------------

def test_user_config_supplies_personal_keys(tmp_path):
    home = Path.home()
    (home / "keys").mkdir()
    (home / "keys" / "me").write_text("private")
    (home / "keys" / "me.pub").write_text("ssh-ed25519 AAAA me\n")
    directory = tmp_path / "proj"
    path = user_config('[vm]\nuid = 1234\ngid = 555\n[ssh]\nidentity = "keys/me"\n'
                       f'forward_agent = ["~/elsewhere", "{directory}"]\n'
                       '[dotfiles]\nfiles = ["~/.gitconfig"]\n')
    cfg = load_project(project_dir=project(tmp_path, '[vm]\ncpus = 3\n'))
    assert cfg.user_config_file == path
    assert (cfg.vm.uid, cfg.vm.gid, cfg.vm.cpus) == (1234, 555, 3)
    assert cfg.ssh.identity == home / "keys" / "me"     # relative to ~ in the per-user file
    assert cfg.ssh.forward_agent is True
    assert cfg.dotfiles.files == (home / ".gitconfig",)


def test_agent_forwarding_is_per_project(tmp_path):
    """forward_agent lists project directories: only those VMs get the agent, never all."""
    api = project(tmp_path / "a", "[vm]\nname = \"api\"\n")
    other = project(tmp_path / "b", "[vm]\nname = \"other\"\n")
    (tmp_path / "link").symlink_to(api)
    user_config(f'[ssh]\nforward_agent = ["{tmp_path}/link"]\n')   # compared by real path
    assert load_project(project_dir=api).ssh.forward_agent is True
    assert load_project(project_dir=other).ssh.forward_agent is False
    user_config("[ssh]\nforward_agent = []\n")
    assert load_project(project_dir=api).ssh.forward_agent is False
    user_config("[ssh]\nforward_agent = true\n")
    with pytest.raises(ConfigError) as info:
        load_project(project_dir=api)
    (problem,) = info.value.problems
    assert problem.key == "ssh.forward_agent" and "every VM" in problem.message


@pytest.mark.parametrize("table", ["dotfiles", "ssh", "host"])
def test_project_file_cannot_set_per_user_tables(tmp_path, table):
    """A cloned mariner.toml (or one the VM rewrote) cannot choose which of the developer's
    files, keys or agent reach the VM: the table is an error naming the per-user file."""
    body = {"dotfiles": 'files = ["~/.ssh/id_ed25519"]\nallow = ["~/.ssh/id_ed25519"]',
            "ssh": 'forward_agent = ["."]', "host": 'backend = "runner"'}[table]
    with pytest.raises(ConfigError) as info:
        load_project(project_dir=project(tmp_path, f"[vm]\ncpus = 2\n[{table}]\n{body}\n"))
    assert info.value.exit_code == 2
    (problem,) = info.value.problems
    assert problem.key == table and (problem.line, problem.column) == (3, 1)
    assert "per-user config" in problem.message
    assert str(Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml") in problem.message


def test_user_config_falls_back_to_dot_config(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME")
    path = Path.home() / ".config" / "mariner" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("[vm]\nuid = 4321\n")
    cfg = load_project(project_dir=project(tmp_path, ""))
    assert cfg.vm.uid == 4321 and cfg.user_config_file == path


def test_errors_from_both_files_are_reported_together(tmp_path):
    path = user_config("[vm]\nuid = 0\n")
    root = project(tmp_path, "[vm]\ncpus = 0\n")
    with pytest.raises(ConfigError) as info:
        load_project(project_dir=root)
    got = {(p.file, p.key, p.line, p.column) for p in info.value.problems}
    assert got == {(str(root / "mariner.toml"), "vm.cpus", 2, 8), (str(path), "vm.uid", 2, 7)}


def test_dotfiles_timeout_in_the_user_config(tmp_path):
    assert load_project(project_dir=project(tmp_path, "")).dotfiles.timeout == 600
    user_config('[dotfiles]\nrepository = "https://example.invalid/d"\ntimeout = 1200\n')
    assert load_project(project_dir=project(tmp_path, "")).dotfiles.timeout == 1200
    for bad, what in (("0", "below the minimum 1"), ('"10m"', "integer"),
                      ("100000", "above the maximum")):
        path = user_config(f'[dotfiles]\ntimeout = {bad}\n')
        with pytest.raises(ConfigError) as info:
            load_project(project_dir=project(tmp_path, ""))
        (problem,) = info.value.problems
        assert problem.file == str(path) and problem.key == "dotfiles.timeout", problem
        assert (problem.line, problem.column) == (2, 11), problem
        assert what in problem.message, problem
