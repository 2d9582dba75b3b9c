"""Fixtures of the CLI tests: a small project."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def project(tmp_path) -> Path:
    """`proj/` with a user-mode mariner.toml (VM "proj", 1 CPU), its host settings approved,
    and a subdirectory src/deep."""
    directory = tmp_path / "proj"
    (directory / "src" / "deep").mkdir(parents=True)
    (directory / "mariner.toml").write_text('[vm]\nname = "proj"\ncpus = 1\n'
                                            '[network]\nmode = "user"\n')
    from support.approval import approve_host_settings

    approve_host_settings(directory)   # as its developer would (`mariner trust`)
    return directory

