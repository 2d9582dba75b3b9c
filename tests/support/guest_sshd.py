#!/usr/bin/env python3
"""A real OpenSSH sshd on 127.0.0.1 playing a mariner VM's guest, for tests and benchmarks.

Python API:
    ensure_guest_user(name) -> (uid, home)        dedicated guest account (created when root)
    free_port() -> int                            a free loopback TCP port
    GuestSshd(state_dir, port, user, authorized_keys_file)
        .start() / .stop() / .restart() / .running()
        .regenerate_host_keys()                   the "VM" gets a new host key (re-created VM)
        .host_public_key() -> str                 "ssh-ed25519 AAAA..." of the current host key
    generate_client_key(path, passphrase="") -> Path   an ed25519 key pair (path, path.pub)

CLI:
    guest_sshd.py start --port P --user U --authorized-keys-file F --state-dir D
    guest_sshd.py stop --state-dir D

The host key is generated once per state dir and reused across restarts (a VM keeps its host
key). `stop` kills the listener and every descendant (sshd puts each connection in its own
session), then waits until the port is closed.
"""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
DEFAULT_GUEST_USER = "mariner-guest"
LISTEN = "127.0.0.1"


def ensure_guest_user(name: str = DEFAULT_GUEST_USER) -> tuple[int, Path]:
    """Return (uid, home) of the guest account, creating it (bash, unlocked) when root."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            raise RuntimeError(f"guest user {name!r} does not exist and we are not root") from None
        # useradd may race with a parallel test process creating the same user.
        proc = subprocess.run(["useradd", "-m", "-s", "/bin/bash", name],
                              capture_output=True, text=True)
        if proc.returncode not in (0, 9):  # 9: already exists
            raise RuntimeError(f"useradd {name} failed: {proc.stderr.strip()}")
        pw = pwd.getpwnam(name)
    if os.geteuid() == 0:
        # sshd refuses accounts whose password field is `!` (locked).
        with open("/etc/shadow") as fh:
            fields = next((line.split(":") for line in fh if line.startswith(name + ":")), None)
        if fields is None or fields[1].startswith("!"):
            subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
        home = Path(pw.pw_dir)
        if not home.is_dir():
            home.mkdir(parents=True)
            os.chown(home, pw.pw_uid, pw.pw_gid)
    return pw.pw_uid, Path(pw.pw_dir)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LISTEN, 0))
        return s.getsockname()[1]


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((LISTEN, port), timeout=timeout):
            return True
    except OSError:
        return False


def generate_client_key(path: Path, passphrase: str = "", comment: str = "mariner-test") -> Path:
    """Generate an ed25519 key pair at path (and path.pub); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_name(path.name + ".pub")):
        if p.exists():
            p.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment,
                    "-f", str(path)], check=True, capture_output=True)
    return path


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(b")") + 2:].split()
        ppid = int(rest[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] != b"Z"
    except OSError:
        return False


class GuestSshd:
    """One sshd instance with its own state directory (host key, config, pid file, log)."""

    def __init__(self, state_dir: Path, port: int, user: str, authorized_keys_file: Path):
        self.state_dir = Path(state_dir).absolute()
        self.port = port
        self.user = user
        self.authorized_keys_file = Path(authorized_keys_file).absolute()

    @property
    def host_key(self) -> Path:
        return self.state_dir / "ssh_host_ed25519_key"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "sshd_config"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "sshd.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "sshd.log"

    def host_public_key(self) -> str:
        """The host key as 'type base64' (no comment)."""
        parts = (self.host_key.with_name(self.host_key.name + ".pub")).read_text().split()
        return f"{parts[0]} {parts[1]}"

    def regenerate_host_keys(self) -> None:
        """Replace the host key, as a re-created VM would have. Takes effect on (re)start."""
        for p in self.state_dir.glob("ssh_host_*"):
            p.unlink()
        self._ensure_host_key()

    def _ensure_host_key(self) -> None:
        if not self.host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "guest",
                            "-f", str(self.host_key)], check=True, capture_output=True)

    def _write_config(self) -> None:
        sftp = "/usr/lib/openssh/sftp-server"
        lines = [
            f"ListenAddress {LISTEN}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys_file}",
            f"AllowUsers {self.user}",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "UsePAM no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "AcceptEnv LANG LC_*",
            "AllowTcpForwarding yes",
            "AllowAgentForwarding yes",
            "X11Forwarding no",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "ClientAliveInterval 0",
            f"Subsystem sftp {sftp if os.path.exists(sftp) else 'internal-sftp'}",
        ]
        self.config_file.write_text("\n".join(lines) + "\n")

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 10.0) -> None:
        """Start sshd as a daemon and wait until the port accepts connections."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Privilege separation directory; Debian's package creates it only at boot.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._ensure_host_key()
        self._write_config()
        if self.running():
            raise RuntimeError(f"sshd already running for {self.state_dir}")
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} on {LISTEN} is already in use")
        proc = subprocess.run([SSHD, "-f", str(self.config_file), "-E", str(self.log_file)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sshd failed to start (exit {proc.returncode}): "
                               f"{proc.stderr.strip()}\n{self._log_tail()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"sshd did not listen on {LISTEN}:{self.port} within {timeout}s\n"
                           f"{self._log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Kill the listener and every descendant (established sessions too); wait for the port."""
        pid = self.pid()
        if pid is not None:
            # Freeze the tree first so nothing forks away while we collect it, then kill.
            for _ in range(3):
                tree = [pid, *_descendants(pid)]
                for p in tree:
                    try:
                        os.kill(p, signal.SIGSTOP)
                    except ProcessLookupError:
                        pass
                tree = [pid, *_descendants(pid)]
                for p in reversed(tree):
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if not _descendants(pid):
                    break
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        try:
            self.pid_file.unlink()
        except FileNotFoundError:
            pass
        deadline = time.monotonic() + timeout
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} still open after stopping sshd")

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no sshd log)"


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start")
    start.add_argument("--port", type=int, required=True)
    start.add_argument("--user", default=DEFAULT_GUEST_USER)
    start.add_argument("--authorized-keys-file", type=Path, required=True)
    start.add_argument("--state-dir", type=Path, required=True)
    stop = sub.add_parser("stop")
    stop.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "start":
            if os.geteuid() == 0:
                ensure_guest_user(args.user)
            GuestSshd(args.state_dir, args.port, args.user, args.authorized_keys_file).start()
        else:
            # Port and user are read back from the config written by `start`.
            port = 0
            cfg = Path(args.state_dir).absolute() / "sshd_config"
            for line in cfg.read_text().splitlines() if cfg.exists() else []:
                if line.startswith("Port "):
                    port = int(line.split()[1])
            GuestSshd(args.state_dir, port, "", Path("/dev/null")).stop()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"guest_sshd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
