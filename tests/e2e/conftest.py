"""The e2e tier: mariner driven against real VMs under QEMU (realhost.py boots them from the
image that image.py builds; realvm.py is what the tests hold).

These tests run only with MARINER_E2E=1, which scripts/e2e sets together with
MARINER_E2E_CACHE (where the image is cached, outside the repository) and MARINER_E2E_ACCEL.
Anywhere else they are deselected, never skipped: `scripts/test` shows them as deselected.
One VM per module: each module's `vm` fixture is module-scoped.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent
sys.path.insert(0, str(E2E))

import image  # noqa: E402
import realhost  # noqa: E402
from support import upstream  # noqa: E402


# -- running only when asked ----------------------------------------------------------------

def pytest_collection_modifyitems(config, items):
    if os.environ.get("MARINER_E2E") == "1":
        return
    keep, drop = [], []
    for item in items:
        ours = item.get_closest_marker("e2e") is not None or E2E in Path(item.path).parents
        (drop if ours else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# -- the image ------------------------------------------------------------------------------

def _missing_prerequisites() -> list[str]:
    missing = [tool for tool in (realhost.QEMU, "qemu-img", "nix-instantiate", "ssh", "tmux")
               if shutil.which(tool) is None]
    if not os.access(realhost.VIRTIOFSD, os.X_OK):
        missing.append(realhost.VIRTIOFSD)
    if os.geteuid() != 0:
        missing.append("root (virtiofsd keeps guest file ownership only as root)")
    return missing


@pytest.fixture(scope="session")
def e2e_image() -> Path:
    """The guest image directory (built on a cold cache), or a loud failure."""
    missing = _missing_prerequisites()
    if missing:
        pytest.fail("the e2e tier cannot run here, missing: " + ", ".join(missing)
                    + " (Debian: qemu-system-x86 qemu-utils debootstrap nix-bin openssh-client "
                      "tmux; see scripts/e2e)", pytrace=False)
    try:  # each VM is configured from its flake evaluated through the real upstream modules
        upstream.locate_src()
    except upstream.SourcesMissing as exc:
        pytest.fail(f"the e2e tier cannot run here: {exc}", pytrace=False)
    given = os.environ.get("MARINER_E2E_IMAGE")
    if given:
        if not image.is_complete(Path(given)):
            pytest.fail(f"MARINER_E2E_IMAGE={given} is not a complete guest image", pytrace=False)
        return Path(given)
    cache = os.environ.get("MARINER_E2E_CACHE")
    if not cache:
        pytest.fail("set MARINER_E2E_CACHE (scripts/e2e does) to where the guest image is "
                    "cached", pytrace=False)
    try:
        return image.ensure_image(Path(cache))
    except image.ImageError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def module_base(tmp_path_factory, request) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
