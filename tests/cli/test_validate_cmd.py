"""`mariner validate [--json]`: exact output shapes, exit codes, where it looks."""

from __future__ import annotations

import json

from mariner_dev.config import load_project


def _project(tmp_path, text="[vm]\ncpus = 1\n", name="api"):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "mariner.toml").write_text(text)
    return directory


def test_valid_json_is_exactly_valid_config_and_refused_dotfiles(run_cli, tmp_path):
    project = _project(tmp_path)
    code, out, err = run_cli("validate", "--json", cwd=project)
    assert code == 0 and err == ""
    assert out.count("\n") == 1            # one JSON object on one line
    data = json.loads(out)
    assert list(data) == ["version", "outcome", "valid", "config", "warnings", "dotfiles_refused"]
    assert data["valid"] is True and data["warnings"] == []
    assert data["version"] == 1 and data["outcome"] == "success"
    assert data["dotfiles_refused"] == []   # each file [dotfiles] would refuse, and why
    assert data["config"] == load_project(project_dir=project).to_json()
    assert data["config"]["vm"]["cpus"] == 1 and data["config"]["vm"]["name"] == "api"


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


SECRETS = '''[vm]
cpus = 1
[env]
GITHUB_TOKEN = "ghp_0123456789abcdefghijABCDEFGHIJ012345"
AWS_SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DB_PASSWORD = "hunter2"
DATABASE_URL = "postgres://app:s3cret@db:5432/app"
DEPLOY = "AKIAIOSFODNN7EXAMPLE"
PWD_HINT = "fine"
APP_ENV = "development"
PLAIN_URL = "postgres://localhost:5432/app"
TOKEN_URL = ""
'''


def test_secret_looking_env_is_a_warning(run_cli, tmp_path):
    project = _project(tmp_path, SECRETS)
    code, out, err = run_cli("validate", cwd=project)
    assert code == 0 and out == ""
    warned = [line for line in err.splitlines() if line.startswith("mariner: warning: ")]
    file = project / "mariner.toml"
    keys = [line.split(": ")[3] for line in warned]
    assert keys == ["env.GITHUB_TOKEN", "env.AWS_SECRET_ACCESS_KEY", "env.DB_PASSWORD",
                    "env.DATABASE_URL", "env.DEPLOY"], err
    assert warned[0].startswith(f"mariner: warning: {file}:4:16: env.GITHUB_TOKEN: its value "
                                f"looks like a GitHub token")
    assert all("`mariner exec -e " in line and "--env-file" in line for line in warned)
    assert "valid (VM 'api')" in err
    code, out, err = run_cli("validate", "--json", cwd=project)
    data = json.loads(out)
    assert code == 0 and data["outcome"] == "success"
    assert [w["key"] for w in data["warnings"]] == keys


def test_resources_beyond_the_host_are_a_warning(tmp_path):
    from mariner_dev.advisories import config_warnings

    project = _project(tmp_path, '[vm]\ncpus = 64\nmemory = "4TiB"\n')
    cfg = load_project(project_dir=project)
    warnings = config_warnings(cfg, cpus=2, memory_mib=2048)
    assert [(w.key, w.line, w.column) for w in warnings] == [("vm.cpus", 2, 8),
                                                             ("vm.memory", 3, 10)]
    assert "64 is more than this host's 2 CPUs" in warnings[0].message
    assert "4194304 MiB is more than this host's 2048 MiB of RAM" in warnings[1].message
    assert config_warnings(cfg, cpus=64, memory_mib=8 * 1024 * 1024) == []


def test_cpus_64_on_this_host_validates_with_a_warning(run_cli, tmp_path):
    project = _project(tmp_path, "[vm]\ncpus = 64\n")
    code, out, err = run_cli("validate", cwd=project)
    assert code == 0 and "vm.cpus: 64 is more than this host's" in err
