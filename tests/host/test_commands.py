"""The one wrapper around host commands: lookup, sudo prefix, logging, errors, streaming."""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path

import pytest

from mariner_dev.errors import HostError
from mariner_dev.host import commands
from support.fakehost import shell_command as script


@pytest.fixture
def bindir(tmp_path, monkeypatch) -> Path:
    """A directory with small stand-in commands, alone on PATH (plus the basics)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:/usr/bin:/bin")
    return directory


def test_command_is_resolved_to_an_absolute_path_and_logged(bindir, caplog, monkeypatch):
    prog = script(bindir, "microvm", 'echo "args:$*"')
    monkeypatch.chdir(bindir)  # a relative PATH lookup would be ambiguous here
    with caplog.at_level(logging.INFO, logger="mariner.host"):
        result = commands.run("microvm", ["-l", "a b"])
    assert result.argv == [str(prog), "-l", "a b"]
    assert result.stdout == "args:-l a b\n"
    assert f"$ {shlex.join([str(prog), '-l', 'a b'])}" in caplog.messages


def test_relative_path_entry_on_PATH_still_gives_an_absolute_argv(bindir, monkeypatch):
    script(bindir, "nix", "exit 0")
    monkeypatch.chdir(bindir.parent)
    monkeypatch.setenv("PATH", "bin:/usr/bin:/bin")
    assert commands.command_argv("nix", ["--version"]) == [str(bindir / "nix"), "--version"]


def test_a_path_instead_of_a_name_is_refused(bindir):
    with pytest.raises(ValueError):
        commands.command_argv("/usr/bin/systemctl", [])


@pytest.mark.parametrize("value, prefix", [("", []), ("env", ["env"]),
                                           ("env  FOO='a b'", ["env", "FOO=a b"])])
def test_sudo_prefix_from_the_environment(monkeypatch, value, prefix):
    monkeypatch.setenv("MARINER_SUDO", value)
    assert commands.sudo_prefix() == prefix


def test_sudo_prefix_default_depends_on_root(monkeypatch):
    monkeypatch.delenv("MARINER_SUDO", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert commands.sudo_prefix() == []
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert commands.sudo_prefix() == ["sudo", "-n"]


def test_privileged_command_gets_the_prefix_after_resolution(bindir, monkeypatch, caplog):
    prog = script(bindir, "systemctl", 'echo "FOO=$FOO $*"')
    monkeypatch.setenv("MARINER_SUDO", "env FOO=via-prefix")
    with caplog.at_level(logging.INFO, logger="mariner.host"):
        result = commands.run("systemctl", ["start", "microvm@api.service"], privileged=True)
    env = commands.which("env")
    assert result.argv == [env, "FOO=via-prefix", str(prog), "start", "microvm@api.service"]
    assert result.stdout == "FOO=via-prefix start microvm@api.service\n"
    assert any(m.startswith(f"$ {env} FOO=via-prefix {prog} start") for m in caplog.messages)


def test_reads_never_get_the_prefix(bindir, monkeypatch):
    prog = script(bindir, "systemctl", "echo active")
    monkeypatch.setenv("MARINER_SUDO", "env FOO=1")
    assert commands.run("systemctl", ["is-active", "x"]).argv == [str(prog), "is-active", "x"]


def test_empty_sudo_means_no_prefix_even_when_privileged(bindir, monkeypatch):
    prog = script(bindir, "microvm", "exit 0")
    monkeypatch.setenv("MARINER_SUDO", "")
    assert commands.run("microvm", ["-l"], privileged=True).argv == [str(prog), "-l"]


def test_default_sudo_missing_is_a_clear_error(bindir, monkeypatch):
    script(bindir, "microvm", "exit 0")
    monkeypatch.delenv("MARINER_SUDO", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("PATH", str(bindir))  # no sudo here
    with pytest.raises(HostError) as info:
        commands.run("microvm", ["-l"], privileged=True)
    assert "sudo not found on PATH" in str(info.value)
    assert "MARINER_SUDO" in info.value.hint


def test_missing_command_names_it_with_a_hint(bindir):
    with pytest.raises(HostError) as info:
        commands.run("microvm", ["-l"])
    assert str(info.value) == "microvm not found on PATH"
    assert "microvm.nix host module" in info.value.hint
    assert "mariner doctor" in info.value.hint


def test_failure_carries_argv_status_and_stderr_tail(bindir):
    prog = script(bindir, "nix", 'i=1; while [ $i -le 30 ]; do echo "line $i" >&2; i=$((i+1)); '
                                  'done; echo "error: the real problem" >&2; exit 3')
    with pytest.raises(HostError) as info:
        commands.run("nix", ["build", ".#x"])
    error = info.value
    assert error.returncode == 3
    assert error.argv == [str(prog), "build", ".#x"]
    assert "exit status 3" in str(error) and "error: the real problem" in str(error)
    tail = error.stderr_tail.splitlines()
    assert len(tail) == commands.STDERR_TAIL_LINES
    assert tail[-1] == "error: the real problem" and tail[0] == "line 12"


def test_stdout_is_the_tail_when_stderr_is_empty(bindir):
    script(bindir, "microvm", 'echo "/var/lib/microvms/api already exists."; exit 1')
    with pytest.raises(HostError) as info:
        commands.run("microvm", ["-c", "api"])
    assert info.value.stderr_tail == "/var/lib/microvms/api already exists."


def test_ok_codes(bindir):
    script(bindir, "systemctl", "echo inactive; exit 3")
    assert commands.run("systemctl", ["is-active", "x"], ok_codes=(0, 3)).returncode == 3
    assert commands.run("systemctl", ["is-active", "x"], ok_codes=None).stdout == "inactive\n"
    with pytest.raises(HostError):
        commands.run("systemctl", ["is-active", "x"])


def test_timeout(bindir):
    script(bindir, "nix", "echo slow >&2; exec sleep 5")
    started = time.monotonic()
    with pytest.raises(HostError) as info:
        commands.run("nix", ["build"], timeout=0.3)
    assert time.monotonic() - started < 3
    assert "did not finish within 0.3 s" in str(info.value)


def test_stream_yields_lines_as_they_come(bindir):
    script(bindir, "journalctl", 'echo one; sleep 0.3; echo two')
    lines = commands.stream("journalctl", ["-u", "x"])
    started = time.monotonic()
    assert next(lines) == "one"
    assert time.monotonic() - started < 0.25  # before the command finished
    assert list(lines) == ["two"]


def test_stream_failure_raises_after_the_output(bindir):
    script(bindir, "journalctl", 'echo partial; echo "Failed to add filter" >&2; exit 1')
    lines = commands.stream("journalctl", ["-u", "x"])
    assert next(lines) == "partial"
    with pytest.raises(HostError) as info:
        next(lines)
    assert info.value.returncode == 1 and "Failed to add filter" in info.value.stderr_tail


def test_closing_a_stream_terminates_the_command(bindir, tmp_path):
    pidfile = tmp_path / "pid"
    script(bindir, "journalctl", f'echo $$ > {pidfile}; echo first; exec sleep 30')
    lines = commands.stream("journalctl", ["-f"])
    assert next(lines) == "first"
    lines.close()
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_stream_timeout(bindir):
    script(bindir, "journalctl", "echo first; exec sleep 30")
    lines = commands.stream("journalctl", ["-f"], timeout=0.5)
    assert next(lines) == "first"
    with pytest.raises(HostError) as info:
        list(lines)
    assert "did not finish within 0.5 s" in str(info.value)


def test_stream_missing_command_fails_before_iteration(bindir):
    with pytest.raises(HostError, match="microvm not found on PATH"):
        commands.stream("microvm", ["-l"])
