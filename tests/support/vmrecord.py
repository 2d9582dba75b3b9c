"""A VM record as a successful `up` leaves it, for tests that need no host."""

from __future__ import annotations

from pathlib import Path


def register_vm(project: Path, name: str = "proj") -> None:
    """The registry record of a VM that `up` built (created=True), without a host."""
    from mariner_dev.state import Registry, VmRecord

    with Registry().transaction() as vms:
        vms[name] = VmRecord(name=name, project=str(project),
                             config_file=str(project / "mariner.toml"), cid=3,
                             network_mode="user", ssh_port=2299, created=True)
