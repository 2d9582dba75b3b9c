"""exec's argument parsing and remote command line (no guest needed), and the typer path."""

from __future__ import annotations

import subprocess

import pytest

from mariner_dev.errors import UsageError
from mariner_dev.fastexec import parse_args
from mariner_dev.remote.command import build_command, quote
from support.fixtures import run_mariner
from test_remote_exec import ARGV_CORPUS


def test_parse_options_and_command():
    opts = parse_args(["-it", "-e", "A=1", "-eB=2", "--env=C=3", "--env-file", "f", "-w", "/x",
                       "-u", "root", "-C", "/p", "-v", "--trust-new-host-key", "--", "ls",
                       "-la", "--", "-e"])
    assert opts.argv == ["ls", "-la", "--", "-e"]
    assert (opts.interactive, opts.tty, opts.env, opts.env_files, opts.workdir, opts.user,
            opts.project, opts.verbose, opts.trust_new) == \
        (True, True, ["A=1", "B=2", "C=3"], ["f"], "/x", "root", "/p", 1, True)
    assert parse_args(["-T", "echo", "-t"]).argv == ["echo", "-t"]
    assert parse_args(["-T", "echo"]).tty is False


@pytest.mark.parametrize("argv", [[], ["-i"], ["--bogus", "--", "x"], ["-x", "y"], ["-e"]])
def test_usage_errors(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


def test_quoting_round_trips_through_a_real_shell():
    script = "printf '%s\\0' " + " ".join(quote(a) for a in ARGV_CORPUS)
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == ARGV_CORPUS


def test_remote_command_runs_in_a_login_shell_and_execs():
    command = build_command(["echo", "a b"], workdir="/w d", env={"K": "v'1"})
    assert command.startswith("exec bash -l -c ")
    inner = subprocess.run(["sh", "-c", "printf %s " + command[len("exec bash -l -c "):]],
                           capture_output=True, check=True).stdout.decode()
    assert inner.splitlines() == ["cd -- '/w d' || exit 125", "export K='v'\"'\"'1'",
                                  "exec echo 'a b'"]
    assert build_command(["id"], workdir=None, env={}, user="root").startswith(
        "exec sudo -H -u root -- bash -l -c ")


def test_exec_help_and_usage_exit_codes(project):
    assert run_mariner("exec", "--help").returncode == 0
    result = run_mariner("exec", cwd=project.dir)
    assert result.returncode == 2 and b"no command" in result.stderr


def test_exec_through_typer_behaves_the_same(project, tmp_path):
    path_file = tmp_path / "served"
    result = run_mariner("-v", "exec", "-e", "X=1 2", "--", "sh", "-c", 'echo "$X"; exit 4',
                         cwd=project.dir, env={"MARINER_AGENT": "require",
                                               "MARINER_DEBUG_PATH_FILE": str(path_file)})
    assert (result.returncode, result.stdout) == (4, b"1 2\n"), result.stderr
    assert b"served by the agent" in result.stderr
    assert path_file.read_text().split() == ["agent"]


def test_outside_any_project_is_a_usage_error(tmp_path):
    result = run_mariner("exec", "--", "true", cwd=tmp_path)
    assert result.returncode == 2
    assert b"mariner.toml" in result.stderr
