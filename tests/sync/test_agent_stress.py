"""The agent under concurrency: many clients at once (exec with and without stdin, a sync, a
forward) each get exactly their own bytes and exit status.

Bounded and quick (a few seconds per round on two cores): 64 concurrent `mariner exec` calls
through one agent, several rounds, half of them streaming stdin of their own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading

import pytest

from mariner_dev.remote import client
from mariner_dev.remote.target import target_for
from support.fixtures import REPO, mariner_cmd
from support.guest_sshd import free_port

from sync_helpers import EchoServer, echo_roundtrip, write

CLIENTS = 64
ROUNDS = int(os.environ.get("MARINER_STRESS_ROUNDS", "3"))   # more when hunting a race


def _env(path_file) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.update(MARINER_AGENT="require", MARINER_DEBUG_PATH_FILE=str(path_file))
    return env


def _start_exec(p, n: int, env: dict, with_stdin: bool) -> tuple[subprocess.Popen, bytes]:
    """Client `n`: distinct stdout, stderr and exit status; with_stdin also echoes its own
    input back (through `cat`), so a mixed-up stdin shows as wrong bytes."""
    if with_stdin:
        payload = (f"stdin-{n}:".encode() + secrets.token_hex(2048 + n).encode()) * 4
        script = f'cat; printf "out-{n}\\n"; printf "err-{n}\\n" >&2; exit {n % 200 + 1}'
    else:
        payload = b""
        script = f'printf "out-{n}\\n"; printf "err-{n}\\n" >&2; exit {n % 200 + 1}'
    proc = subprocess.Popen(mariner_cmd() + ["exec", "-w", "/", "--", "sh", "-c", script],
                            cwd=p.dir, env=env,
                            stdin=subprocess.PIPE if with_stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, payload


def _finish(proc: subprocess.Popen, payload: bytes, timeout: float = 120):
    out, err = proc.communicate(payload if proc.stdin else None, timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def test_concurrent_clients_get_exactly_their_own_bytes(home, guest, project, agents, echo,
                                                        tmp_path):
    tree = f".mt-stress-{secrets.token_hex(4)}"
    for i in range(20):
        write(home / tree / f"f{i}.txt", f"file {i}\n" * (i + 1))
    for _attempt in range(5):
        # free_port() races with the other suites on this host: take one the agent holds.
        host_port = free_port()
        p = project(f'files = ["~/{tree}"]\n',
                    extra=f'[ports]\nforward = ["{host_port}:{echo.port}"]\n', name="stress")
        cfg, record = p.register()
        target = target_for(cfg, record)
        info = client.ensure_agent(target, warn=lambda line: None)
        if [f["state"] for f in info["forwards"]] == ["listening"]:
            break
        client.stop_agent(cfg.name)
    else:
        pytest.fail("no free host port for the forward")
    pid = client.agent_pid(cfg.name)
    env = _env(tmp_path / "served")
    try:
        for round_ in range(ROUNDS):
            started = [(n, *_start_exec(p, n, env, with_stdin=n % 2 == 1))
                       for n in range(CLIENTS)]
            # A sync and a forward in the same moment.
            sync = subprocess.Popen(mariner_cmd() + ["sync"], cwd=p.dir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            forwarded: list = []
            blob = secrets.token_bytes(256 * 1024)

            def roundtrip():
                try:
                    forwarded.append(echo_roundtrip(host_port, blob))
                except OSError as exc:
                    forwarded.append(exc)
            fwd = threading.Thread(target=roundtrip)
            fwd.start()
            results = {}
            threads = []
            for n, proc, payload in started:
                t = threading.Thread(target=lambda n=n, proc=proc, payload=payload:
                                     results.__setitem__(n, (_finish(proc, payload), payload)))
                t.start()
                threads.append(t)
            for t in threads:
                t.join(180)
            sync_out, sync_err = sync.communicate(timeout=120)
            fwd.join(60)
            wrong = []
            for n in range(CLIENTS):
                (status, out, err), payload = results[n]
                want = (n % 200 + 1, payload + f"out-{n}\n".encode(), f"err-{n}\n".encode())
                if (status, out, err) != want:
                    wrong.append((n, status, out[-60:], err[-200:]))
            assert not wrong, f"round {round_}: {len(wrong)} wrong: {wrong[:5]}"
            assert sync.returncode == 0, sync_err
            assert b"Traceback" not in sync_err
            if forwarded != [blob]:
                got = forwarded[0] if forwarded else None
                if isinstance(got, bytes):
                    at = next((i for i, (a, b) in enumerate(zip(got, blob)) if a != b),
                              min(len(got), len(blob)))
                    got = f"{len(got)} bytes, first difference at {at}: {got[at:at + 40]!r}"
                log = client.log_path(cfg.name)
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                pytest.fail(f"round {round_}: the forward got {got!r} "
                            f"(forwards: {client.agent_forwards(target)['forwards']}); "
                            f"agent log:\n{tail}")
            assert client.agent_pid(cfg.name) == pid     # one agent served it all
        for i in range(20):
            assert (guest.home / tree / f"f{i}.txt").read_text() == f"file {i}\n" * (i + 1)
        served = (tmp_path / "served").read_text().split()
        assert served == ["agent"] * (ROUNDS * (CLIENTS + 1))
    finally:
        shutil.rmtree(guest.home / tree, ignore_errors=True)
