"""Other local users cannot read a VM's volume images.

`microvm -c` makes the VM's state directory readable by everyone (`chmod -R a+rX`, see
upstream/src/microvm.nix/pkgs/microvm-command.nix) and the runner creates missing volume
images with the unit's umask (`touch` + `mkfs` in lib/volumes.nix, after `microvm.preStart`
in the same script, lib/runner.nix): 0644, so any local user could read the VM's disks. The
rendered vm.nix puts a umask and a chmod in front of that script; this runs them as it would.
"""

from __future__ import annotations

import os
import stat
import subprocess

from support.fakehost import fakelib


def test_the_runner_prestart_keeps_images_from_other_users(tmp_path, run_cli):
    project = tmp_path / "api"
    project.mkdir()
    (project / "mariner.toml").write_text('[vm]\nname = "api"\n')
    code, _, err = run_cli("render", "--out", str(tmp_path / "flake"), cwd=project)
    assert code == 0, err
    vm = fakelib.evaluate_vm(tmp_path / "flake" / "vm.nix")
    pre = vm["microvm"]["preStart"]
    assert pre["_type"] == "order"          # lib.mkBefore: ahead of other preStart lines
    state = tmp_path / "state"
    state.mkdir()
    old = state / "persist.img"             # made by an earlier version: 0644
    old.write_bytes(b"\0" * 16)
    old.chmod(0o644)
    # the runner's script: set -eou pipefail, preStart, then createVolumesScript's touch
    script = ("set -eou pipefail\n" + pre["content"]
              + "if [ ! -e nix-store.img ]; then touch nix-store.img; fi\n")
    subprocess.run(["bash", "-c", "umask 022\n" + script], cwd=state, check=True)
    assert stat.S_IMODE(old.stat().st_mode) == 0o640
    assert stat.S_IMODE((state / "nix-store.img").stat().st_mode) == 0o660
    # with no image yet (first start) the loop does nothing and does not fail
    empty = tmp_path / "empty"
    empty.mkdir()
    subprocess.run(["bash", "-c", script], cwd=empty, check=True)
    assert os.listdir(empty) == ["nix-store.img"]
