"""`mariner validate [--json]`: exact output shapes, exit codes, where it looks."""

from __future__ import annotations

import json

from mariner_dev.config import load_project


def _project(tmp_path, text="[vm]\ncpus = 3\n", name="api"):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "mariner.toml").write_text(text)
    return directory


def test_valid_json_is_exactly_valid_and_config(run_cli, tmp_path):
    project = _project(tmp_path)
    code, out, err = run_cli("validate", "--json", cwd=project)
    assert code == 0 and err == ""
    assert out.count("\n") == 1            # one JSON object on one line
    data = json.loads(out)
    assert list(data) == ["version", "outcome", "valid", "config"] and data["valid"] is True
    assert data["version"] == 1 and data["outcome"] == "success"
    assert data["config"] == load_project(project_dir=project).to_json()
    assert data["config"]["vm"]["cpus"] == 3 and data["config"]["vm"]["name"] == "api"


def test_valid_text(run_cli, tmp_path):
    project = _project(tmp_path)
    code, out, err = run_cli("validate", cwd=project)
    assert code == 0 and out == ""
    assert "valid" in err and "api" in err


def test_invalid_json_shape(run_cli, tmp_path):
    project = _project(tmp_path, '[vm]\ncpus = 0\nmemory = "lots"\n')
    code, out, err = run_cli("validate", "--json", cwd=project)
    assert code == 2 and "Traceback" not in err
    data = json.loads(out)
    assert list(data) == ["version", "outcome", "valid", "message", "hint", "exit_code",
                          "errors"] and data["valid"] is False
    assert data["outcome"] == "error" and data["exit_code"] == 2
    assert data["errors"] == [
        {"file": str(project / "mariner.toml"), "line": 2, "column": 8, "key": "vm.cpus",
         "message": "0 is below the minimum 1"},
        {"file": str(project / "mariner.toml"), "line": 3, "column": 10, "key": "vm.memory",
         "message": '"lots" is not a size (try "8GiB" or 8192)'},
    ]


def test_no_config_here_or_in_any_parent(run_cli, tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert not any((d / "mariner.toml").exists() for d in [deep, *deep.parents])
    code, out, err = run_cli("validate", cwd=deep)
    assert code == 2 and out == "" and "Traceback" not in err
    assert str(deep) in err and "any parent" in err and "mariner init" in err
    code, out, err = run_cli("validate", "--json", cwd=deep)
    assert code == 2
    data = json.loads(out)
    assert data["valid"] is False and len(data["errors"]) == 1
    (error,) = data["errors"]
    assert set(error) == {"file", "line", "column", "key", "message"}
    assert str(deep) in error["message"] and "mariner init" in error["message"]
    assert list(tmp_path.rglob("*")) == [tmp_path / "a", deep]


def test_found_in_a_parent_and_with_dash_c(run_cli, tmp_path):
    project = _project(tmp_path)
    (project / "src" / "deep").mkdir(parents=True)
    code, out, _ = run_cli("validate", "--json", cwd=project / "src" / "deep")
    assert code == 0 and json.loads(out)["config"]["project_dir"] == str(project)
    for args in (("-C", str(project), "validate", "--json"),
                 ("validate", "--json", "-C", str(project))):
        code, out, err = run_cli(*args, cwd=tmp_path)
        assert code == 0, err
        assert json.loads(out)["config"]["config_file"] == str(project / "mariner.toml")
    code, out, err = run_cli("validate", "-C", str(tmp_path), cwd=tmp_path)
    assert code == 2 and "mariner init" in err


def test_examples_validate(run_cli):
    from mariner_dev.project import examples_dir

    for example in ("minimal", "webapp", "docker"):
        code, out, err = run_cli("validate", "--json", "-C", str(examples_dir() / example))
        assert code == 0, (example, err)
        assert json.loads(out)["valid"] is True
