"""A plain (non-editable) `pip install .` into a fresh venv gives a working `mariner`.

One test, and a slow one (it builds the wheel and installs the dependencies from PyPI): it
runs in every suite run, never skipped, because the packaging is part of the product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(argv, *, env, cwd, timeout=900):
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_wheel_installs_and_runs_from_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=os.environ.copy(), cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # a cache outside HOME, kept between runs on one machine: the test stays isolated and fast
    env["PIP_CACHE_DIR"] = os.environ.get("MARINER_TEST_PIP_CACHE") or str(
        Path(tempfile.gettempdir()) / f"mariner-test-pip-cache-{os.getuid()}")
    _run([str(venv / "bin" / "pip"), "install", "-q", str(REPO)], env=env, cwd=tmp_path)

    python = str(venv / "bin" / "python")
    where = json.loads(_run([python, "-c", (
        "import json, mariner_dev, mariner_dev.schema as s, mariner_dev.project as p;"
        "print(json.dumps([mariner_dev.__file__, str(s.schema_path()), str(p.examples_dir())]))")],
        env=env, cwd=tmp_path).stdout)
    site = venv / "lib"
    for path in where:                      # the installed copy, not the checkout
        assert Path(path).is_relative_to(site), where
    schema = Path(where[1])
    assert schema.name == "mariner.schema.json" and schema.parent.name == "mariner_dev"
    assert schema.read_bytes() == (REPO / "schema" / "mariner.schema.json").read_bytes()

    mariner = str(venv / "bin" / "mariner")
    help_text = _run([mariner, "--help"], env=env, cwd=tmp_path).stdout
    for command in ("init", "validate", "render"):
        assert command in help_text
    project = tmp_path / "fresh project"
    project.mkdir()
    _run([mariner, "init"], env=env, cwd=project)
    data = json.loads(_run([mariner, "validate", "--json"], env=env, cwd=project).stdout)
    assert data["valid"] is True and data["config"]["vm"]["name"] == "fresh-project"
    # the examples ship too: a template with a module and a share works from the wheel
    _run([mariner, "init", "--force", "--template", "docker"], env=env, cwd=project)
    data = json.loads(_run([python, "-m", "mariner_dev", "validate", "--json"], env=env,
                           cwd=project).stdout)
    assert data["valid"] is True and data["config"]["docker_enable"] is True


def test_readme_reads_top_to_bottom_for_a_newcomer():
    """What mariner is and what the host needs, then install, quick start, commands, the
    config, a host that is not ready, troubleshooting; development and tests last. Exactly two
    set-up commands: install-and-run, and the whole test suite (which .ci/run calls)."""
    import re

    readme = (REPO / "README.md").read_text()
    sections = re.findall(r"^## (.+)$", readme, re.MULTILINE)
    order = ["What your host needs first", "Install", "Quick start", "Commands",
             "mariner.toml", "When the host is not ready", "Troubleshooting"]
    positions = [sections.index(name) for name in order]
    assert positions == sorted(positions), sections
    assert sections[-1] == "Development and tests"
    setup = re.findall(r"^```sh\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert setup == ["pipx install . && cd ~/src/myproject && mariner init && mariner up\n",
                     "scripts/test\n"]
    assert "not on a package index yet" in readme
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()
