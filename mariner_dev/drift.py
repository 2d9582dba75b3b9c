"""What an existing VM is rebuilt from: the config, minus the changes that cannot apply to it.

Some settings only take effect when something is created. nix-mariner's volumes get their
size when their image is first made (microvm.nix never resizes an image), so a changed
`[storage]` size would rebuild and restart the VM to no effect. And a default that a newer
mariner changed (the memory: 2048 MiB before, nix-mariner's 4096 MiB now) must not rebuild
and restart a running VM by itself. `settle` keeps the values the VM was built with in both
cases, so they are not drift, and says what the user can do instead. Changes that apply only
in part (a new guest user or uid leaves the old home's files with their old owner) are drift,
with a warning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import model as m

# Defaults an existing VM keeps while mariner.toml leaves the key unset: key -> the default of
# the mariners that did not record which keys were defaulted (registries written before).
LEGACY_DEFAULTS = {"vm.memory": 2048}
# [storage] key -> (StorageSettings field, the image nix-mariner makes for it)
VOLUMES = {"persist": ("persist_mib", "persist.img"),
           "nix_store": ("nix_store_mib", "nix-store.img"),
           "docker": ("docker_mib", "docker.img")}


@dataclass
class Settled:
    """The config to build an existing VM from, and what the user should know about it."""

    cfg: m.ProjectConfig
    notes: list[str] = field(default_factory=list)      # changes kept back, and how to get them
    warnings: list[str] = field(default_factory=list)   # changes that apply only in part


def settle(cfg: m.ProjectConfig, built: dict | None) -> Settled:
    """`cfg` for a VM built from the resolved config `built` (None: not built, nothing kept)."""
    if not built:
        return Settled(cfg)
    result = Settled(cfg)
    _keep_memory(result, built)
    _keep_volume_sizes(result, built)
    _warn_half_applied(result, built)
    return result


def _was_defaulted(key: str, built: dict, built_value) -> bool:
    if "defaulted" in built:
        return key in built["defaulted"]
    return built_value == LEGACY_DEFAULTS.get(key)


def _keep_memory(result: Settled, built: dict) -> None:
    cfg = result.cfg
    built_mib = (built.get("vm") or {}).get("memory_mib")
    if (not isinstance(built_mib, int) or built_mib == cfg.vm.memory_mib
            or "vm.memory" not in cfg.defaulted
            or not _was_defaulted("vm.memory", built, built_mib)):
        return
    note = (f"VM {cfg.name!r} keeps the {built_mib} MiB of memory it was built with (mariner's "
            f"default is now {cfg.vm.memory_mib} MiB); set [vm] memory in mariner.toml to "
            f"change it")
    if built_mib == 2048 and cfg.vm.hypervisor == "qemu":
        note += (": QEMU can hang at boot with exactly 2048 MiB (microvm.nix issue 171), so "
                 f'memory = "{cfg.vm.memory_mib // 1024}GiB" is the better choice')
    result.notes.append(note)
    result.cfg = dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, memory_mib=built_mib))


def _keep_volume_sizes(result: Settled, built: dict) -> None:
    cfg = result.cfg
    storage = built.get("storage") or {}
    kept = {}
    for key, (attr, image) in VOLUMES.items():
        built_mib = storage.get(attr)
        wanted = getattr(cfg.storage, attr)
        if not isinstance(built_mib, int) or built_mib == wanted:
            continue
        if key == "docker" and not built.get("docker_enable"):
            # No docker.img was made: its size applies when docker is enabled, and means
            # nothing (so is no reason to rebuild) until then.
            if not cfg.docker_enable:
                kept[attr] = built_mib
            continue
        kept[attr] = built_mib
        result.notes.append(
            f"[storage] {key} = {wanted} MiB applies only to a newly created disk: VM "
            f"{cfg.name!r} keeps its {built_mib} MiB {image}. `mariner destroy` then "
            f"`mariner up` recreates it at the new size, and loses the data on it")
    if kept:
        result.cfg = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, **kept))


def _warn_half_applied(result: Settled, built: dict) -> None:
    vm, old = result.cfg.vm, built.get("vm") or {}
    old_user, old_uid, old_gid = old.get("user"), old.get("uid"), old.get("gid")
    if old_user is None:
        return
    if old_user != vm.user:
        result.warnings.append(
            f"[vm] user is now {vm.user!r} (was {old_user!r}): the new user starts with an "
            f"empty /persist/home/{vm.user}; /persist/home/{old_user} and its files stay, "
            f"owned by uid {old_uid}")
    elif (old_uid, old_gid) != (vm.uid, vm.gid):
        result.warnings.append(
            f"[vm] uid/gid of {vm.user!r} are now {vm.uid}:{vm.gid} (were {old_uid}:{old_gid}): "
            f"the files already in /persist/home/{vm.user} keep their old owner (systemd-tmpfiles "
            f"does not chown an existing home's contents); after the restart, fix them with "
            f"`mariner exec -- sudo chown -R {vm.uid}:{vm.gid} /persist/home/{vm.user}`")
