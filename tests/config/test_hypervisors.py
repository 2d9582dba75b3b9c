"""Which hypervisors can boot a nix-mariner VM, from microvm.nix's runners at the pinned revision.

nix-mariner shares the host's /nix/store over 9p (modules/storage.nix: tag "ro-store", no
proto, so microvm.nix's default "9p") and mariner mounts the workspace over virtiofs. A runner
that throws on either cannot build the VM. The runners need nixpkgs to evaluate, which is not
available here, so the list rests on the source lines below: each must still be in the pinned
sources, so a new pin that changes them fails this test until the list is checked again.
"""

from __future__ import annotations

import pytest

from mariner_dev import model
from mariner_dev.errors import ConfigError
from mariner_dev.config import load_project
from support.upstream import upstream_src

# hypervisor -> (runner file, the lines that decide, whether it boots nix-mariner's shares)
EVIDENCE = {
    "qemu": ("qemu.nix", ['"virtiofs" = [', '"9p" = ['], True),
    "crosvm": ("crosvm.nix", ['"9p" = if readOnly then',
                              'throw "Readonly 9p share is not supported"',
                              '"--vhost-user" "type=fs,socket=${socket}"'], True),
    "cloud-hypervisor": ("cloud-hypervisor.nix",
                         ['throw "cloud-hypervisor supports only shares that are virtiofs"'],
                         False),
    "firecracker": ("firecracker.nix",
                    ['throw "9p/virtiofs shares not implemented for Firecracker"'], False),
    "kvmtool": ("kvmtool.nix", ['throw "virtiofs shares not implemented for kvmtool"'], False),
    # only a "virtiofs" entry in the per-proto attribute set: a 9p share has no attribute
    "stratovirt": ("stratovirt.nix", ['"virtiofs" = [', '}.${proto}) (enumerate 0 shares)'],
                   False),
    "alioth": ("alioth.nix", ['throw "9p shares not implemented for alioth"'], False),
    "vfkit": ("vfkit.nix", ['throw "vfkit does not support ${proto} share.',
                            'throw "vfkit only works on macOS (Darwin).'], False),
}


def test_the_list_rests_on_the_pinned_runners():
    runners = upstream_src() / "microvm.nix" / "lib" / "runners"
    # every runner microvm.nix has is judged here
    assert {p.stem for p in runners.glob("*.nix")} == set(EVIDENCE)
    for hypervisor, (file, lines, _) in EVIDENCE.items():
        text = (runners / file).read_text()
        for line in lines:
            assert line in text, f"{file} no longer has {line!r}: check {hypervisor} again"
    stratovirt = (runners / "stratovirt.nix").read_text()
    assert '"9p"' not in stratovirt
    storage = (upstream_src() / "nix-mariner" / "modules" / "storage.nix").read_text()
    assert 'tag = "ro-store";' in storage and "proto" not in storage


def test_the_model_follows_the_evidence():
    assert model.BOOTABLE_HYPERVISORS == tuple(h for h, (_, _, ok) in EVIDENCE.items() if ok)
    assert set(model.UNBOOTABLE_HYPERVISORS) == {h for h, (_, _, ok) in EVIDENCE.items()
                                                 if not ok}
    assert set(model.HYPERVISORS) == set(EVIDENCE)


@pytest.mark.parametrize("hypervisor", sorted(h for h, (_, _, ok) in EVIDENCE.items() if not ok))
def test_validate_refuses_what_cannot_boot(tmp_path, hypervisor):
    (tmp_path / "mariner.toml").write_text(f'[vm]\nhypervisor = "{hypervisor}"\n')
    with pytest.raises(ConfigError) as info:
        load_project(project_dir=tmp_path)
    text = str(info.value)
    assert "mariner.toml:2:14: vm.hypervisor" in text
    assert model.UNBOOTABLE_HYPERVISORS[hypervisor] in text
    assert 'use "qemu"' in text


@pytest.mark.parametrize("hypervisor", ["qemu", "crosvm"])
def test_validate_accepts_what_boots(tmp_path, hypervisor):
    (tmp_path / "mariner.toml").write_text(f'[vm]\nhypervisor = "{hypervisor}"\n')
    assert load_project(project_dir=tmp_path).vm.hypervisor == hypervisor
