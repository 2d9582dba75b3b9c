"""The --json contract: every --json command prints exactly one document on stdout, on success
and on failure, valid against schema/<command>.output.schema.json (version 1, outcome; failures
carry message, hint, exit_code and, for an invalid mariner.toml, errors[]).

Documents of a running VM (up, status, list, sync) are checked by the lifecycle and sync tests,
whose helpers validate every document they read (tests/support/jsondoc.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from support.fakehost import fakehost  # noqa: F401  (fixture)
from support.jsondoc import document
from support.tools import REPO

JSON_COMMANDS = ["validate", "up", "status", "list", "doctor", "sync"]


@pytest.fixture
def broken(tmp_path) -> Path:
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "mariner.toml").write_text('[vm]\ncpus = 0\nmemory = "lots"\n')
    return directory


def test_every_json_command_has_a_schema_and_it_is_valid():
    from jsonschema import Draft202012Validator

    found = sorted(p.name.split(".")[0] for p in (REPO / "schema").glob("*.output.schema.json"))
    assert found == sorted(JSON_COMMANDS)
    for command in JSON_COMMANDS:
        path = REPO / "schema" / f"{command}.output.schema.json"
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        assert schema["$id"].endswith(f"/schema/{path.name}")


def test_the_json_commands_are_the_ones_with_a_json_option(run_cli):
    for command in JSON_COMMANDS:
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "--json" in out, command
    for command in ("init", "render", "down", "destroy", "logs", "ssh-config", "code",
                    "forward"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "--json" not in out, command


def test_config_errors_are_the_same_errors_everywhere(run_cli, broken, fakehost):
    expected = None
    for command in ("validate", "up", "status", "sync"):
        code, out, err = run_cli(command, "--json", cwd=broken)
        assert code == 2, (command, err)
        data = document(command, out, code)
        assert [(e["key"], e["line"], e["column"]) for e in data["errors"]] == \
            [("vm.cpus", 2, 8), ("vm.memory", 3, 10)]
        expected = expected or data["errors"]
        assert data["errors"] == expected


def test_no_project_is_a_failure_document(run_cli, tmp_path, fakehost):
    for command in ("validate", "up", "status", "sync"):
        code, out, err = run_cli(command, "--json", cwd=tmp_path)
        assert code == 2
        data = document(command, out, code)
        assert "no mariner.toml" in data["message"] and len(data["errors"]) == 1


def test_status_and_list_of_a_vm_that_was_never_started(run_cli, project, fakehost):
    code, out, _ = run_cli("list", "--json")
    assert document("list", out, code)["vms"] == []
    code, out, _ = run_cli("status", "--json", cwd=project)
    assert document("status", out, code)["state"] == "absent"
    assert run_cli("render", cwd=project)[0] == 0
    code, out, _ = run_cli("list", "--json")
    (vm,) = document("list", out, code)["vms"]
    assert (vm["name"], vm["state"], vm["project"]) == ("proj", "absent", str(project))


def test_sync_and_up_failures(run_cli, project, fakehost, monkeypatch):
    code, out, _ = run_cli("sync", "--json", cwd=project)
    data = document("sync", out, code)
    assert code == 2 and "nothing to sync" in data["message"]
    code, out, _ = run_cli("sync", "--json", "--watch", cwd=project)
    assert code == 2 and "--watch cannot be combined" in document("sync", out, code)["message"]
    monkeypatch.setenv("MARINER_FAKE_BUILD_FAIL", "error: attribute 'nope' missing")
    code, out, err = run_cli("up", "--json", cwd=project)
    data = document("up", out, code)
    assert code == 1 and "building VM proj failed" in data["message"]


def test_doctor(run_cli):
    code, out, _ = run_cli("doctor", "--json")
    data = document("doctor", out, code)
    assert data["ok"] == (code == 0)


def test_bad_usage_with_json_is_a_document_too(run_cli, project):
    code, out, err = run_cli("status", "--json", "--bogus", cwd=project)
    assert code == 2 and "--bogus" in err
    data = document("status", out, code)
    assert "--bogus" in data["message"]


def test_readme_shows_each_schema():
    readme = (REPO / "README.md").read_text()
    for command in JSON_COMMANDS:
        assert f"schema/{command}.output.schema.json" in readme, command
    assert re.search(r'"version": 1', readme) and '"outcome"' in readme
