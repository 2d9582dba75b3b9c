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
    """A listener on the VM's agent socket that answers each HELLO with `frames`.

    Its thread ends with the test (close() stops and joins it): a thread left blocked on a
    socket could wake later and write into whatever reused that descriptor number."""

    def __init__(self, name: str, frames: list[bytes], hold: float = 0.2):
        self.hold = hold
        self.path = client.socket_file(name)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.inode = os.stat(self.path).st_ino
        self.frames = frames
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    _data, ancdata, _flags, _addr = conn.recvmsg(1 << 16,
                                                                 socket.CMSG_SPACE(12))
                    for _level, _kind, passed in ancdata:   # the client's stdio: not ours
                        for i in range(0, len(passed) - len(passed) % 4, 4):
                            os.close(int.from_bytes(passed[i:i + 4], sys.byteorder))
                    for data in self.frames:
                        conn.sendall(data)
                    self.stopping.wait(self.hold)
                except OSError:
                    pass

    def close(self):
        self.stopping.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the fake agent's thread did not stop"
        self.listener.close()
        try:   # only our own socket: the client may have started a real agent on the path
            if os.stat(self.path).st_ino == self.inode:
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


def test_an_agent_that_takes_the_command_and_never_answers_is_125_not_a_rerun(
        project, monkeypatch, capfd):
    """It holds our stdio and may have started the command: no fallback to a direct run."""
    from mariner_dev.errors import GuestUnreachable
    from mariner_dev.remote.command import ExecRequest

    remote.stop_agent(project.name)
    monkeypatch.setattr(client, "EXEC_HANDSHAKE_TIMEOUT", 1.0)
    fake = FakeAgent(project.name, [], hold=5)
    started = time.monotonic()
    try:
        with pytest.raises(GuestUnreachable) as info:
            client.run_exec(project.target, ExecRequest("true", tty=False, stdin=False),
                            fds=(None, 1, 2))
    finally:
        fake.close()
    assert time.monotonic() - started < 4
    assert "did not answer within 1 s" in str(info.value)


def test_a_sync_client_gives_up_on_an_agent_that_froze_after_accepting(project, monkeypatch):
    """READY, then silence: a working agent says ALIVE every few seconds, so a silent one is
    frozen; the client says so in one line instead of waiting for ever."""
    from mariner_dev.errors import GuestUnreachable

    remote.stop_agent(project.name)
    monkeypatch.setattr(proto, "SILENCE_LIMIT", 1.0)
    fake = FakeAgent(project.name, [READY], hold=30)
    started = time.monotonic()
    try:
        with pytest.raises(GuestUnreachable) as info:
            client.run_sync(project.target, {"spec": {}, "dry_run": True})
    finally:
        fake.close()
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "stopped answering mid-sync (nothing for 1 s)" in message and project.name in message


def test_the_agent_says_alive_while_a_sync_works(monkeypatch):
    """The agent side of the above: ALIVE frames while the sync runs, then the RESULT, and no
    frame after it."""
    from mariner_dev.remote.agent import Agent

    class SlowSyncer:
        async def run(self, request):
            await asyncio.sleep(0.35)
            return {"changed": 0}

    monkeypatch.setattr(proto, "ALIVE_INTERVAL", 0.05)

    async def scenario():
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        agent = Agent.__new__(Agent)
        agent.syncer, agent.active, agent.build = SlowSyncer(), 0, "b"
        agent.target = type("T", (), {"name": "x"})()
        await agent._sync(ours, {})
        ours.close()
        theirs.settimeout(5)
        frames = []
        while True:
            try:
                frames.append(client.read_frame(theirs))
            except EOFError:
                break
        theirs.close()
        return frames

    frames = asyncio.run(scenario())
    kinds = [kind for kind, _ in frames]
    assert kinds[0] == proto.READY and kinds[-1] == proto.RESULT, kinds
    assert set(kinds[1:-1]) == {proto.ALIVE} and len(kinds[1:-1]) >= 3, kinds
    assert proto.loads(frames[-1][1]) == {"changed": 0}


def test_the_agent_killed_mid_command(project, tmp_path):
    """The client exits 125 within a few seconds with one line; the next command starts a new
    agent."""
    import signal
    import subprocess

    from support.fixtures import REPO, mariner_cmd

    assert run_mariner("exec", "--", "true", cwd=project.dir,
                       env={"MARINER_AGENT": "require"}).returncode == 0
    old = client.agent_pid(project.name)
    env = dict(os.environ, MARINER_AGENT="require", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(mariner_cmd() + ["exec", "--", "sh", "-c", "echo started; sleep 60"],
                            cwd=project.dir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"started\n"
        os.kill(old, signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=15)
        took = time.monotonic() - killed
    finally:
        proc.kill()
    assert proc.returncode == 125, err
    assert took < 5, took
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "went away mid-command" in lines[0], lines
    result = run_mariner("exec", "--", "echo", "next", cwd=project.dir,
                         env={"MARINER_AGENT": "require",
                              "MARINER_DEBUG_PATH_FILE": str(tmp_path / "p")})
    assert (result.returncode, result.stdout) == (0, b"next\n"), result.stderr
    assert (tmp_path / "p").read_text().split() == ["agent"]
    assert client.agent_pid(project.name) not in (None, old)


def test_a_direct_command_on_a_vm_that_stops_answering_ends_by_keepalive(project, guest,
                                                                         monkeypatch):
    """The guest freezes (no reset, no FIN): the held connection notices within three
    keepalives and the command ends with 125 and one line, instead of hanging for ever."""
    import signal

    from support.guest_sshd import _descendants

    monkeypatch.setattr(session, "KEEPALIVE", 0.5)
    before = set(_descendants(guest.sshd.pid()))
    frozen: list[int] = []
    read_fd, write_fd = os.pipe()

    def freeze():
        import select

        # The command started (it printed); bounded, so the thread ends with the test.
        if not select.select([read_fd], [], [], 20)[0]:
            return
        os.read(read_fd, 100)
        frozen.extend(set(_descendants(guest.sshd.pid())) - before)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)

    freezer = threading.Thread(target=freeze)
    freezer.start()
    started = time.monotonic()
    try:
        outcome = session.run_direct(project.target, ExecRequestFor("echo up; sleep 60"),
                                     fds=(None, write_fd, write_fd))
    finally:
        freezer.join(10)
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        os.close(read_fd)
        os.close(write_fd)
    assert frozen
    assert outcome.status == 125 and "lost the connection" in outcome.message, outcome
    assert time.monotonic() - started < 15


def ExecRequestFor(script: str):
    from mariner_dev.remote.command import ExecRequest, build_command

    return ExecRequest(build_command(None, workdir="/", env={}, shell_command=script),
                       tty=False, stdin=False)


def test_clients_that_stop_reading_do_not_stall_the_others(project, tmp_path):
    """Commands whose output nobody reads (`mariner exec -- cat big | less`, less left open)
    finish in the guest while the agent still holds their output: waiting for those writes must
    not take the agent's shared worker threads, or every later command would hang at its end."""
    import subprocess

    from support.fixtures import REPO, mariner_cmd

    env = dict(os.environ, MARINER_AGENT="require", PYTHONPATH=str(REPO))
    assert run_mariner("exec", "--", "true", cwd=project.dir,
                       env={"MARINER_AGENT": "require"}).returncode == 0
    stuck = []
    try:
        for _ in range(12):     # more than the default executor's workers on any machine here
            read_end, write_end = os.pipe()
            proc = subprocess.Popen(
                mariner_cmd() + ["exec", "--", "head", "-c", "1000000", "/dev/zero"],
                cwd=project.dir, env=env, stdin=subprocess.DEVNULL, stdout=write_end,
                stderr=subprocess.DEVNULL)
            os.close(write_end)
            stuck.append((proc, read_end))
        time.sleep(2)           # their commands have ended in the guest; no one reads
        started = time.monotonic()
        result = run_mariner("exec", "--", "echo", "still-served", cwd=project.dir,
                             env={"MARINER_AGENT": "require"}, timeout=30)
        assert (result.returncode, result.stdout) == (0, b"still-served\n"), result.stderr
        assert time.monotonic() - started < 10
    finally:
        for proc, read_end in stuck:
            os.close(read_end)      # the readers go: the agent's writes fail, the clients end
        for proc, _ in stuck:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_release_that_is_not_waited_for_closes_the_fds_only_after_its_writers_end():
    """A stopping agent cannot wait for a writer whose reader may never read again, nor close
    the client's fds under it (the number would be reused while the thread still writes):
    close_when_released() leaves the closing to the release, after the writer ended."""
    from mariner_dev.remote.command import ExecRequest

    async def scenario():
        read_end, write_end = os.pipe()
        proc = session.RemoteProcess(None, ExecRequest("true", tty=False, stdin=False),
                                     (None, write_end, write_end), "x")
        proc._out.start()
        proc._out.put(b"y" * (1 << 20))       # far more than a pipe holds: the writer blocks
        await asyncio.sleep(0.2)
        pipe = os.fstat(write_end).st_ino
        proc.close_when_released([write_end])
        await asyncio.sleep(0.3)
        assert os.fstat(write_end).st_ino == pipe   # still open: its writer is still writing
        drained = 0
        os.set_blocking(read_end, False)
        deadline = time.monotonic() + 10
        while drained < (1 << 20) and time.monotonic() < deadline:
            try:
                drained += len(os.read(read_end, 1 << 16))
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.shield(proc._joined), 10)
        try:                                    # closed by the release, once, afterwards
            assert os.fstat(write_end).st_ino != pipe
        except OSError:
            pass
        os.close(read_end)
        return drained

    assert asyncio.run(scenario()) == 1 << 20


def test_the_agent_stopped_mid_command_while_a_client_does_not_read(project):
    """SIGTERM (what `down` sends) with one command running and another whose output nobody
    reads: the agent exits at once (it does not wait for that reader), and the running
    command's client ends with one line."""
    import signal
    import subprocess

    from support.fixtures import REPO, mariner_cmd

    assert run_mariner("exec", "--", "true", cwd=project.dir,
                       env={"MARINER_AGENT": "require"}).returncode == 0
    agent = client.agent_pid(project.name)
    env = dict(os.environ, MARINER_AGENT="require", PYTHONPATH=str(REPO))
    read_end, write_end = os.pipe()
    stalled = subprocess.Popen(mariner_cmd() + ["exec", "--", "head", "-c", "2000000",
                                                "/dev/zero"],
                               cwd=project.dir, env=env, stdin=subprocess.DEVNULL,
                               stdout=write_end, stderr=subprocess.DEVNULL)
    os.close(write_end)
    running = subprocess.Popen(mariner_cmd() + ["exec", "--", "sh", "-c",
                                                "echo started; sleep 60"],
                               cwd=project.dir, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert running.stdout.readline() == b"started\n"
        time.sleep(0.5)
        os.kill(agent, signal.SIGTERM)
        stopped = time.monotonic()
        out, err = running.communicate(timeout=15)
        deadline = time.monotonic() + 10
        while client.agent_pid(project.name) == agent and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.monotonic() - stopped
        assert client.agent_pid(project.name) != agent, "the agent did not exit"
    finally:
        running.kill()
        os.close(read_end)
        try:
            stalled.wait(15)
        except subprocess.TimeoutExpired:
            stalled.kill()
    assert running.returncode == 125 and took < 8, (running.returncode, took, err)
    assert len(err.decode().strip().splitlines()) == 1, err
