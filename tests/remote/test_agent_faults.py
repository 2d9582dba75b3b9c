"""The agent's descriptors and its protocol under faults: no fd is used after it was closed, and
every answer a client cannot read ends in one line and exit 125, never a traceback."""

from __future__ import annotations

import asyncio
import marshal
import os
import socket
import sys
import threading
import time

import pytest

from mariner_dev import remote
from mariner_dev.remote import client, proto, session
from support.fixtures import run_mariner


def test_stdin_pump_stop_after_eof_writes_to_no_reused_descriptor():
    """The pump returns at stdin EOF; stop() comes later (when the command exits). By then the
    agent has reused freed descriptor numbers for other clients: a wake byte written to a
    number the thread had closed landed in another client's stdout or socket ("x3")."""
    loop = asyncio.new_event_loop()
    stdin_r, stdin_w = os.pipe()
    os.close(stdin_w)                                   # stdin at EOF, like /dev/null

    class Proc:
        def _stdin_eof(self):
            pass

    pump = session._StdinPump(stdin_r, loop, Proc())
    wake = (pump.wake_r, pump.wake_w)
    pump.start()
    pump.join(5)
    assert not pump.is_alive()
    # Another client's descriptors, opened after the pump returned.
    other_r, other_w = os.pipe()
    try:
        pump.stop()
        os.set_blocking(other_r, False)
        with pytest.raises(BlockingIOError):
            os.read(other_r, 10)                        # nothing landed in someone else's pipe
        assert {other_r, other_w}.isdisjoint(wake)      # the pump's own pipe is still its own
        pump.close()
        pump.stop()                                     # a stop after close is a no-op
        for fd in wake:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        for fd in (other_r, other_w, stdin_r):
            os.close(fd)
        loop.close()


class FakeAgent:
    """A listener on the VM's agent socket that answers each HELLO with `frames`."""

    def __init__(self, name: str, frames: list[bytes]):
        self.path = client.socket_file(name)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.frames = frames
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    _data, ancdata, _flags, _addr = conn.recvmsg(1 << 16,
                                                                 socket.CMSG_SPACE(12))
                    for _level, _kind, passed in ancdata:   # the client's stdio: not ours
                        for i in range(0, len(passed) - len(passed) % 4, 4):
                            os.close(int.from_bytes(passed[i:i + 4], sys.byteorder))
                    for data in self.frames:
                        conn.sendall(data)
                    time.sleep(0.2)
                except OSError:
                    pass

    def close(self):
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


READY = proto.frame(proto.READY, marshal.dumps({"pid": 1, "build": "x"}))


@pytest.mark.parametrize("frames,what", [
    ([b"R" + (proto.MAX_FRAME + 1).to_bytes(4, "big")], "frame too large"),
    ([b"R\xff\xff\xff\xff"], "frame too large"),
    ([READY, b"X\x52\x00\x00\x00xxxx"], "frame too large"),
    ([READY, proto.frame(proto.EXIT, b"\x00garbage")], "bad marshal data"),
    ([READY, proto.frame(proto.EXIT, marshal.dumps({"status": "0"}))], "exit status"),
    ([READY, proto.frame(proto.EXIT, marshal.dumps({"message": None}))], "status"),
    ([READY, proto.frame(proto.EXIT, marshal.dumps(7))], "an answer of type int"),
])
def test_an_unreadable_answer_is_one_line_and_125(project, frames, what):
    remote.stop_agent(project.name)
    fake = FakeAgent(project.name, frames)
    try:
        result = run_mariner("exec", "--", "echo", "never", cwd=project.dir,
                             env={"MARINER_AGENT": "require"}, timeout=30)
    finally:
        fake.close()
    err = result.stderr.decode()
    assert result.returncode == 125, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and project.name in lines[0], lines
    assert result.stdout == b""


def test_a_handshake_answer_of_another_kind_replaces_the_agent(project, tmp_path):
    """Not this protocol's READY: treated as an agent of another build (replaced), as before."""
    remote.stop_agent(project.name)
    fake = FakeAgent(project.name, [proto.frame(proto.READY, marshal.dumps([1, 2]))])
    try:
        result = run_mariner("exec", "--", "echo", "served", cwd=project.dir, timeout=30,
                             env={"MARINER_AGENT": "require",
                                  "MARINER_DEBUG_PATH_FILE": str(tmp_path / "p")})
    finally:
        fake.close()
    assert (result.returncode, result.stdout) == (0, b"served\n"), result.stderr
    assert (tmp_path / "p").read_text().split() == ["agent"]


def test_a_message_from_the_agent_is_printed_escaped(project):
    """An EXIT message carries text from the guest's side (a lost connection's reason)."""
    remote.stop_agent(project.name)
    fake = FakeAgent(project.name, [READY, proto.frame(proto.EXIT, marshal.dumps(
        {"status": 125, "message": "lost the connection (\x1b]0;owned\x07\x1b[2J)"}))])
    try:
        result = run_mariner("exec", "--", "true", cwd=project.dir,
                             env={"MARINER_AGENT": "require"}, timeout=30)
    finally:
        fake.close()
    assert result.returncode == 125
    assert result.stderr == b"mariner: lost the connection (\\x1b]0;owned\\x07\\x1b[2J)\n"
