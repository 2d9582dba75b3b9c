"""The runtime directory (agent sockets, the exec cache) is verified, not trusted, and the agent
and its clients check each other's uid (SO_PEERCRED) before anything is exchanged.

The attack: another local user pre-creates /tmp/mariner-<uid> (or just a listening socket
where the agent's should be) and waits for the victim's `exec -e API_TOKEN=...`, its stdio
descriptors, and a chance to return a forged exit status. Tests run as root; the other user is
`nobody`, in a process of its own (subprocess with user=).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mariner_dev import paths
from mariner_dev.errors import StateError
from mariner_dev.remote import client, proto
from mariner_dev.remote.command import ExecRequest
from support.fixtures import run_mariner

NOBODY = 65534
# The other user cannot run the test venv's interpreter (it lives under /root): the system's.
PYTHON = "/usr/bin/python3"


@pytest.fixture
def tmp_base(tmp_path, monkeypatch):
    """A stand-in for /tmp (sticky, world-writable), no XDG_RUNTIME_DIR."""
    base = tmp_path / "tmp"
    base.mkdir()
    os.chmod(base, 0o1777)
    os.chmod(tmp_path, 0o755)
    monkeypatch.setattr(paths, "TMP", str(base))
    monkeypatch.setattr(paths, "_verified", None)
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    return base


def _as_nobody(code: str, *fds: int) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", textwrap.dedent(code), *map(str, fds)],
                            user=NOBODY, group=NOBODY, extra_groups=[], pass_fds=fds,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")


def _one_line(exc) -> str:
    lines = str(exc).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_fresh_runtime_dir_is_created_private(tmp_base):
    path = paths.ensure_runtime_dir()
    assert path == f"{tmp_base}/mariner-{os.getuid()}"
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert paths.runtime_dir_str() == path


@pytest.mark.parametrize("make,what", [
    (lambda p: (os.mkdir(p, 0o700), os.chown(p, NOBODY, NOBODY)), "belongs to uid 65534"),
    (lambda p: (os.mkdir(p.parent / "elsewhere", 0o700), os.symlink(p.parent / "elsewhere", p)),
     "is a symbolic link"),
    (lambda p: (os.mkdir(p), os.chmod(p, 0o755)), "has mode 0755, not 0700"),
    (lambda p: (os.mkdir(p), os.chmod(p, 0o1777)), "has mode 1777, not 0700"),
    (lambda p: p.write_text(""), "is not a directory"),
])
def test_a_runtime_dir_someone_else_could_control_is_refused(tmp_base, make, what):
    planted = tmp_base / f"mariner-{os.getuid()}"
    make(planted)
    for call in (paths.ensure_runtime_dir, paths.runtime_dir_str,
                 lambda: client.socket_file("vm")):
        with pytest.raises(StateError) as info:
            call()
        line = _one_line(info.value)
        assert str(planted) in line and what in line, line


def test_an_xdg_runtime_dir_of_another_user_or_open_to_others_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "_verified", None)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert paths.ensure_runtime_dir() == f"{xdg}/mariner"
    os.chmod(xdg, 0o777)
    monkeypatch.setattr(paths, "_verified", None)
    with pytest.raises(StateError) as info:
        paths.runtime_dir_str()
    assert "writable by other users" in _one_line(info.value)
    os.chmod(xdg, 0o700)
    os.chown(xdg, NOBODY, NOBODY)
    with pytest.raises(StateError) as info:
        paths.ensure_runtime_dir()
    assert "belongs to uid 65534" in _one_line(info.value)


LISTENER = """
    import os, socket, sys, time
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.listen(8)
    sock.settimeout(6)
    got = b""
    try:
        while True:
            conn, _ = sock.accept()
            conn.settimeout(2)
            try:
                while True:
                    data, anc, _f, _a = conn.recvmsg(65536, socket.CMSG_SPACE(64))
                    got += data + b"".join(d for _l, _k, d in anc)
                    if not data:
                        break
            except OSError:
                pass
            # A forged answer, should anything have been asked.
            try:
                conn.sendall(b"R\\x00\\x00\\x00\\x00")
            except OSError:
                pass
    except OSError:
        pass
    print(len(got), flush=True)
"""


class _Target:
    name = "victim"
    user = "u"

    @staticmethod
    def fingerprint() -> str:
        return "0" * 16

    @staticmethod
    def to_json() -> dict:
        return {}


def _planted_listener(path: str) -> subprocess.Popen:
    """A socket at `path` listened on by `nobody` (bound here, listen()ed there: the peer
    credentials are those of the process that listens)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    proc = _as_nobody(LISTENER, sock.fileno())
    sock.close()
    time.sleep(0.5)
    return proc


def _try_everything(expect) -> None:
    secret = ExecRequest("env API_TOKEN=hunter2 true", tty=False, stdin=True)
    for call in (lambda: client.ping(_Target()),
                 lambda: client.agent_forwards(_Target()),
                 lambda: client.run_sync(_Target(), {"spec": {}}),
                 lambda: client.run_exec(_Target(), secret, fds=(0, 1, 2))):
        with pytest.raises(expect) as info:
            call()
        assert len(str(info.value).splitlines()) == 1


def test_a_planted_runtime_dir_with_a_listening_socket_receives_nothing(tmp_base):
    planted = tmp_base / f"mariner-{os.getuid()}"
    os.mkdir(planted, 0o700)
    path = str(planted / "victim.sock")
    listener = _planted_listener(path)
    os.chown(planted, NOBODY, NOBODY)           # the other user's directory, as they made it
    os.chown(path, NOBODY, NOBODY)
    try:
        _try_everything(StateError)
    finally:
        out, err = listener.communicate(timeout=20)
    assert out.strip() == b"0", err                 # no HELLO, no fds, nothing


def test_a_socket_served_by_another_uid_gets_nothing(tmp_base):
    """Even in our own runtime directory, a socket whose listener is another uid is not ours."""
    from mariner_dev.errors import GuestUnreachable

    runtime = paths.ensure_runtime_dir()
    listener = _planted_listener(os.path.join(runtime, "victim.sock"))
    try:
        _try_everything(GuestUnreachable)
    finally:
        out, err = listener.communicate(timeout=20)
    assert out.strip() == b"0", err


CONNECTOR = """
    import socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sys.argv[1])
    try:
        sock.sendall(bytes.fromhex(sys.argv[2]))
    except OSError:
        pass          # hung up on already
    try:
        print(repr(sock.recv(100)), flush=True)
    except OSError:
        print(repr(b""), flush=True)
"""


def test_the_agent_serves_no_other_uid(project):
    """A client of another uid (here let in by loosened modes) gets nothing from the agent."""
    assert run_mariner("exec", "--", "true", cwd=project.dir,
                       env={"MARINER_AGENT": "require"}).returncode == 0
    sock_path = client.socket_path(project.name)
    runtime = sock_path.parent
    hello = proto.frame(proto.HELLO, proto.dumps({
        "proto": proto.PROTO, "build": proto.build_hash(), "op": "ping",
        "target": project.target.fingerprint(), "request": None}))
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in (runtime.parent, runtime, sock_path)}
    try:
        for p in modes:
            os.chmod(p, modes[p] | 0o711 if p != sock_path else 0o666)
        proc = subprocess.run([PYTHON, "-c", textwrap.dedent(CONNECTOR),
                               str(sock_path), hello.hex()], user=NOBODY, group=NOBODY,
                              extra_groups=[], capture_output=True, timeout=20, cwd="/")
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    assert proc.stdout.strip() == b"b''", proc.stderr    # hung up on, not answered
    assert "refused a client of uid 65534" in Path(client.log_path(project.name)).read_text()
    assert client.ping(project.target)["pid"] == client.agent_pid(project.name)
