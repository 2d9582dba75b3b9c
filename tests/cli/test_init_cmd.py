"""`mariner init`: a commented, valid mariner.toml; never overwrites without --force."""

from __future__ import annotations

import json
import tomllib

import pytest

from mariner_dev.config import load_project
from support.fakehost import fakehost  # noqa: F401  (fixture)
from mariner_dev.project import SCHEMA_URL, examples_dir, templates


@pytest.fixture
def project(tmp_path):
    directory = tmp_path / "My App"
    directory.mkdir()
    return directory


def _valid(run_cli, directory):
    code, out, err = run_cli("validate", "--json", cwd=directory)
    assert code == 0, err
    return json.loads(out)["config"]


def test_init_writes_a_commented_file_that_validates(run_cli, project):
    code, out, err = run_cli("init", cwd=project)
    assert code == 0, err
    text = (project / "mariner.toml").read_text()
    assert text.splitlines()[0] == f"#:schema {SCHEMA_URL}"
    assert 'name = "my-app"' in text
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 20
    assert str(project / "mariner.toml") in err and "Traceback" not in err
    assert sorted(p.name for p in project.iterdir()) == ["mariner.toml"]
    assert _valid(run_cli, project)["vm"]["name"] == "my-app"


def test_init_refuses_to_overwrite(run_cli, project):
    (project / "mariner.toml").write_text("[vm]\ncpus = 3\n")
    code, out, err = run_cli("init", cwd=project)
    assert code == 1
    assert "--force" in err and "Traceback" not in err
    assert (project / "mariner.toml").read_text() == "[vm]\ncpus = 3\n"
    code, out, err = run_cli("init", "--force", cwd=project)
    assert code == 0, err
    assert (project / "mariner.toml").read_text().startswith("#:schema")


def test_init_into_a_named_directory(run_cli, project, tmp_path):
    code, _, err = run_cli("init", str(project), cwd=tmp_path)
    assert code == 0, err
    assert (project / "mariner.toml").is_file()
    code, _, err = run_cli("init", str(tmp_path / "missing"), cwd=tmp_path)
    assert code == 2 and "is not a directory" in err
    assert not (tmp_path / "missing").exists()


def test_templates_are_the_examples():
    assert templates() == sorted(p.name for p in examples_dir().iterdir()
                                 if (p / "mariner.toml").is_file())
    assert {"minimal", "webapp", "docker"} <= set(templates())


@pytest.mark.parametrize("template", ["minimal", "webapp", "docker"])
def test_init_from_each_template(run_cli, project, template):
    code, out, err = run_cli("init", "--template", template, cwd=project)
    assert code == 0, err
    text = (project / "mariner.toml").read_text()
    assert text.startswith("#:schema ")
    example = tomllib.loads((examples_dir() / template / "mariner.toml").read_text())
    written = tomllib.loads(text)
    if "name" in example.get("vm", {}):
        example["vm"]["name"] = "my-app"
    assert written == example
    config = _valid(run_cli, project)
    assert config["vm"]["name"] == "my-app"
    cfg = load_project(project_dir=project)
    assert all(m.is_file() or m.is_dir() for m in cfg.nix.modules)


def test_template_files_never_overwrite_the_project(run_cli, project):
    (project / "nix").mkdir()
    (project / "nix" / "extra.nix").write_text("# mine\n{ }\n")
    code, _, err = run_cli("init", "--template", "docker", cwd=project)
    assert code == 0, err
    assert (project / "nix" / "extra.nix").read_text() == "# mine\n{ }\n"
    assert (project / "datasets").is_dir()


def test_unknown_template_is_bad_usage(run_cli, project):
    code, out, err = run_cli("init", "--template", "nope", cwd=project)
    assert code == 2
    assert "minimal" in err and "Traceback" not in err
    assert list(project.iterdir()) == []
    (project / "mariner.toml").write_text("keep")
    code, _, _ = run_cli("init", "--template", "nope", "--force", cwd=project)
    assert code == 2 and (project / "mariner.toml").read_text() == "keep"


@pytest.mark.parametrize("template", templates())
def test_each_template_validates_renders_builds_and_its_hooks_have_their_files(
        run_cli, tmp_path, template, fakehost):
    """A project from each template: valid, rendered, built by the fake host (which evaluates
    the flake with the real nix-instantiate), and every file or make target its hooks use is
    in the new project."""
    import re
    import shlex

    directory = tmp_path / "my-app"
    directory.mkdir()
    code, _, err = run_cli("init", "--template", template, cwd=directory)
    assert code == 0, err
    cfg = load_project(project_dir=directory)
    code, out, err = run_cli("render", cwd=directory)
    assert code == 0, err
    flake = out.strip()
    build = fakehost.run("microvm", "-c", cfg.name, "-f", f"path:{flake}")
    assert build.returncode == 0, build.stderr
    for hook in (cfg.hooks.post_create, cfg.hooks.post_start):
        if not hook:
            continue
        words = shlex.split(hook)
        if words[0] == "make":
            makefile = directory / "Makefile"
            assert makefile.is_file(), f"{template}: `{hook}` needs a Makefile"
            text = makefile.read_text()
            for target in [w for w in words[1:] if not w.startswith("-")]:
                assert re.search(rf"^{re.escape(target)}:", text, re.MULTILINE), (template, hook)
            for used in re.findall(r"[\w./-]+\.(?:txt|toml|cfg|json|lock|sh)\b", text):
                assert (directory / used).exists(), f"{template}: Makefile uses {used}"
        for word in words[1:]:
            if "/" in word or re.search(r"\.\w+$", word):
                assert (directory / word).exists(), f"{template}: `{hook}` uses {word}"
