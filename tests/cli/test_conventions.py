"""CLI conventions a newcomer relies on: help, completion, -v, -C, refusals of bad usage."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from support.fakehost import fakehost  # noqa: F401  (fixture)
from support.vmrecord import register_vm
from support.tools import REPO

COMMANDS = ["init", "validate", "render", "up", "down", "destroy", "status", "list", "logs",
            "exec", "shell", "ssh-config", "code", "sync", "forward", "doctor"]
MAIN = ["init", "validate", "up", "down", "destroy", "status", "exec", "shell", "code", "sync",
        "doctor", "logs"]


def _mariner(*args: str, cwd=None, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mariner_dev", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_help_for_every_command_has_one_style(run_cli):
    for command in COMMANDS:
        code, out, err = run_cli(command, "--help")
        assert code == 0, (command, err)
        assert out.startswith(f"Usage: mariner {command} "), (command, out)
        assert "-v, --verbose" in out and "-h, --help" in out, command
        if command in MAIN:
            assert "Examples:\n    mariner " in out, command


def test_exec_help_is_the_same_style_through_the_fast_path():
    fast = _mariner("exec", "--help")
    assert fast.returncode == 0 and fast.stdout.startswith("Usage: mariner exec [OPTIONS]")
    assert "Examples:" in fast.stdout


def test_mariner_help(run_cli):
    code, out, _ = run_cli("help")
    assert code == 0 and "Commands:" in out and "help" in out and "completion" in out
    for command in ("up", "exec", "ssh-config"):
        code, out, _ = run_cli("help", command)
        assert code == 0
        assert out == run_cli(command, "--help")[1]
    code, out, err = run_cli("help", "nope")
    assert code == 2 and "no command 'nope'" in err


def test_verbose_after_the_command_shows_host_commands(project, fakehost):
    proc = _mariner("status", "-v", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "mariner: $ " in proc.stderr and "systemctl show" in proc.stderr
    assert "mariner: $ " not in _mariner("status", cwd=project).stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(run_cli, shell):
    code, out, err = run_cli("completion", shell)
    assert code == 0 and "_MARINER_COMPLETE=complete_" + shell in out
    code, out, err = run_cli("completion", "tcsh")
    assert code == 2 and "bash, zsh, fish" in err


def test_completion_of_commands_options_and_templates(tmp_path):
    def bash(words: str) -> list[str]:
        proc = _mariner(env={"COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1),
                             "_MARINER_COMPLETE": "complete_bash"}, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert bash("mariner sta") == ["status"]
    assert "--template" in bash("mariner init --t")
    assert bash("mariner init --template w") == ["webapp"]
    assert "--no-restart" in bash("mariner up --no")


def test_completion_of_vm_names(project):
    from mariner_dev.cli.app import complete_vm_names

    assert complete_vm_names("") == []
    register_vm(project)
    assert complete_vm_names("p") == ["proj"] and complete_vm_names("x") == []


def test_dash_C_finds_the_project_as_running_from_there(run_cli, project, tmp_path):
    deep = project / "src" / "deep"
    here = run_cli("validate", "--json", cwd=deep)
    there = run_cli("-C", str(deep), "validate", "--json", cwd=tmp_path)
    after = run_cli("validate", "--json", "-C", str(deep), cwd=tmp_path)
    assert here[0] == there[0] == after[0] == 0, there[2]
    assert json.loads(here[1]) == json.loads(there[1]) == json.loads(after[1])
    register_vm(project)
    code, out, err = run_cli("code", "--print", "-C", str(deep), cwd=tmp_path)
    assert code == 0, err
    assert out.strip().endswith("/workspaces/proj/src/deep")


def test_destroy_n_prints_aborted_and_exits_1(project, fakehost):
    register_vm(project)
    parent, child = pty.openpty()
    os.write(parent, b"n\n")
    try:
        proc = subprocess.run([sys.executable, "-m", "mariner_dev", "destroy"], cwd=project,
                              stdin=child, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ))
    finally:
        os.close(child)
        os.close(parent)
    assert proc.returncode == 1, proc.stderr
    assert "aborted" in proc.stderr and "Traceback" not in proc.stderr
    from mariner_dev.state import Registry

    assert Registry().get("proj") is not None


def test_bad_values_and_combinations_are_refused(run_cli, project):
    code, out, err = run_cli("up", "--timeout", "-5", cwd=project)
    assert code == 2 and "--timeout" in err
    code, out, err = run_cli("exec", "-t", "-T", "--", "true", cwd=project)
    assert code == 2 and "-t/--tty and -T/--no-tty contradict" in err
    proc = _mariner("exec", "-tT", "--", "true", cwd=project)
    assert proc.returncode == 2 and "contradict" in proc.stderr
    register_vm(project)
    proc = _mariner("exec", "--", "true", cwd=project, env={"MARINER_TRANSPORT": "bogus"})
    assert proc.returncode == 2 and "MARINER_TRANSPORT='bogus' is not one of" in proc.stderr


def test_cpus_above_the_host_is_a_warning_not_an_error(run_cli, project):
    (project / "mariner.toml").write_text('[vm]\nname = "proj"\ncpus = 64\n')
    code, out, err = run_cli("validate", cwd=project)
    assert code == 0 and "mariner: warning:" in err


def test_a_byte_order_mark_is_accepted(run_cli, project):
    (project / "mariner.toml").write_bytes(b'\xef\xbb\xbf[vm]\nname = "proj"\ncpus = 1\n')
    code, out, err = run_cli("validate", "--json", cwd=project)
    assert code == 0, err
    assert json.loads(out)["config"]["vm"]["cpus"] == 1


def test_non_ascii_directory_names_give_distinct_valid_names(run_cli, tmp_path):
    from mariner_dev.config import NAME_RE

    names = []
    for dirname in ("数据", "日志", "café", "cafe"):
        directory = tmp_path / dirname
        directory.mkdir()
        assert run_cli("init", cwd=directory)[0] == 0
        code, out, err = run_cli("validate", "--json", cwd=directory)
        assert code == 0, err
        names.append(json.loads(out)["config"]["vm"]["name"])
    assert len(set(names)) == 4 and all(NAME_RE.match(n) for n in names), names
    assert names[3] == "cafe" and names[2].startswith("cafe-")


def test_schema_line_and_schema_id_agree(run_cli, tmp_path):
    from mariner_dev.project import SCHEMA_URL

    schema = json.loads((REPO / "schema" / "mariner.schema.json").read_text())
    assert schema["$id"] == SCHEMA_URL
    assert run_cli("init", cwd=tmp_path)[0] == 0
    assert (tmp_path / "mariner.toml").read_text().splitlines()[0] == f"#:schema {SCHEMA_URL}"
    for example in (REPO / "examples").glob("*/mariner.toml"):
        assert example.read_text().splitlines()[0] == f"#:schema {SCHEMA_URL}", example
