"""virtiofsd acts as the developer, never as root (issue 9): in a real guest, a file guest root
creates in the project belongs to the developer on the host, and guest root cannot chown a host
file away from them.

Debian's C virtiofsd (the tier's) cannot squash guest ids as the nixpkgs one that mariner's
virtiofsd-run starts does, so here it runs as the developer (the ids mariner rendered into
the flake's virtiofsd.nix) in a user namespace mapping only root to them: what guest root does
is what this module shows (see tests/e2e/README.md for what the tier cannot show)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from realvm import GUEST_UID, make_vm, teardown_vm, vm_pids

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vm(e2e_image):
    # virtiofsd as the developer must reach the project: a base the developer can traverse
    # (pytest's own tmp dirs are root's, 0700), as a developer's own project is theirs to reach
    base = Path(tempfile.mkdtemp(prefix="mre2e-ident-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield from _vm(base, e2e_image)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _vm(base, e2e_image):
    vm = make_vm(base, e2e_image, "e2e-ident")
    vm.env["MARINER_E2E_VIRTIOFSD"] = "developer"
    # a host file in the project that is not the developer's (root's, private)
    secret = vm.project / "root-only"
    secret.write_text("root's\n")
    os.chown(secret, 0, 0)
    secret.chmod(0o600)
    try:
        vm.up()
        yield vm
    finally:
        teardown_vm(vm)


def _developer(vm) -> tuple[int, int]:
    """The ids mariner serves the shares with: the developer's (the project's owner here)."""
    from mariner_dev.developer import developer

    dev = developer(vm.project)
    assert dev.uid == GUEST_UID
    return dev.uid, dev.gid


def _ids(pid: int) -> tuple[int, int]:
    fields = {line.split(":")[0]: line.split()[1:]
              for line in open(f"/proc/{pid}/status").read().splitlines()
              if line.startswith(("Uid:", "Gid:"))}
    return int(fields["Uid"][1]), int(fields["Gid"][1])   # effective ids


def test_the_share_daemons_run_as_the_developer(vm):
    daemons = [pid for pid in vm_pids(vm) if pid != vm.unit().get("qemu_pid")
               and pid != vm.unit().get("boot_pid")]
    assert daemons
    for pid in daemons:
        # setpriv execs unshare execs sh execs virtiofsd: the pid is the daemon's
        assert _ids(pid) == _developer(vm), pid


def test_a_file_guest_root_creates_belongs_to_the_developer(vm):
    vm.guest(f"sudo -n sh -c 'cd {vm.workspace} && echo by-root > made-by-root && "
             f"mkdir dir-by-root && touch dir-by-root/inner'")
    for path in (vm.project / "made-by-root", vm.project / "dir-by-root",
                 vm.project / "dir-by-root" / "inner"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == _developer(vm), path
    assert (vm.project / "made-by-root").read_text() == "by-root\n"


def test_guest_root_cannot_chown_to_root_or_touch_what_the_developer_cannot(vm):
    readme = vm.project / "README"
    vm.guest(f"sudo -n chown 0:0 {vm.workspace}/README", check=False)
    st = readme.stat()
    assert (st.st_uid, st.st_gid) == (GUEST_UID, vm.gid)    # still the developer's, not root's
    secret = vm.project / "root-only"
    refused = vm.guest(f"sudo -n chmod 0666 {vm.workspace}/root-only", check=False)
    assert refused.returncode != 0
    assert oct(secret.stat().st_mode & 0o7777) == "0o600" and secret.stat().st_uid == 0
    unread = vm.guest(f"sudo -n cat {vm.workspace}/root-only", check=False)
    assert unread.returncode != 0 and b"root's" not in unread.stdout
