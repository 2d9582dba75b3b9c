"""The runner backend needs no root: an unprivileged account (created when the tests run as
root) builds a VM with the fake nix, starts it under mariner's supervisor (virtiofsd-run, then
the runner whose guest is a real sshd), stops it cleanly and destroys it, with nothing but
its own files. As root the account runs the system's Python with the checkout on PYTHONPATH
(the runner backend needs only the standard library)."""

from __future__ import annotations

import contextlib
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
        assert set(progs) == {"nix", "nix-store", "virtiofsd-run", "microvm-run",
                              "microvm-shutdown"}
    finally:
        monkeypatch.setenv("XDG_DATA_HOME", str(base / "xdg-data"))
        stop_runner_vms()  # whatever a failure left running
        shutil.rmtree(base, ignore_errors=True)


# -- the whole CLI, as an unprivileged account, on a host without microvm or systemctl -------

def _path_without_host_module(base: Path) -> str:
    """A PATH with what a plain Linux machine has (/usr/bin, /bin) and the fake `nix` and
    `nix-store`, but no `microvm`, `systemctl` or `journalctl`."""
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for prog in ("nix", "nix-store"):
        (bin_dir / prog).symlink_to(FAKEHOST_BIN / prog)
    hidden = {"microvm", "systemctl", "journalctl", "systemd-run"}
    for directory in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        if not os.path.isdir(directory) or os.path.realpath(directory) != directory \
                and directory in ("/bin", "/sbin"):
            continue  # merged /usr: /bin is /usr/bin
        for name in os.listdir(directory):
            link = bin_dir / name
            if name in hidden or os.path.lexists(link):
                continue
            link.symlink_to(os.path.join(directory, name))
    path = str(bin_dir)
    for prog in ("microvm", "systemctl", "journalctl"):
        assert shutil.which(prog, path=path) is None
    return path


def test_the_cli_lifecycle_as_an_unprivileged_account_without_microvm_or_systemctl(fakehost,
                                                                                     monkeypatch):
    """Issue 13's "done when": with neither microvm nor systemctl on PATH, `up`, `exec`,
    `shell`, `sync`, `down`, `up` (disk kept) and `destroy` work as an unprivileged user, the
    backend chosen by `auto`, and nothing in the account's files belongs to anyone else."""
    from support import unprivileged

    require_tool("sshd")
    require_tool("setpriv")
    # The stand-in guest's sshd runs as the account (a real VM's runs as root in the guest).
    # OpenSSH gives a session's PTY to group tty, which a non-root sshd may only do as a
    # member where /dev/pts is not mounted with gid=5 (as on this kind of machine).
    account = unprivileged.ensure_account(ACCOUNT, groups=("tty",))
    user = account.pw_name
    base = Path(tempfile.mkdtemp(prefix="mrc-", dir="/tmp"))
    name = f"cli{os.getpid() % 100000}"
    dotfile = f".mt-{name}-rc"
    guest_home = Path(account.pw_dir)
    try:
        os.chmod(base, 0o755)
        port = free_port()
        project_dir = base / "proj"
        project_dir.mkdir()
        (project_dir / "mariner.toml").write_text(
            f'[vm]\nname = "{name}"\nuser = "{user}"\n\n'
            f'[network]\nmode = "user"\nssh_port = {port}\n\n'
            f'[workspace]\nmount = "{base / ("guest-" + name)}"\n')
        (project_dir / "hello.txt").write_text("from the host\n")
        dirs = {k: base / k.lower() for k in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME",
                                              "XDG_STATE_HOME", "XDG_CACHE_HOME",
                                              "XDG_RUNTIME_DIR")}
        for directory in dirs.values():
            directory.mkdir(mode=0o700)
        (dirs["HOME"] / dotfile).write_text("export FROM_HOST=1\n")
        (dirs["XDG_CONFIG_HOME"] / "mariner").mkdir()
        (dirs["XDG_CONFIG_HOME"] / "mariner" / "config.toml").write_text(
            f'[dotfiles]\nfiles = ["~/{dotfile}"]\n')
        for sub in ("nix-store", "nix-state", "vsock"):
            (base / sub).mkdir()
        (base / "kvm").write_text("")
        log = base / "fakehost.log"
        log.write_text("")
        env = {key: str(value) for key, value in dirs.items()}
        env = unprivileged.account_env(account, env)
        env.update({
            "PATH": _path_without_host_module(base), "NO_COLOR": "1", "MARINER_AGENT": "auto",
            "MARINER_KVM": str(base / "kvm"),  # the fake runner needs no real KVM
            "MARINER_FAKEHOST_LOG": str(log), "MARINER_FAKE_NIX_STORE": str(base / "nix-store"),
            "MARINER_FAKE_VSOCK_DIR": str(base / "vsock"),
            "NIX_STATE_DIR": str(base / "nix-state"), "LANG": "C.UTF-8"})
        prefix, env["PYTHONPATH"] = unprivileged.python_argv(account)
        unprivileged.give_to(account, base)

        def mariner(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
            proc = subprocess.run([*prefix, "-m", "mariner_dev", *args], cwd=project_dir,
                                  env=env, capture_output=True, text=True, timeout=180,
                                  stdin=subprocess.DEVNULL)
            assert "Traceback" not in proc.stderr, proc.stderr
            assert check is None or proc.returncode == check, (args, proc.returncode,
                                                               proc.stdout, proc.stderr)
            return proc

        mariner("trust", "--yes")
        up = json.loads(mariner("up", "--json").stdout)
        assert up["created"] and up["started"], up
        status = json.loads(mariner("status", "--json").stdout)
        assert (status["state"], status["backend"]) == ("running", "runner"), status
        state_dir = dirs["XDG_DATA_HOME"] / "mariner" / "vms" / name
        disk = (state_dir / "persist.img").stat().st_ino

        out = mariner("exec", "--", "sh", "-c", "id -u; cat hello.txt").stdout
        assert out.split("\n")[:2] == [str(account.pw_uid), "from the host"], out
        assert mariner("exec", "--", "sh", "-c", "exit 7", check=7).stdout == ""
        shell = mariner("shell", "--", "echo", "shell-ok", check=None)
        assert shell.returncode == 0 and "shell-ok" in shell.stdout, (
            shell.stderr, (state_dir / "guest" / "sshd.log").read_text().splitlines()[-6:])
        (dirs["HOME"] / dotfile).write_text("export FROM_HOST=2\n")
        mariner("sync")
        assert (guest_home / dotfile).read_text() == "export FROM_HOST=2\n"

        mariner("down")
        assert json.loads(mariner("status", "--json").stdout)["state"] == "stopped"
        again = json.loads(mariner("up", "--json").stdout)
        assert again["started"] and not again["created"], again
        assert (state_dir / "persist.img").stat().st_ino == disk        # the disk was kept
        assert mariner("exec", "--", "cat", "hello.txt").stdout == "from the host\n"

        mariner("destroy", "--force")
        assert not state_dir.exists()
        assert json.loads(mariner("list", "--json").stdout)["vms"] == []
        progs = {json.loads(line)["prog"] for line in log.read_text().splitlines()}
        assert progs <= {"nix", "nix-store", "virtiofsd-run", "microvm-run",
                         "microvm-shutdown"}, progs
        strangers = [str(p) for p in [base, *base.rglob("*")]
                     if p.lstat().st_uid != account.pw_uid]
        assert strangers == []          # nothing of root's among the account's files
    finally:
        monkeypatch.setenv("XDG_DATA_HOME", str(base / "xdg_data_home"))
        stop_runner_vms()
        with contextlib.suppress(FileNotFoundError):
            (guest_home / dotfile).unlink()
        shutil.rmtree(base, ignore_errors=True)
