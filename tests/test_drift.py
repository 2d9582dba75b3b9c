"""What an existing VM keeps (drift.settle): disk sizes, an old default; half-applied changes."""

from __future__ import annotations

from pathlib import Path

from mariner_dev.config import load_project
from mariner_dev.drift import settle
from mariner_dev.nixrender import render_flake

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHN0dWIga2V5IGZvciBtYXJpbmVyIHRlc3Rz test@drift"


def load(tmp_path: Path, text: str):
    (tmp_path / "mariner.toml").write_text('[vm]\nname = "drift"\nuid = 1000\ngid = 100\n' + text)
    return load_project(project_dir=tmp_path)


def render(cfg):
    return render_flake(cfg, cid=9, ssh_port=None, public_key=KEY)


def built_from(cfg) -> dict:
    return render(cfg).metadata["config"]


def test_a_new_vm_gets_the_config_as_written(tmp_path):
    cfg = load(tmp_path, "[storage]\npersist = 1024\n")
    assert settle(cfg, None).cfg is cfg


def test_storage_sizes_are_kept_and_are_not_drift(tmp_path):
    old = load(tmp_path, "")
    built = built_from(old)
    new = load(tmp_path, '[storage]\npersist = "1GiB"\nnix_store = 4096\ndocker = 1024\n')
    settled = settle(new, built)
    assert settled.cfg.storage == old.storage
    assert render(settled.cfg).hash == render(old).hash          # no rebuild, no restart
    assert render(new).hash != render(old).hash                  # (it would have been drift)
    persist, nix_store = settled.notes
    assert "[storage] persist = 1024 MiB applies only to a newly created disk" in persist
    assert "keeps its 8192 MiB persist.img" in persist
    assert "`mariner destroy` then `mariner up` recreates it" in persist
    assert "loses the data" in persist
    assert "nix-store.img" in nix_store
    # docker.img was never made (docker off): its size means nothing yet, and is no drift
    assert not any("docker" in note for note in settled.notes)
    enabled = load(tmp_path, '[docker]\nenable = true\n[storage]\ndocker = 1024\n')
    assert settle(enabled, built).cfg.storage.docker_mib == 1024   # made at this size
    assert settled.warnings == []


def test_a_docker_volume_that_exists_keeps_its_size(tmp_path):
    old = load(tmp_path, "[docker]\nenable = true\n")
    new = load(tmp_path, '[docker]\nenable = true\n[storage]\ndocker = "64GiB"\n')
    settled = settle(new, built_from(old))
    assert settled.cfg.storage.docker_mib == old.storage.docker_mib
    assert any("docker.img" in note for note in settled.notes)


def test_other_changes_are_still_drift(tmp_path):
    old = load(tmp_path, "")
    new = load(tmp_path, '[storage]\npersist = 1024\n[env]\nA = "1"\n')
    settled = settle(new, built_from(old))
    assert settled.cfg.env == (("A", "1"),)
    assert render(settled.cfg).hash != render(old).hash


def test_a_vm_built_with_the_old_default_keeps_its_memory(tmp_path):
    # An older mariner rendered 2048 MiB for a file without a memory line and recorded no
    # `defaulted` key (2048 with qemu is refused today, so the record is made by hand).
    (tmp_path / "mariner.toml").write_text('[vm]\nname = "drift"\nuid = 1000\ngid = 100\n'
                                           'hypervisor = "crosvm"\nmemory = 2048\n')
    old = load_project(project_dir=tmp_path)
    built = built_from(old)
    del built["defaulted"]
    built["vm"]["hypervisor"] = "qemu"
    new = load(tmp_path, "")
    assert new.vm.memory_mib == 4096 and "vm.memory" in new.defaulted
    settled = settle(new, built)
    assert settled.cfg.vm.memory_mib == 2048
    (note,) = settled.notes
    assert "keeps the 2048 MiB of memory it was built with" in note
    assert "set [vm] memory in mariner.toml to change it" in note
    assert "microvm.nix issue 171" in note and 'memory = "4GiB"' in note


def test_memory_written_in_mariner_toml_always_applies(tmp_path):
    (tmp_path / "mariner.toml").write_text('[vm]\nname = "drift"\nhypervisor = "crosvm"\n'
                                           'memory = 2048\n')
    built = built_from(load_project(project_dir=tmp_path))
    del built["defaulted"]
    new = load(tmp_path, 'memory = "4GiB"\n')
    settled = settle(new, built)
    assert settled.cfg.vm.memory_mib == 4096 and settled.notes == []


def test_an_explicit_size_removed_later_takes_the_default(tmp_path):
    old = load(tmp_path, 'memory = "8GiB"\n')
    new = load(tmp_path, "")
    settled = settle(new, built_from(old))
    assert settled.cfg.vm.memory_mib == 4096 and settled.notes == []


def test_a_vm_built_with_todays_default_follows_a_future_one(tmp_path):
    """Recorded as defaulted: it keeps what it was built with when the default moves again."""
    old = load(tmp_path, "")
    built = built_from(old)
    assert built["defaulted"] == ["vm.memory"]
    built["vm"]["memory_mib"] = 3000   # as if the default had been 3000 then
    settled = settle(load(tmp_path, ""), built)
    assert settled.cfg.vm.memory_mib == 3000


def test_a_new_uid_warns_about_the_old_home(tmp_path):
    old = load(tmp_path, "")
    (tmp_path / "mariner.toml").write_text('[vm]\nname = "drift"\nuid = 1500\ngid = 1500\n')
    new = load_project(project_dir=tmp_path)
    settled = settle(new, built_from(old))
    (warning,) = settled.warnings
    assert "now 1500:1500 (were 1000:100)" in warning
    assert "/persist/home/vm keep their old owner" in warning
    assert "sudo chown -R 1500:1500 /persist/home/vm" in warning
    assert render(settled.cfg).hash != render(old).hash  # still drift: it is rebuilt


def test_a_new_user_warns_about_the_old_home(tmp_path):
    old = load(tmp_path, "")
    new = load(tmp_path, 'user = "dev"\n')
    (warning,) = settle(new, built_from(old)).warnings
    assert "/persist/home/dev" in warning and "/persist/home/vm and its files stay" in warning
