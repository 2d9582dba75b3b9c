"""The project and the [[shares]] over virtiofs in a real guest kernel: paths, ownership,
visibility of edits, permissions, large files, renames, deletions, read-only shares."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from realvm import GUEST_UID, make_vm, teardown_vm, wait_for

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def vm(module_base, e2e_image):
    vm = make_vm(module_base, e2e_image, "e2e-ws")
    try:
        vm.up()
        yield vm
    finally:
        teardown_vm(vm)


def test_exec_from_a_subdirectory_runs_in_the_mounted_path(vm):
    sub = vm.project / "src" / "pkg"
    proc = vm.mariner("exec", "--", "sh", "-c", "/usr/bin/pwd -P; exit 3", cwd=sub)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{vm.workspace}/src/pkg"
    # the real mount, not a copy: the guest's kernel says virtiofs
    mounts = vm.guest_text(f"findmnt -n -o FSTYPE,SOURCE --target {vm.workspace}/src")
    assert mounts.split() == ["virtiofs", "workspace"]


def test_a_file_written_in_the_guest_belongs_to_the_configured_uid(vm):
    vm.guest(f"cd {vm.workspace} && echo from-guest > made-in-guest.txt && mkdir guest-dir")
    made = vm.project / "made-in-guest.txt"
    assert made.read_text() == "from-guest\n"
    for path in (made, vm.project / "guest-dir"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (GUEST_UID, vm.gid), path
    assert vm.guest_text("id -u") == str(GUEST_UID)


def _guest_watch(vm, path: str, expected: str) -> subprocess.Popen:
    """Start a guest-side poller that prints `ready`, then `seen` once `path` holds
    `expected` (or `timeout` after 20 s): the host can time the edit without SSH latency."""
    script = (
        "import os, sys, time\n"
        f"path, expected = {path!r}, {expected!r}\n"
        "print('ready', flush=True)\n"
        "deadline = time.monotonic() + 20\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        "        with open(path) as fh:\n"
        "            if fh.read() == expected:\n"
        "                print('seen', flush=True); sys.exit(0)\n"
        "    except OSError:\n"
        "        pass\n"
        "    time.sleep(0.02)\n"
        "print('timeout', flush=True)\n")
    proc = subprocess.Popen([*vm.ssh_argv(), "python3", "-u", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=vm.env)
    proc.stdin.write(script)
    proc.stdin.close()
    line = proc.stdout.readline().strip()
    assert line == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "edited-file"])
def test_a_host_edit_is_visible_in_the_guest_within_2_seconds(vm, existing):
    name = f"host-edit-{int(existing)}.txt"
    target = vm.project / name
    if existing:
        target.write_text("old contents\n")
        # the guest reads (and caches) the old contents first
        assert vm.guest_text(f"cat {vm.workspace}/{name}") == "old contents"
    watcher = _guest_watch(vm, f"{vm.workspace}/{name}", "edited on the host\n")
    edited = time.monotonic()
    target.write_text("edited on the host\n")
    try:
        line = watcher.stdout.readline().strip()
        seen = time.monotonic()
    finally:
        watcher.kill()
        watcher.wait()
    assert line == "seen"
    assert seen - edited < 2.0, f"the guest saw the edit after {seen - edited:.2f} s"


def test_permissions_cross_the_mount(vm):
    ws = vm.workspace
    vm.guest(f"cd {ws} && echo x > modes && chmod 0751 modes && printf '#!/bin/sh\\necho ran\\n'"
             f" > tool.sh && chmod 0700 tool.sh")
    assert stat.S_IMODE((vm.project / "modes").stat().st_mode) == 0o751
    assert stat.S_IMODE((vm.project / "tool.sh").stat().st_mode) == 0o700
    host_script = vm.project / "host-tool.sh"
    host_script.write_text("#!/bin/sh\necho host-script-ran\n")
    host_script.chmod(0o755)
    assert vm.guest_text(f"{ws}/host-tool.sh") == "host-script-ran"
    os.chmod(vm.project / "modes", 0o604)
    wait_for(lambda: vm.guest_text(f"stat -c %a {ws}/modes") == "604", 5,
               "the host's chmod in the guest")
    # a root-owned, private file on the host stays private to the guest user
    secret = vm.project / "root-only"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    denied = vm.guest(f"cat {ws}/root-only", check=False)
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


def test_a_100_mb_file_crosses_the_mount_both_ways(vm):
    ws = vm.workspace
    out = vm.guest_text(f"head -c {100 * MiB} /dev/urandom > {ws}/big-from-guest && "
                        f"sha256sum {ws}/big-from-guest")
    guest_digest = out.split()[0]
    big = vm.project / "big-from-guest"
    assert big.stat().st_size == 100 * MiB
    assert _sha256(big) == guest_digest
    assert big.stat().st_uid == GUEST_UID
    host_big = vm.project / "big-from-host"
    with open(host_big, "wb") as fh:
        for _ in range(100):
            fh.write(os.urandom(MiB))
    assert vm.guest_text(f"sha256sum {ws}/big-from-host").split()[0] == _sha256(host_big)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def test_renames_and_deletions_cross_the_mount(vm):
    ws = vm.workspace
    vm.guest(f"cd {ws} && mkdir -p tree/a && echo 1 > tree/a/one && mv tree/a tree/b && "
             f"echo 2 > doomed && rm doomed")
    assert (vm.project / "tree" / "b" / "one").read_text() == "1\n"
    assert not (vm.project / "tree" / "a").exists()
    assert not (vm.project / "doomed").exists()
    os.rename(vm.project / "tree" / "b", vm.project / "tree" / "c")
    (vm.project / "tree" / "c" / "one").unlink()
    wait_for(lambda: vm.guest_text(f"cd {ws}/tree && ls -A . c") == ".:\nc\n\nc:", 5,
               "the host's rename and deletion in the guest")
    vm.guest(f"rm -r {ws}/tree")
    assert not (vm.project / "tree").exists()


def test_a_read_only_share_refuses_writes(vm):
    assert vm.guest_text("cat /data/table.csv") == "id,value\n1,42"
    refused = vm.guest("touch /data/new-file", check=False)
    assert refused.returncode != 0
    assert b"Read-only file system" in refused.stderr
    root_refused = vm.guest("sudo -n touch /data/new-file", check=False)
    assert root_refused.returncode != 0 and b"Read-only file system" in root_refused.stderr
    assert sorted(p.name for p in (vm.base / "dataset").iterdir()) == ["table.csv"]
    options = vm.guest_text("findmnt -n -o OPTIONS --target /data").split(",")
    assert "ro" in options
