"""Shared test helpers: the repository root and tools that must exist (never skipped)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
SHARED = REPO.parent / "shared"


def require_tool(name: str) -> str:
    """The tool's path; a missing tool fails the test (never skips: CI installs them all)."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        pytest.fail(f"{name} is not installed: run .ci/run as root, or install it "
                    f"(Debian: nix-bin, openssh-server, openssh-client, tmux, rsync, git)")
    return path
