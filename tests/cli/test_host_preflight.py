"""A host that cannot run VMs gets one clear line and the next step, before any host command.

The hosts here are stand-ins on PATH that answer as the real ones do on a machine without the
microvm.nix host module (a plain Debian: no `microvm`; `systemctl` present but no systemd
running; systemd running but no microvm@ unit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support.fakehost import fakehost  # noqa: F401  (fixture)
from support.fakehost import shell_command

NO_BUS = ('echo "System has not been booted with systemd as init system (PID 1). '
          'Can\'t operate." >&2; echo "Failed to connect to bus: Host is down" >&2; exit 1')
NO_UNIT = ('[ "$1" = show ] || { echo "unexpected: $*" >&2; exit 64; }\n'
           'echo LoadState=not-found')

HOSTS = {
    # name: (stand-ins {program: body}, what the one line says)
    "no-microvm": ({}, "no `microvm` command"),
    "no-systemd": ({"microvm": "exit 99", "systemctl": NO_BUS},
                   "systemd is not running on this host (Failed to connect to bus: Host is down)"),
    "no-unit": ({"microvm": "exit 99", "systemctl": NO_UNIT}, "systemd has no microvm@ unit"),
}


def _host(monkeypatch, tmp_path, kind: str) -> Path:
    """PATH is the stand-ins plus a directory with python only: no real host command."""
    tools, _ = HOSTS[kind]
    bin_dir = tmp_path / f"bin-{kind}"
    bin_dir.mkdir()
    log = tmp_path / f"calls-{kind}"
    for name, body in tools.items():
        shell_command(bin_dir, name, f'echo "{name} $*" >> {log}\n{body}')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/nonexistent")
    return log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("kind", sorted(HOSTS))
@pytest.mark.parametrize("command", ["up", "down", "destroy", "logs"])
def test_commands_say_what_the_host_lacks(run_cli, project, tmp_path, monkeypatch, kind,
                                          command, fakehost):
    # the VM is registered first (a render claims the name), so down/destroy reach the host
    assert run_cli("render", cwd=project)[0] == 0
    log = _host(monkeypatch, tmp_path, kind)
    args = [command, "--force"] if command == "destroy" else [command]
    code, out, err = run_cli(*args, cwd=project)
    assert code == 1, err
    assert "Traceback" not in err
    first, hint = err.strip().splitlines()[-2:]
    assert first.startswith("mariner: error: ") and HOSTS[kind][1] in first, err
    assert hint == "  hint: run `mariner doctor` to see what this host lacks"
    # only the preflight's own question was asked: no microvm call, no start/stop
    assert [c for c in _calls(log) if not c.startswith("systemctl show --property=LoadState ")] \
        == []


def test_up_on_a_host_that_is_not_ready_claims_no_name(run_cli, project, tmp_path, monkeypatch):
    _host(monkeypatch, tmp_path, "no-microvm")
    code, out, err = run_cli("up", "--json", cwd=project)
    assert code == 1
    data = json.loads(out)
    assert (data["version"], data["outcome"]) == (1, "error")
    assert "no `microvm` command" in data["message"] and "mariner doctor" in data["hint"]
    registry = Path(os.environ["MARINER_HOME"]) / "registry.json"
    assert not registry.exists() or "proj" not in json.loads(registry.read_text()).get("vms", {})


@pytest.mark.parametrize("kind", sorted(HOSTS))
def test_status_and_list_show_what_mariner_knows(run_cli, project, tmp_path, monkeypatch, kind,
                                                 fakehost):
    assert run_cli("render", cwd=project)[0] == 0
    _host(monkeypatch, tmp_path, kind)

    code, out, err = run_cli("status", cwd=project)
    assert code == 1 and "Traceback" not in err
    assert "name:     proj" in out and "state:    unknown" in out
    assert HOSTS[kind][1] in err and "mariner doctor" in err

    code, out, err = run_cli("status", "--json", cwd=project)
    assert code == 1
    data = json.loads(out)
    assert (data["outcome"], data["state"], data["name"]) == ("error", "unknown", "proj")
    assert HOSTS[kind][1] in data["message"] and "mariner doctor" in data["hint"]

    code, out, err = run_cli("list", cwd=project)
    assert code == 1 and "Traceback" not in err
    (row,) = [line for line in out.splitlines() if line.startswith("proj")]
    assert "unknown" in row and str(project) in row
    assert HOSTS[kind][1] in err

    code, out, err = run_cli("list", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["outcome"] == "error" and [vm["state"] for vm in data["vms"]] == ["unknown"]


def test_a_ready_host_asks_once(run_cli, project, fakehost):
    assert run_cli("status", cwd=project)[0] == 0
    calls = [c for c in fakehost.log_file.read_text().splitlines()
             if "mariner-preflight" in c]
    assert len(calls) == 1
