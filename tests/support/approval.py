"""Approving a test project's host settings, as `mariner trust --yes` would: the one place the
fixtures that run `mariner up` use, so that a test that rewrites mariner.toml still reaches the
host. Tests of the gate itself (tests/trust) call `mariner trust` instead."""

from __future__ import annotations

from pathlib import Path


def approve_host_settings(project_dir: Path) -> None:
    """Record the approval of the project's current host settings (module bytes included)."""
    from mariner_dev import approval
    from mariner_dev.config import load_project
    from mariner_dev.nixrender import read_host_inputs

    cfg = load_project(project_dir=Path(project_dir))
    approval.record(cfg, approval.review(cfg, read_host_inputs(cfg)))
