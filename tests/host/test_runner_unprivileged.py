"""The runner backend needs no root: an unprivileged account (created when the tests run as
root) builds a VM with the fake nix, starts it under mariner's supervisor (virtiofsd-run, then
the runner whose guest is a real sshd), stops it cleanly and destroys it, with nothing but
its own files. As root the account runs the system's Python with the checkout on PYTHONPATH
(the runner backend needs only the standard library)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from support.fakehost import FAKEHOST_BIN, render_vm, stop_runner_vms, write_project
from support.guest_sshd import ensure_guest_user, free_port
from support.tools import REPO, require_tool

ACCOUNT = "mariner-runner"

DRIVER = r"""
import json, os, socket, sys, time
from pathlib import Path
from mariner_dev.host.userhost import RunnerHost, state_root

name, flake, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
seen = {"euid": os.geteuid()}

def banner():
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.settimeout(2)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False

host = RunnerHost()
host.create(name, flake)
state = state_root() / name
st = state.stat()
seen["state_mode"], seen["state_owner"] = oct(st.st_mode & 0o777), st.st_uid
host.start(name)
deadline = time.monotonic() + 60
while not banner() and time.monotonic() < deadline:
    time.sleep(0.1)
seen["answered"] = banner()
seen["running"] = host.status(name).unit
host.stop(name)
seen["stopped"] = host.status(name).unit
seen["answers_after_stop"] = banner()
seen["owners"] = sorted({p.lstat().st_uid for p in state.rglob("*")})
host.destroy(name)
seen["destroyed"] = not state.exists()
print(json.dumps(seen))
"""


def test_the_runner_backend_as_an_unprivileged_account(fakehost, monkeypatch):
    require_tool("sshd")
    require_tool("setpriv")
    root = os.geteuid() == 0
    user = ACCOUNT if root else pwd.getpwuid(os.getuid()).pw_name
    if root:
        ensure_guest_user(ACCOUNT)
    account = pwd.getpwnam(user)
    base = Path(tempfile.mkdtemp(prefix="mrr-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        port = free_port()
        write_project(base / "proj", "unpriv", ssh_port=port, user=user)
        monkeypatch.setenv("MARINER_BACKEND", "runner")
        flake = render_vm(base / "proj", base / "flake", cid=11, ssh_port=port,
                          public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1u7sBfK8zQ1kY9Vn1tYf"
                                     "6m7hW3o9QJ1xk0a8b2c3d4 t")
        for sub in ("home", "xdg-data", "nix-store", "nix-state"):
            (base / sub).mkdir()
        log = base / "fakehost.log"
        log.write_text("")
        for path in [base, *base.rglob("*")]:
            os.lchown(path, account.pw_uid, account.pw_gid)
        env = {"HOME": str(base / "home"), "XDG_DATA_HOME": str(base / "xdg-data"),
               "PATH": f"{FAKEHOST_BIN}:/usr/bin:/bin",
               "MARINER_FAKEHOST_LOG": str(log), "MARINER_FAKE_NIX_STORE": str(base / "nix-store"),
               "MARINER_FAKE_VSOCK_DIR": str(base / "nix-state"),
               # Debian's nix-instantiate wants a state directory it may write
               "NIX_STATE_DIR": str(base / "nix-state"), "PYTHONPATH": str(REPO)}
        python = sys.executable
        argv = [python, "-c", DRIVER, "unpriv", str(flake), str(port)]
        if root:
            python = shutil.which("python3", path="/usr/bin:/bin")
            argv = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                    "--init-groups", python, "-c", DRIVER, "unpriv", str(flake), str(port)]
        proc = subprocess.run(argv, env=env, cwd=base, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        assert seen["euid"] != 0
        assert seen["state_mode"] == "0o700" and seen["state_owner"] == account.pw_uid
        assert seen["answered"] and seen["running"] == "active"
        assert seen["stopped"] == "inactive" and not seen["answers_after_stop"]
        assert seen["owners"] == [account.pw_uid]  # nothing of root's in the state directory
        assert seen["destroyed"]
        progs = [json.loads(line)["prog"] for line in log.read_text().splitlines()]
        assert set(progs) == {"nix", "virtiofsd-run", "microvm-run", "microvm-shutdown"}
    finally:
        monkeypatch.setenv("XDG_DATA_HOME", str(base / "xdg-data"))
        stop_runner_vms()  # whatever a failure left running
        shutil.rmtree(base, ignore_errors=True)
