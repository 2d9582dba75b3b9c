"""Next steps that work: a VM that does not exist (never built, or only rendered) is named as
such, with `mariner up` as the next step, and nothing is written or waited for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.fakehost import fakehost  # noqa: F401  (fixture)


@pytest.mark.parametrize("rendered", [False, True], ids=["never-rendered", "rendered-only"])
def test_ssh_config_and_code_for_a_vm_that_does_not_exist(run_cli, project, fakehost, rendered):
    home = Path(os.environ["HOME"])
    if rendered:  # a render registers the name, but builds nothing
        assert run_cli("render", cwd=project)[0] == 0
    for args in (["ssh-config"], ["code", "--print"]):
        code, out, err = run_cli(*args, cwd=project)
        assert code == 1 and out == "", err
        assert "VM proj does not exist yet (nothing was written)" in err
        assert "hint: `mariner up` creates and starts it" in err
    assert not (home / ".ssh").exists()
    assert not (Path(os.environ["MARINER_HOME"]) / "ssh_config").exists()


@pytest.mark.parametrize("rendered", [False, True], ids=["never-rendered", "rendered-only"])
def test_exec_and_shell_for_a_vm_that_does_not_exist(project, fakehost, rendered, run_cli):
    if rendered:
        assert run_cli("render", cwd=project)[0] == 0
    for args in (["exec", "--", "true"], ["shell", "true"]):
        proc = subprocess.run([sys.executable, "-m", "mariner_dev", *args], cwd=project,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 125, proc.stderr
        assert "VM proj does not exist yet" in proc.stderr and "`mariner up`" in proc.stderr


@pytest.mark.parametrize("follow", [[], ["-f"]], ids=["logs", "logs-f"])
def test_logs_of_a_vm_that_does_not_exist(project, fakehost, follow, run_cli):
    assert run_cli("render", cwd=project)[0] == 0
    proc = subprocess.run([sys.executable, "-m", "mariner_dev", "logs", *follow], cwd=project,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "VM proj does not exist on this host, so it has no log" in proc.stderr
    assert "`mariner up`" in proc.stderr
    assert not any(r["prog"] == "journalctl" for r in fakehost.records())


def test_status_of_a_vm_that_is_not_running_says_what_to_do(run_cli, project, fakehost):
    code, out, err = run_cli("status", cwd=project)
    assert code == 0 and "state:    absent" in out
    assert "next:     `mariner up` creates and starts it" in out


def test_a_ctrl_c_outside_a_commands_own_handling_is_one_line_and_130(run_cli, project,
                                                                       monkeypatch):
    """typer turns a KeyboardInterrupt that leaves a command into exit 130 without a word."""
    from mariner_dev import lifecycle

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "status", interrupted)
    code, out, err = run_cli("status", cwd=project)
    assert (code, out) == (130, "")
    assert err.splitlines() == ["mariner: error: interrupted"], err


def test_a_ctrl_c_while_up_shows_its_result_says_what_to_do(run_cli, project, monkeypatch):
    """The VM is up, the result is being printed (the first print imports rich): the one line
    still names the next step."""
    from mariner_dev import lifecycle
    from mariner_dev.cli import cmd_up

    monkeypatch.setattr(lifecycle, "up", lambda cfg, **kwargs: object())

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd_up, "_show", interrupted)
    code, out, err = run_cli("up", cwd=project)
    assert code == 130
    assert err.splitlines()[-1] == ("mariner: error: interrupted; `mariner up` again completes "
                                    "the VM"), err
