"""`mariner render [--out DIR]`: prints the flake directory; writes it atomically."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from mariner_dev.errors import MarinerError
from mariner_dev.nixrender import RenderedFlake, write_flake


def _project(tmp_path, text='[vm]\nname = "api"\n'):
    directory = tmp_path / "api"
    directory.mkdir()
    (directory / "mariner.toml").write_text(text)
    return directory


def _home() -> Path:
    return Path(os.environ["MARINER_HOME"])


def test_render_to_the_default_place(run_cli, tmp_path):
    from support.approval import approve_host_settings

    project = _project(tmp_path)
    approve_host_settings(project)   # else it goes beside it (tests/lifecycle/test_trust_gate.py)
    code, out, err = run_cli("render", cwd=project)
    assert code == 0, err
    flake = _home() / "vms" / "api" / "flake"
    assert out == f"{flake}\n"
    assert sorted(p.name for p in flake.iterdir()) == ["flake.nix", "mariner.json", "vm.nix"]
    meta = json.loads((flake / "mariner.json").read_text())
    assert meta["name"] == "api" and 3 <= meta["cid"] <= 254 and meta["ssh_port"] is None
    # mariner's own key: generated on first use, private 0600 in a 0700 directory, authorized
    key = _home() / "keys" / "id_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    public = key.with_name("id_ed25519.pub").read_text().strip()
    assert f'mariner.ssh.authorizedKey = "{public}";' in (flake / "vm.nix").read_text()
    # a second render of the same config keeps the same cid and the same files
    before = {p.name: p.read_bytes() for p in flake.iterdir()}
    code, out2, _ = run_cli("render", cwd=project)
    assert code == 0 and out2 == out
    assert {p.name: p.read_bytes() for p in flake.iterdir()} == before


def test_render_with_out_and_user_identity(run_cli, tmp_path):
    project = _project(tmp_path, '[vm]\nname = "api"\n[network]\nmode = "user"\n')
    user_config = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
    user_config.parent.mkdir(parents=True)
    user_config.write_text('[ssh]\nidentity = "~/.ssh/mine"\n')
    ssh = Path.home() / ".ssh"
    ssh.mkdir()
    (ssh / "mine").write_text("private")
    (ssh / "mine.pub").write_text("ssh-ed25519 AAAAmine me@laptop\n")
    code, out, err = run_cli("render", "--out", "out/flake", cwd=project)
    assert code == 0, err
    assert out == f"{project / 'out' / 'flake'}\n"
    vm = (project / "out" / "flake" / "vm.nix").read_text()
    assert 'mariner.ssh.authorizedKey = "ssh-ed25519 AAAAmine me@laptop";' in vm
    meta = json.loads((project / "out" / "flake" / "mariner.json").read_text())
    assert isinstance(meta["ssh_port"], int) and f"port = {meta['ssh_port']};" in vm
    assert not (_home() / "keys").exists()       # no key generated when the user brings one
    assert not (_home() / "vms" / "api" / "flake").exists()


def test_render_replaces_the_whole_directory_it_created(run_cli, tmp_path):
    project = _project(tmp_path)
    out = tmp_path / "flake"
    code, _, err = run_cli("render", "--out", str(out), cwd=project)
    assert code == 0, err
    (out / "stale.nix").write_text("old")
    code, _, err = run_cli("render", "--out", str(out), cwd=project)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["flake.nix", "mariner.json", "vm.nix"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def test_render_out_dot_in_a_project_destroys_nothing(run_cli, tmp_path):
    project = _project(tmp_path)
    (project / "src").mkdir()
    (project / "src" / "main.py").write_text("print('hi')\n")
    before = _tree(project)
    for out in (".", str(project)):
        code, stdout, err = run_cli("render", "--out", out, cwd=project)
        assert code == 2 and stdout == "", err
        assert "holds a mariner.toml" in err and "nothing was changed" in err
        assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert _tree(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api"]   # nothing moved aside
    assert not (_home() / "registry.json").exists()                 # refused before reserving


def test_render_refuses_a_non_empty_directory_it_did_not_create(run_cli, tmp_path):
    project = _project(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    # a marker planted inside the directory (the VM can write the project) does not count
    (out / "mariner.json").write_text('{"name": "api"}')
    code, stdout, err = run_cli("render", "--out", str(out), cwd=project)
    assert code == 2 and stdout == "" and "was not created by `mariner render`" in err
    assert sorted(p.name for p in out.iterdir()) == ["mariner.json", "notes.txt"]
    # an empty directory is fine, and from then on it is mariner's
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("render", "--out", str(empty), cwd=project)[0] == 0
    assert (empty / "flake.nix").is_file()


def test_render_refuses_a_directory_swapped_at_the_recorded_path(run_cli, tmp_path):
    project = _project(tmp_path)
    out = tmp_path / "flake"
    assert run_cli("render", "--out", str(out), cwd=project)[0] == 0
    # the recorded directory is replaced by another one (another inode) with the user's data
    out.rename(tmp_path / "old")
    out.mkdir()
    (out / "data.txt").write_text("precious")
    code, _, err = run_cli("render", "--out", str(out), cwd=project)
    assert code == 2 and "was not created by `mariner render`" in err
    assert (out / "data.txt").read_text() == "precious"
    # a symlink is never followed into replacing what it points at
    link = tmp_path / "link"
    link.symlink_to(project)
    code, _, err = run_cli("render", "--out", str(link), cwd=project)
    assert code == 2 and "symlink" in err
    assert link.is_symlink() and (project / "mariner.toml").is_file()


def test_a_directory_swapped_while_rendering_is_put_back(tmp_path):
    from mariner_dev.project import _still_replaceable

    target = tmp_path / "flake"
    good = RenderedFlake("x", {"flake.nix": b"{ }\n"}, "h1", {})
    write_flake(good, target)
    other = tmp_path / "other"
    other.mkdir()
    (other / "mariner.toml").write_text("[vm]\n")
    st = target.stat()
    target.rename(tmp_path / "moved")
    other.rename(target)      # the swap happens after the check, before the move aside
    with pytest.raises(MarinerError, match="changed while") as info:
        write_flake(RenderedFlake("x", {"flake.nix": b"new\n"}, "h2", {}), target,
                    may_replace=lambda moved: _still_replaceable(target, moved,
                                                                 (st.st_dev, st.st_ino)))
    assert info.value.exit_code == 2
    assert (target / "mariner.toml").read_text() == "[vm]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flake", "moved"]


def test_render_to_an_unwritable_place_fails_cleanly(run_cli, tmp_path):
    project = _project(tmp_path)
    (tmp_path / "afile").write_text("x")
    code, out, err = run_cli("render", "--out", str(tmp_path / "afile"), cwd=project)
    assert code == 2 and out == "" and "not a directory" in err and "Traceback" not in err
    code, out, err = run_cli("render", "--out", str(tmp_path / "afile" / "sub"), cwd=project)
    assert code == 1 and out == "" and "cannot write the flake" in err
    assert "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x"


def test_write_flake_is_all_or_nothing(tmp_path):
    target = tmp_path / "flake"
    good = RenderedFlake("x", {"flake.nix": b"{ }\n", "vm.nix": b"{ }\n"}, "h1", {})
    write_flake(good, target)
    # "a" is a file and "a/b" needs it to be a directory: the write fails half-way
    broken = RenderedFlake("x", {"flake.nix": b"new\n", "a": b"1", "a/b": b"2"}, "h2", {})
    with pytest.raises(MarinerError, match="cannot write the flake"):
        write_flake(broken, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == good.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flake"]   # no staging left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(MarinerError):
        write_flake(broken, fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flake"]   # no partial directory


def test_invalid_config_renders_nothing(run_cli, tmp_path):
    project = _project(tmp_path, "[vm]\ncpus = 0\n")
    code, out, err = run_cli("render", cwd=project)
    assert code == 2 and out == "" and "vm.cpus" in err
    assert not _home().exists()


def test_examples_render_parse_and_evaluate(run_cli, tmp_path):
    """The three examples/ projects through the real command, then through Nix."""
    from mariner_dev.project import examples_dir
    from render.render_cases import eval_flakes, nix_parse

    flakes = {}
    for example in ("minimal", "webapp", "docker"):
        code, out, err = run_cli("-C", str(examples_dir() / example), "render",
                                 "--out", str(tmp_path / example))
        assert code == 0, (example, err)
        flakes[example] = Path(out.strip())
    nix_parse([p for d in flakes.values() for p in d.rglob("*.nix")])
    results = eval_flakes(flakes)
    assert {name: r["names"] for name, r in results.items()} == {
        "minimal": ["minimal"], "webapp": ["webapp"], "docker": ["docker-lab"]}
    cids = {r["vm"]["mariner"]["cid"] for r in results.values()}
    assert len(cids) == 3 and all(3 <= c <= 254 for c in cids)   # allocated, unique
    assert results["webapp"]["vm"]["microvm"]["forwardPorts"][0]["host"]["address"] == "127.0.0.1"
    assert results["docker"]["vm"]["mariner"]["docker"]["enable"] is True
