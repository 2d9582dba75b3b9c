"""Shares are an allowlist (issue 9): every directory a VM must not be handed is refused by
`validate` with exit 2, on its real path, and the project directory is held to the same rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mariner_dev.config import load_project
from mariner_dev.errors import ConfigError
from mariner_dev.share_policy import SYSTEM_TREES, refusal


def _project(root: Path, shares: list[str], extra: str = "") -> Path:
    directory = root / "proj"
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(f'[[shares]]\nsource = "{s}"\ntarget = "/s{i}"\n' for i, s in enumerate(shares))
    (directory / "mariner.toml").write_text(text + extra)
    return directory


def _refused(run_cli, project: Path) -> list[dict]:
    code, out, err = run_cli("validate", "--json", cwd=project)
    assert code == 2, (out, err)
    code2, _, err2 = run_cli("validate", cwd=project)
    assert code2 == 2 and "Traceback" not in err2
    return json.loads(out)["errors"]


@pytest.mark.parametrize("tree", [t for t in ("/", *SYSTEM_TREES) if os.path.isdir(t)])
def test_system_trees_are_refused(run_cli, tmp_path, tree):
    (error,) = _refused(run_cli, _project(tmp_path, [tree]))
    assert error["key"] == "shares[0].source" and error["line"] == 2
    assert f"{tree} cannot be shared with the VM" in error["message"]


@pytest.mark.parametrize("tree", SYSTEM_TREES)
def test_system_trees_and_below_by_policy(tree):
    """Also the trees this machine lacks (/nix on a non-Nix host), and what lies below."""
    assert "system tree" in refusal(Path(tree), 0, [Path("/home/dev")])
    assert "system tree" in refusal(Path(tree) / "some" / "dir", 0, [Path("/home/dev")])
    assert "root directory" in refusal(Path("/"), 0, [Path("/home/dev")])


def test_a_home_under_var_is_still_home():
    """/home is /var/home on some systems: a project under the developer's home is allowed
    (it is owned by someone else here, which is refused for that reason, not the tree)."""
    why = refusal(Path("/var/home/dev/src/api"), os.getuid(), [Path("/var/home/dev")])
    assert why is None or "system tree" not in why


@pytest.mark.parametrize("rel", ["", ".ssh", ".gnupg", ".aws", ".config", ".config/nvim",
                                 ".ssh/keys", ".."])
def test_home_its_parents_and_credential_stores_are_refused(run_cli, tmp_path, rel):
    home = Path.home()
    for name in (".ssh/keys", ".gnupg", ".aws", ".config/nvim"):
        (home / name).mkdir(parents=True)
    source = os.path.normpath(home / rel) if rel else "~"
    (error,) = _refused(run_cli, _project(tmp_path, [source]))
    assert error["key"] == "shares[0].source"
    expected = {"": "your home directory", "..": "contains your home directory"}.get(
        rel, f"~/{rel.split('/')[0]}")
    assert expected in error["message"], error["message"]


def test_mariner_state_is_refused(run_cli, tmp_path):
    state = Path(os.environ["MARINER_HOME"])
    state.mkdir(parents=True)
    (state / "vms").mkdir()
    microvms = Path(os.environ["MARINER_MICROVMS_DIR"])
    errors = _refused(run_cli, _project(tmp_path, [str(state), str(state / "vms"), str(microvms),
                                                   str(state.parent)]))
    messages = {e["key"]: e["message"] for e in errors}
    assert "inside MARINER_HOME" in messages["shares[0].source"]
    assert "inside MARINER_HOME" in messages["shares[1].source"]
    assert "inside the microvm state directory" in messages["shares[2].source"]
    assert "contains" in messages["shares[3].source"]   # the parent of HOME and MARINER_HOME


def test_a_symlink_is_judged_by_its_target(run_cli, tmp_path):
    """A share (or one the VM swapped for a symlink) pointing at ~/.ssh is still ~/.ssh."""
    (Path.home() / ".ssh").mkdir()
    project = _project(tmp_path, ["innocent"])
    (project / "innocent").symlink_to(Path.home() / ".ssh")
    (error,) = _refused(run_cli, project)
    assert "~/.ssh" in error["message"]


def test_a_directory_of_another_user_is_refused(run_cli, tmp_path):
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, 65534, 65534)
    if os.stat(other).st_uid != 65534:
        pytest.fail("the test needs to chown (run it as root, as CI does)")
    (error,) = _refused(run_cli, _project(tmp_path, [str(other)]))
    assert "belongs to" in error["message"] and "uid 65534" in error["message"]


def test_a_project_in_the_home_directory_is_refused(run_cli):
    home = Path.home()
    (home / "mariner.toml").write_text("[vm]\nname = \"home\"\n")
    (error,) = _refused(run_cli, home)
    assert "the project directory" in error["message"]
    assert "your home directory" in error["message"]
    code, out, err = run_cli("up", "--json", cwd=home)
    assert code == 2 and "your home directory" in err + out


def test_the_project_directory_may_not_hold_mariner_state(tmp_path, monkeypatch):
    project = _project(tmp_path, [])
    monkeypatch.setenv("MARINER_HOME", str(project / ".state"))
    with pytest.raises(ConfigError) as info:
        load_project(project_dir=project)
    assert "contains MARINER_HOME" in info.value.message


def test_a_directory_of_ones_own_is_shared_read_only_unless_asked(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "cache").mkdir()
    project = _project(tmp_path, [str(tmp_path / "data")],
                       f'[[shares]]\nsource = "{tmp_path / "cache"}"\ntarget = "/cache"\n'
                       f'readonly = false\n')
    cfg = load_project(project_dir=project)
    assert [(s.source, s.readonly) for s in cfg.shares] == [(tmp_path / "data", True),
                                                             (tmp_path / "cache", False)]


def test_the_runner_backends_state_is_refused(run_cli, tmp_path):
    """The runner backend executes `<state>/current` as the developer: a guest that could write
    $XDG_DATA_HOME/mariner would choose what mariner runs on the host."""
    from mariner_dev.host.userhost import state_root

    root = state_root()
    (root / "vm1").mkdir(parents=True)
    errors = _refused(run_cli, _project(tmp_path, [str(root.parent), str(root / "vm1")]))
    messages = {e["key"]: e["message"] for e in errors}
    assert "runner state" in messages["shares[0].source"]
    assert "runner state" in messages["shares[1].source"]
