"""What a VM gets once, at creation, survives later `up`s: the flake's lock, its disk sizes."""

from __future__ import annotations

import json
import os
from pathlib import Path


def flake_dir(project) -> Path:
    return Path(os.environ["MARINER_HOME"]) / "vms" / project.name / "flake"


def test_the_flake_lock_is_kept_and_is_not_drift(project):
    project.up_json()
    lock = flake_dir(project) / "flake.lock"
    assert lock.is_file(), "the fake host writes flake.lock like `microvm -c` does"
    locked = lock.read_bytes()
    assert project.status_json()["outdated"] is False
    # a no-op up, a render and a rebuild all keep the lock Nix wrote
    project.clear_log()
    assert not project.up_json()["updated"]
    assert project.changing_calls() == []
    assert lock.read_bytes() == locked
    project.mariner("render", check=0)
    assert lock.read_bytes() == locked
    project.write(cpus=3)
    assert project.up_json()["updated"]
    assert lock.read_bytes() == locked
    assert project.status_json()["outdated"] is False


def test_a_storage_change_is_no_rebuild_and_says_how_to_get_it(project):
    project.up_json()
    project.write('[storage]\npersist = "1GiB"\n')
    status = project.status_json()
    assert status["outdated"] is False and status["changed_keys"] == []
    note = next(n for n in status["notes"] if "[storage] persist" in n)
    assert "applies only to a newly created disk" in note
    assert "`mariner destroy` then `mariner up`" in note and "loses the data" in note
    project.clear_log()
    proc = project.mariner("up", check=0)
    assert project.changing_calls() == []
    assert "[storage] persist = 1024 MiB applies only to a newly created disk" in proc.stderr
    # the rendered flake still describes the disk as it is
    vm_nix = (flake_dir(project) / "vm.nix").read_text()
    assert "mariner.storage.persistSizeMiB = 8192;" in vm_nix
    built = json.loads((flake_dir(project) / "mariner.json").read_text())["config"]
    assert built["storage"]["persist_mib"] == 8192


def test_a_vm_built_with_the_old_default_memory_keeps_it(project):
    """A VM that an older mariner built with its 2048 MiB default is not rebuilt and restarted
    by an upgrade; setting [vm] memory applies."""
    import dataclasses

    from mariner_dev.config import load_project
    from mariner_dev.keys import public_key_for
    from mariner_dev.developer import developer
    from mariner_dev.nixrender import ShareIdentity, render_flake
    from mariner_dev.state import Registry

    project.up_json()
    cfg = load_project(project_dir=project.dir)
    assert cfg.vm.memory_mib == 4096 and "vm.memory" in cfg.defaulted
    with Registry().transaction() as vms:  # what the older mariner recorded
        record = vms[project.name]
        dev = developer(cfg.project_dir)   # as project.render_for: shares served as the developer
        old = render_flake(dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, memory_mib=2048)),
                           cid=record.cid, ssh_port=record.ssh_port,
                           public_key=public_key_for(cfg),
                           share_identity=None if cfg.backend == "runner" else
                           ShareIdentity(dev.uid, dev.gid, cfg.vm.uid, cfg.vm.gid))
        built = dict(old.metadata["config"])
        del built["defaulted"]
        record.built_hash, record.built_config = old.hash, built
    status = project.status_json()
    assert status["outdated"] is False
    assert any("keeps the 2048 MiB of memory it was built with" in n for n in status["notes"])
    project.clear_log()
    project.up_json()
    assert project.changing_calls() == []
    assert "microvm.mem = 2048;" in (flake_dir(project) / "vm.nix").read_text()
    project.write(memory="4GiB")
    status = project.status_json()
    assert status["outdated"] is True and "vm.memory_mib" in status["changed_keys"]
    assert project.up_json()["updated"]
    assert "microvm.mem = 4096;" in (flake_dir(project) / "vm.nix").read_text()
