"""What the approval gate covers (mariner_dev/approval.py), key by key, without a host: each
setting that acts on the host needs a new approval, the day-to-day ones do not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mariner_dev import approval
from mariner_dev.config import load_project
from mariner_dev.nixrender import read_host_inputs, render_flake

BASE = '[vm]\nname = "api"\n'


@pytest.fixture
def project(tmp_path):
    directory = tmp_path / "api"
    directory.mkdir()
    (directory / "data").mkdir()
    (directory / "nix").mkdir()
    (directory / "nix" / "extra.nix").write_text("{ ... }: { }\n")
    return directory


def _write(project: Path, text: str) -> object:
    (project / "mariner.toml").write_text(text)
    return load_project(project_dir=project)


def _review(project: Path, text: str | None = None):
    cfg = load_project(project_dir=project) if text is None else _write(project, text)
    return approval.review(cfg, read_host_inputs(cfg))


def _approve(project: Path, text: str) -> None:
    cfg = _write(project, text)
    approval.record(cfg, approval.review(cfg, read_host_inputs(cfg)))


GATED = [
    ("vm.name", "", '[vm]\nname = "other"\n'),
    ("vm.hypervisor", "", '[vm]\nhypervisor = "crosvm"\n'),
    ("vm.cid", "", "[vm]\ncid = 9\n"),
    ("network.mode", "", '[network]\nmode = "user"\n'),
    ("network.interface", "", '[network]\ninterface = "microvm-x"\n'),
    ("network.ssh_port", '[network]\nmode = "user"\n',
     '[network]\nmode = "user"\nssh_port = 2222\n'),
    ("nix.mariner", "", '[nix]\nmariner = "github:someone/else"\n'),
    ("nix.modules", "", '[nix]\nmodules = ["nix/extra.nix"]\n'),
    ("shares", "", '[[shares]]\nsource = "data"\ntarget = "/data"\n'),
    ("shares", '[[shares]]\nsource = "data"\ntarget = "/data"\nreadonly = true\n',
     '[[shares]]\nsource = "data"\ntarget = "/data"\nreadonly = false\n'),
    ("ports.forward", "", "[ports]\nforward = [8000]\n"),
]


@pytest.mark.parametrize("key,before,after", GATED, ids=[f"{g[0]}-{i}" for i, g in enumerate(GATED)])
def test_each_setting_that_acts_on_the_host_needs_approval(project, key, before, after):
    def config(extra: str) -> str:
        text = BASE + extra
        if extra.startswith("[vm]"):    # one [vm] table
            text = '[vm]\nname = "api"\n' + extra[len("[vm]\n"):]
            if 'name = "other"' in extra:
                text = extra
        return text

    _approve(project, config(before))
    assert _review(project).approved
    result = _review(project, config(after))
    assert not result.approved
    assert key in [k.key for k in result.keys], result.lines()
    assert key in result.summary()


NOT_GATED = [
    "[vm]\ncpus = 6\nmemory = \"6GiB\"\nuser = \"dev\"\nuid = 1234\ngid = 1234\n",
    '[nix]\npackages = ["ripgrep"]\n',
    '[env]\nDATABASE_URL = "postgres://db"\n',
    '[hooks]\npost_create = "make deps"\npost_start = "make migrate"\n',
    '[workspace]\nmount = "/src/api"\n',
    '[storage]\npersist = "16GiB"\n[docker]\nenable = true\n',
]


@pytest.mark.parametrize("extra", NOT_GATED)
def test_day_to_day_settings_need_no_approval(project, extra):
    _approve(project, BASE)
    text = BASE + extra if not extra.startswith("[vm]") else '[vm]\nname = "api"\n' + extra[5:]
    assert _review(project, text).approved


def test_a_share_directory_swapped_for_a_symlink_is_a_change(project, tmp_path):
    text = BASE + '[[shares]]\nsource = "data"\ntarget = "/data"\n'
    _approve(project, text)
    assert _review(project).approved
    # What code in the VM can do inside the workspace: the same path, another directory.
    secret = tmp_path / "home-of-the-developer"
    secret.mkdir()
    os.rmdir(project / "data")
    (project / "data").symlink_to(secret)
    result = _review(project)
    assert not result.approved and [k.key for k in result.keys] == ["shares"]
    assert str(secret) in result.lines()[1]
    # ... and the flake is rendered with the resolved path that was reviewed.
    cfg = load_project(project_dir=project)
    inputs = read_host_inputs(cfg)
    flake = render_flake(cfg, cid=5, ssh_port=None, public_key="ssh-ed25519 AAAA x", inputs=inputs)
    assert f'source = "{secret}"' in flake.files["vm.nix"].decode()


def test_a_module_directory_is_approved_whole(project):
    module = project / "nix" / "dir"
    module.mkdir()
    (module / "default.nix").write_text("{ imports = [ ./more.nix ]; }\n")
    (module / "more.nix").write_text("{ }\n")
    text = BASE + '[nix]\nmodules = ["nix/dir"]\n'
    _approve(project, text)
    assert _review(project).approved
    (module / "more.nix").write_text('{ microvm.binScripts.tap-up = "id"; }\n')
    result = _review(project)
    assert [(f.rel, f.change) for f in result.files] == [("modules/0-dir/more.nix", "changed")]
    assert '    +{ microvm.binScripts.tap-up = "id"; }' in result.lines()


def test_the_bytes_approved_are_the_bytes_rendered(project):
    """One read: the flake is rendered from the HostInputs the gate checked, so a file
    swapped after the check does not reach the flake."""
    cfg = _write(project, BASE + '[nix]\nmodules = ["nix/extra.nix"]\n')
    inputs = read_host_inputs(cfg)
    approval.gate(cfg, inputs, confirm=lambda review: True)
    (project / "nix" / "extra.nix").write_text('{ microvm.binScripts.tap-up = "id"; }\n')
    flake = render_flake(cfg, cid=5, ssh_port=None, public_key="ssh-ed25519 AAAA x", inputs=inputs)
    assert flake.files["modules/0-extra.nix"] == b"{ ... }: { }\n"
    assert not _review(project).approved


def test_a_declined_review_records_nothing(project):
    cfg = _write(project, BASE)
    with pytest.raises(approval.NotApproved) as info:
        approval.gate(cfg, read_host_inputs(cfg), confirm=lambda review: False)
    assert info.value.exit_code == 2 and "not approved" in str(info.value)
    assert approval.load(project) is None


def test_init_approves_what_it_wrote(run_cli, tmp_path):
    directory = tmp_path / "fresh"
    directory.mkdir()
    code, _out, err = run_cli("init", "-t", "docker", cwd=directory)
    assert code == 0, err
    assert _review(directory).approved


def test_init_does_not_approve_a_module_file_it_did_not_write(run_cli, tmp_path):
    directory = tmp_path / "cloned"
    (directory / "nix").mkdir(parents=True)
    planted = '{ ... }: { microvm.binScripts.tap-up = "id"; }\n'
    (directory / "nix" / "extra.nix").write_text(planted)   # the docker template's module
    code, _out, err = run_cli("init", "-t", "docker", cwd=directory)
    assert code == 0, err
    assert "not all approved" in err
    assert (directory / "nix" / "extra.nix").read_text() == planted
    result = _review(directory)
    assert not result.approved
    assert [(f.rel, f.change) for f in result.files] == [("modules/0-extra.nix", "new")]
    assert not [k for k in result.keys]     # the rest of what it wrote is approved


def test_the_agent_binds_only_approved_forwards(project):
    """exec and sync start the agent with `[ports] forward` on first use: a forward the VM
    added to mariner.toml waits for `mariner trust`, one the developer removed goes at once."""
    _approve(project, BASE + "[ports]\nforward = [8000, 8001]\n")
    cfg = _write(project, BASE + '[ports]\nforward = [8001, "5432:5432"]\n')
    assert approval.approved_forwards(cfg) == [(8001, 8001)]
    approval.revoke(project)
    assert approval.approved_forwards(cfg) == []
