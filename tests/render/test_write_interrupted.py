"""Writing the flake is all or nothing, even when Ctrl-C lands at the worst moment: inside
mkdtemp between its mkdir and its return, or after the previous flake was moved aside."""

from __future__ import annotations

import os
import tempfile

import pytest

from mariner_dev import nixrender
from mariner_dev.config import load_project
from mariner_dev.nixrender import render_flake, write_flake

from render_cases import STUB_KEY


def _rendered(tmp_path, cpus: int):
    project = tmp_path / "proj"
    project.mkdir(exist_ok=True)
    (project / "mariner.toml").write_text(f'[vm]\nname = "w"\ncpus = {cpus}\n'
                                          '[network]\nmode = "user"\n')
    return render_flake(load_project(project_dir=project), cid=5, ssh_port=2222,
                        public_key=STUB_KEY)


def _leftovers(directory):
    return sorted(p.name for p in directory.parent.iterdir() if p.name != directory.name)


def test_an_interrupt_inside_mkdtemp_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "vms" / "flake"
    write_flake(_rendered(tmp_path, 1), out)
    before = (out / "vm.nix").read_text()
    real = tempfile.mkdtemp

    def made_then_interrupted(*args, **kwargs):
        real(*args, **kwargs)          # the directory exists...
        raise KeyboardInterrupt        # ... and the name never reached the caller

    monkeypatch.setattr(nixrender.tempfile, "mkdtemp", made_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_flake(_rendered(tmp_path, 2), out)
    assert _leftovers(out) == []
    assert (out / "vm.nix").read_text() == before


def test_an_interrupt_after_the_old_flake_moved_aside_puts_it_back(tmp_path, monkeypatch):
    out = tmp_path / "vms" / "flake"
    write_flake(_rendered(tmp_path, 1), out)
    before = (out / "vm.nix").read_text()
    real = os.rename

    def interrupted(src, dst):
        if os.path.basename(str(src)).startswith(".flake.new-"):
            raise KeyboardInterrupt    # the old one is aside, the new one not in place yet
        return real(src, dst)

    monkeypatch.setattr(nixrender.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_flake(_rendered(tmp_path, 2), out)
    assert _leftovers(out) == []
    assert (out / "vm.nix").read_text() == before
