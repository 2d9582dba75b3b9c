"""Golden renders of representative projects; determinism and the drift hash.

Regenerate the golden files with `MARINER_UPDATE_GOLDEN=1 scripts/test tests/render` and review
the diff like code.
"""

from __future__ import annotations

import difflib
import os
import shutil

import pytest

from mariner_dev.config import load_project
from mariner_dev.nixrender import render_flake
from render_cases import GOLDEN, SPEC_NAMES, SPECS, STUB_KEY, isolated, normalise, rendered  # noqa: F401

UPDATE = os.environ.get("MARINER_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_golden(rendered, name):  # noqa: F811
    r = rendered[name]
    files = normalise(r, r.directory.parent.parent)
    golden = GOLDEN / name
    if UPDATE:
        shutil.rmtree(golden, ignore_errors=True)
        for rel, data in files.items():
            (golden / rel).parent.mkdir(parents=True, exist_ok=True)
            (golden / rel).write_bytes(data)
    assert golden.is_dir(), f"no golden render for {name}: run with MARINER_UPDATE_GOLDEN=1"
    expected = {p.relative_to(golden).as_posix(): p.read_bytes()
                for p in sorted(golden.rglob("*")) if p.is_file()}
    assert sorted(files) == sorted(expected)
    for rel in files:
        if files[rel] != expected[rel]:
            diff = "".join(difflib.unified_diff(
                expected[rel].decode().splitlines(True), files[rel].decode().splitlines(True),
                f"golden/{name}/{rel}", f"rendered/{rel}"))
            pytest.fail(f"{name}/{rel} differs from the golden file "
                        f"(MARINER_UPDATE_GOLDEN=1 to accept):\n{diff}")


def test_golden_files_do_not_depend_on_the_machine():
    texts = [p.read_text() for p in GOLDEN.rglob("*") if p.is_file()]
    assert texts
    for text in texts:
        assert "/tmp" not in text and "pytest" not in text
        assert "x86_64-linux" not in text and "aarch64-linux" not in text


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_rendering_is_deterministic(rendered, name):  # noqa: F811
    """A second load and render of the same project gives byte-identical files and hash."""
    r = rendered[name]
    with pytest.MonkeyPatch.context() as mp:
        isolated(mp, r.directory.parent.parent)
        again = render_flake(load_project(project_dir=r.project), cid=r.spec.cid,
                             ssh_port=r.spec.ssh_port, public_key=STUB_KEY)
    assert again.files == r.flake.files
    assert again.hash == r.flake.hash
    on_disk = {p.relative_to(r.directory).as_posix(): p.read_bytes()
               for p in r.directory.rglob("*") if p.is_file()}
    assert on_disk == r.flake.files


def test_modules_are_copied_into_the_flake(rendered):  # noqa: F811
    r = rendered["modules"]
    src = r.project / "nix"
    assert r.flake.files["modules/0-extra-module.nix"] == (src / "extra module.nix").read_bytes()
    assert r.flake.files["modules/1-dirmod/default.nix"] == (src / "dirmod/default.nix").read_bytes()
    assert r.flake.files["modules/1-dirmod/helper.nix"] == (src / "dirmod/helper.nix").read_bytes()
    flake = r.flake.files["flake.nix"].decode()
    assert "./modules/0-extra-module.nix" in flake and "./modules/1-dirmod\n" in flake
    docker = rendered["example-docker"]
    assert docker.flake.files["modules/0-extra.nix"] == (
        docker.project / "nix" / "extra.nix").read_bytes()


BASE = """
[vm]
name = "hashed"
cpus = 2
memory = "3GiB"

[env]
A = "1"

[nix]
packages = ["git"]
modules = ["extra.nix"]

[[shares]]
source = "data"
target = "/data"
"""

SAME = {
    "comment and blank lines": BASE.replace("[env]", "# a comment\n\n[env]  # trailing"),
    "keys reordered": BASE.replace('cpus = 2\nmemory = "3GiB"', 'memory = "3GiB"\ncpus = 2'),
    "size spelled differently": BASE.replace('memory = "3GiB"', "memory = 3072"),
    "hook added (not part of the VM)": BASE + '\n[hooks]\npost_start = "make"\n',
}
DIFFERENT = {
    "cpus": BASE.replace("cpus = 2", "cpus = 3"),
    "env value": BASE.replace('A = "1"', 'A = "2"'),
    "package": BASE.replace('["git"]', '["git", "jq"]'),
    "share writable": BASE + "readonly = false\n",
    "network mode": BASE + '\n[network]\nmode = "user"\n',
}


def _render(project, text=None, *, cid=5, key=STUB_KEY):
    if text is not None:
        (project / "mariner.toml").write_text(text)
    cfg = load_project(project_dir=project)
    ssh_port = 2222 if cfg.network.mode == "user" else None
    return render_flake(cfg, cid=cid, ssh_port=ssh_port, public_key=key)


def test_hash_changes_with_the_vm_and_not_otherwise(tmp_path):
    # one project directory for every variant: the hash covers the share's absolute source
    project = tmp_path / "hashed"
    (project / "data").mkdir(parents=True)
    (project / "extra.nix").write_text("{ }\n")
    base = _render(project, BASE)
    for label, text in SAME.items():
        again = _render(project, text)
        assert again.hash == base.hash, label
        assert {k: v for k, v in again.files.items() if k != "mariner.json"} == {
            k: v for k, v in base.files.items() if k != "mariner.json"}, label
    hashes = {label: _render(project, text).hash for label, text in DIFFERENT.items()}
    assert base.hash not in hashes.values(), hashes
    assert len(set(hashes.values())) == len(DIFFERENT)
    (project / "mariner.toml").write_text(BASE)
    assert _render(project, cid=6).hash != base.hash
    assert _render(project, key=STUB_KEY.replace("stub", "other")).hash != base.hash
    (project / "extra.nix").write_text("{ services.foo.enable = true; }\n")
    assert _render(project).hash != base.hash
    (project / "extra.nix").write_text("{ }\n")
    assert _render(project).hash == base.hash
