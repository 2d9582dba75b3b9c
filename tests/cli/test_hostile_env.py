"""No traceback reaches a user: every command under hostile environments.

MARINER_HOME, ~/.ssh, the XDG state and runtime directories as a file, a dangling symlink or
a place nobody can write; a registry written by a newer mariner; a relative MARINER_HOME.
Each command must end with one `mariner: error:` line (or succeed), never a traceback, and a
--json command must still print exactly one JSON document.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support.fakehost import fakehost  # noqa: F401  (fixture)
from support.vmrecord import register_vm

COMMANDS = [
    ["init", "--force"], ["validate"], ["validate", "--json"], ["render"],
    ["up", "--timeout", "5"], ["up", "--json", "--timeout", "5"], ["down"],
    ["destroy", "--force"], ["status"], ["status", "--json"], ["list"], ["list", "--json"],
    ["logs"], ["exec", "--", "true"], ["shell", "true"], ["ssh-config"], ["code", "--print"],
    ["sync"], ["sync", "--json"], ["forward", "8000"], ["doctor"], ["doctor", "--json"],
]


def _unwritable(tmp_path: Path) -> str:
    """A directory path that cannot be created: root writes through mode bits, not into /sys."""
    if os.geteuid() == 0:
        return "/sys/mariner-test-unwritable"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "home")


def _spoil(kind: str, tmp_path: Path) -> str:
    if kind == "file":
        path = tmp_path / "a-file"
        path.write_text("not a directory\n")
        return str(path)
    if kind == "dangling":
        path = tmp_path / "dangling"
        path.symlink_to(tmp_path / "nowhere")
        return str(path)
    return _unwritable(tmp_path)


def _check(run_cli, project: Path, args: list[str]) -> tuple[int, str, str]:
    code, out, err = run_cli(*args, cwd=project)
    assert "Traceback" not in err and "Traceback" not in out, (args, err)
    assert code in (0, 1, 2, 125), (args, code, err)
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("mariner: error:")]
        assert len(errors) == 1 or "not ready:" in out + err or args[0] == "validate", (args, err)
    if "--json" in args:
        (line,) = out.splitlines()
        document = json.loads(line)
        assert document["version"] == 1 and document["outcome"] in ("success", "error")
        assert (document["outcome"] == "success") == (code == 0), (args, document)
    return code, out, err


@pytest.mark.parametrize("kind", ["file", "dangling", "unwritable"])
@pytest.mark.parametrize("variable", ["MARINER_HOME", "XDG_STATE_HOME"])
def test_state_directory_unusable(run_cli, project, tmp_path, monkeypatch, fakehost, kind,
                                  variable):
    monkeypatch.setenv(variable, _spoil(kind, tmp_path))
    if variable == "XDG_STATE_HOME":
        monkeypatch.delenv("MARINER_HOME")
    for args in COMMANDS:
        code, out, err = _check(run_cli, project, args)
        if args[0] in ("render", "up"):  # what must write there fails; reading finds nothing
            assert code != 0 and variable in err, (args, err)
            if variable == "MARINER_HOME" and kind != "unwritable":
                assert {"file": "it is a file, not a directory",
                        "dangling": "it is a dangling symlink (to "}[kind] in err, err


@pytest.mark.parametrize("kind", ["file", "dangling"])
def test_runtime_directory_unusable(run_cli, project, tmp_path, monkeypatch, fakehost, kind):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    spoilt = Path(_spoil(kind, tmp_path))
    (runtime / "mariner").symlink_to(spoilt) if kind == "dangling" else \
        spoilt.rename(runtime / "mariner")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    register_vm(project)
    for args in COMMANDS:
        _check(run_cli, project, args)


@pytest.mark.parametrize("kind", ["file", "dangling", "unwritable"])
def test_dot_ssh_unusable(run_cli, project, tmp_path, monkeypatch, kind):
    home = Path(os.environ["HOME"])
    if kind == "file":
        Path(_spoil(kind, tmp_path)).rename(home / ".ssh")
    elif kind == "dangling":
        (home / ".ssh").symlink_to(_spoil(kind, tmp_path))
    elif os.geteuid() == 0:  # a directory root cannot create files in
        (home / ".ssh").symlink_to("/proc/1")
    else:
        (home / ".ssh").mkdir(mode=0o500)
    register_vm(project)
    for args in (["ssh-config"], ["code", "--print"]):
        code, out, err = _check(run_cli, project, args)
        # the entry is written to mariner's own file; the user is told how to include it
        assert code == 0, err
        assert f"{home / '.ssh'}" in err and "Include" in err


def test_registry_from_a_newer_mariner(run_cli, project, fakehost):
    registry = Path(os.environ["MARINER_HOME"]) / "registry.json"
    registry.parent.mkdir(parents=True, exist_ok=True)  # the approval lives there too
    registry.write_text(json.dumps({"version": 2, "machines": {"proj": {"id": 1}}}))
    for args in COMMANDS:
        code, out, err = _check(run_cli, project, args)
        if args[0] in ("render", "up", "status", "list", "ssh-config", "exec"):
            assert code == (125 if args[0] == "exec" else 1), (args, err)
            assert "written by a newer mariner (registry version 2" in err, err
            assert "corrupt" not in err


def test_relative_mariner_home_is_refused(run_cli, project, monkeypatch, fakehost):
    monkeypatch.setenv("MARINER_HOME", "state/mariner")
    for args in (["status"], ["render"], ["list", "--json"], ["exec", "--", "true"]):
        code, out, err = _check(run_cli, project, args)
        assert code == 2 and "MARINER_HOME='state/mariner' is a relative path" in err, (args, err)
    assert not (project / "state").exists()


def test_relative_xdg_directories_are_ignored(run_cli, project, monkeypatch, fakehost):
    from mariner_dev import paths

    monkeypatch.delenv("MARINER_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", "xdg-state")
    monkeypatch.setenv("XDG_CONFIG_HOME", "xdg-config")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "xdg-runtime")
    home = Path(os.environ["HOME"])
    assert paths.mariner_home() == home / ".local" / "state" / "mariner"
    assert paths.user_config_file() == home / ".config" / "mariner" / "config.toml"
    assert paths.user_config_file_str() == str(paths.user_config_file())
    assert paths.runtime_dir_str() == f"/tmp/mariner-{os.getuid()}"
    code, out, err = run_cli("render", cwd=project)
    assert code == 0, err
    assert not any((project / d).exists() for d in ("xdg-state", "xdg-config", "xdg-runtime"))
    assert (home / ".local" / "state" / "mariner" / "registry.json").is_file()


@pytest.mark.parametrize("where", ["/proc", "/sys/kernel"])
def test_init_where_nothing_can_be_written(run_cli, tmp_path, where):
    for args in (["init", where], ["init", "-t", "docker", where]):
        code, out, err = _check(run_cli, tmp_path, args)
        assert code == 1 and f"cannot write a project into {where}" in err, err


def test_a_bug_is_one_line_and_debug_shows_the_traceback(run_cli, project, monkeypatch):
    from mariner_dev import config

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(config, "load_project", broken)
    code, out, err = run_cli("validate", cwd=project)
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[0] == "mariner: error: internal error (KeyError: 'boom')"
    assert "report it" in err and "MARINER_DEBUG=1" in err
    code, out, err = run_cli("validate", "--json", cwd=project)
    document = json.loads(out)
    assert document["outcome"] == "error" and "internal error" in document["message"]
    monkeypatch.setenv("MARINER_DEBUG", "1")
    code, out, err = run_cli("validate", cwd=project)
    assert code == 1 and "Traceback" in err and "KeyError: 'boom'" in err
