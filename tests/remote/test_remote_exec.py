"""`mariner exec` against a real sshd, through the agent and directly (every test runs both)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from support.fixtures import mariner_cmd, run_mariner, REPO

ARGV_CORPUS = [
    "plain", "two words", "it's", 'say "hi"', "$HOME", "${PATH}", "`id`", "$(id)",
    "back\\slash", "\\\\double", "semi;colon", "p|ipe", "amp&", "*", "?", "[a]", "~", "#hash",
    "new\nline", "", " ", "\t", "ünïcødé ✓ 日本", "-n", "--", "-e", "trailing space ",
    "a'b\"c$d`e\\f", "!bang", "{a,b}", "<in", ">out", "%s %d",
]


def test_argv_arrives_exactly(mx):
    result = mx("--", "printf", "%s\\0", *ARGV_CORPUS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split("\0")[:-1] == ARGV_CORPUS


def test_command_is_not_reinterpreted_by_a_shell(mx):
    # One argument with shell syntax stays one argument to the program, never parsed.
    result = mx("--", "echo", "a; exit 9")
    assert (result.returncode, result.stdout) == (0, b"a; exit 9\n")


@pytest.mark.parametrize("script, status", [
    ("exit 0", 0), ("exit 3", 3), ("exit 255", 255),
    ("kill -TERM $$", 128 + signal.SIGTERM), ("kill -KILL $$", 128 + signal.SIGKILL),
    ("kill -SEGV $$", 128 + signal.SIGSEGV),
])
def test_exit_status_passes_through(mx, script, status):
    result = mx("--", "sh", "-c", script)
    assert result.returncode == status, result.stderr


def test_missing_command_is_127(mx):
    result = mx("--", "no-such-command-here")
    assert result.returncode == 127


def test_stdin_is_streamed_and_eof_reaches_the_remote(mx):
    data = b"first line\nsecond\x00line\xff\n" * 1000
    result = mx("--", "sh", "-c", "cat; echo got-eof >&2", input=data)
    assert result.returncode == 0
    assert result.stdout == data
    assert b"got-eof" in result.stderr


def test_no_stdin_means_immediate_eof(mx):
    # stdin is /dev/null (not a terminal): the remote read ends at once.
    result = mx("--", "sh", "-c", "wc -c")
    assert (result.returncode, result.stdout.strip()) == (0, b"0")


def test_binary_output_is_exact(mx):
    payload = bytes(range(256)) * 4096
    result = mx("-i", "--", "cat", input=payload)
    assert result.stdout == payload
    result = mx("--", "printf", "\\000\\377\\r\\n\\001")
    assert result.stdout == b"\x00\xff\r\n\x01"


def test_stdout_and_stderr_stay_separate(mx):
    result = mx("--", "sh", "-c", "echo to-out; echo to-err >&2; echo out2")
    assert result.stdout == b"to-out\nout2\n"
    assert result.stderr == b"to-err\n"


def test_environment_from_toml_env_file_and_flags(mx, tmp_path):
    env_file = tmp_path / "vars.env"
    env_file.write_text("# comment\n\nFROM_FILE=file value\nexport OVERRIDDEN=from file\n"
                        "TRICKY=$HOME 'q' \"d\" `x` \\\n")
    result = mx("--env-file", str(env_file), "-e", "OVERRIDDEN=from flag", "-e",
                "SPACED=a  b", "-eGLUED=1", "--env", "EMPTY=", "-e", "FROM_HERE",
                "--", "sh", "-c",
                'printf "%s|" "$FROM_TOML" "$FROM_FILE" "$OVERRIDDEN" "$SPACED" "$GLUED" '
                '"${EMPTY-unset}" "$FROM_HERE" "$TRICKY"',
                env={"FROM_HERE": "local value"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split("|")[:-1] == [
        "toml value", "file value", "from flag", "a  b", "1", "", "local value",
        "$HOME 'q' \"d\" `x` \\"]


def test_bad_env_name_is_a_usage_error(mx):
    result = mx("-e", "1BAD=x", "--", "true", served=False)
    assert result.returncode == 2
    assert b"1BAD" in result.stderr


def test_login_environment(mx):
    # Debian's /etc/profile (like NixOS's) sets PATH; sshd's default PATH lacks /usr/games
    # under /usr/local: its presence proves the command ran in a login environment.
    result = mx("--", "sh", "-c", 'echo "$PATH"')
    assert "/usr/local/games" in result.stdout.decode()


def test_workdir_maps_the_current_directory(mx, project, tmp_path):
    sub = project.dir / "pkg" / "sub dir"
    assert mx("--", "sh", "-c", "pwd", cwd=sub).stdout.decode() == \
        f"{project.mount}/pkg/sub dir\n"
    assert mx("--", "sh", "-c", "pwd", cwd=project.dir).stdout.decode() == project.mount + "\n"
    # Outside the project (with -C): the workspace mount.
    outside = mx("-C", str(project.dir), "--", "sh", "-c", "pwd", cwd=tmp_path)
    assert outside.stdout.decode() == project.mount + "\n"
    # -w overrides: absolute as given, relative to the mapped directory.
    assert mx("-w", "/tmp", "--", "sh", "-c", "pwd").stdout == b"/tmp\n"
    assert mx("-w", "sub dir", "--", "sh", "-c", "pwd", cwd=project.dir / "pkg").stdout.decode() \
        == f"{project.mount}/pkg/sub dir\n"


def test_missing_workdir_fails_with_125(mx):
    result = mx("-w", "/no/such/dir", "--", "true")
    assert result.returncode == 125
    assert b"/no/such/dir" in result.stderr


def test_no_tty_by_default_when_not_a_terminal(mx):
    result = mx("--", "sh", "-c", "tty; [ -t 1 ] && echo out-is-tty || echo out-not-tty")
    assert result.stdout.decode().splitlines() == ["not a tty", "out-not-tty"]


def test_tty_forced_with_t(mx):
    result = mx("-t", "--", "sh", "-c", "tty; [ -t 1 ] && echo out-is-tty; echo \"$TERM\"")
    lines = result.stdout.decode().replace("\r", "").splitlines()
    assert lines[0].startswith("/dev/pts/"), lines
    assert lines[1:] == ["out-is-tty", "xterm-256color"]


def test_user_switch_runs_through_sudo(mx):
    # The guest account may not sudo here: the failure must come from sudo in the guest,
    # proving -u was turned into `sudo -u`, while the same command without -u works.
    assert mx("--", "true").returncode == 0
    result = mx("-u", "root", "--", "id", "-un")
    assert result.returncode != 0
    assert b"sudo" in result.stderr


def _rss_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _agent_pid(name: str) -> int:
    from mariner_dev.remote.client import agent_pid

    pid = agent_pid(name)
    assert pid is not None
    return pid


def _exec_counting(mx, project, args, expect_bytes):
    """Run exec with stdout to a pipe we drain; returns (bytes read, client peak RSS KiB)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([*mariner_cmd(), "exec", *args], cwd=project.dir, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    peak = [0]

    def sample():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], _rss_hwm_kib(proc.pid))
            except (OSError, AssertionError):
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    total = 0
    while True:
        chunk = proc.stdout.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    sampler.join()
    return total, peak[0]


def test_100mb_of_output_with_flat_memory(mx, project):
    size = 100 * 1000 * 1000
    small, small_peak = _exec_counting(mx, project, ["--", "head", "-c", "1000", "/dev/zero"], 1000)
    # The agent's buffers reach their bound (the channel window and the writer's queue, ~12
    # MiB) on a first large output; what is measured is growth beyond that with 5x the output.
    warm = 20 * 1000 * 1000
    warmed, _ = _exec_counting(mx, project, ["--", "head", "-c", str(warm), "/dev/zero"], warm)
    agent_before = _rss_hwm_kib(_agent_pid(project.name)) if mx.mode == "require" else 0
    total, peak = _exec_counting(mx, project, ["--", "head", "-c", str(size), "/dev/zero"], size)
    assert (small, warmed, total) == (1000, warm, size)
    # Neither process grows with the output: a bounded queue, not the whole stream.
    assert peak < small_peak + 40 * 1024, (peak, small_peak)
    if mx.mode == "require":
        agent_after = _rss_hwm_kib(_agent_pid(project.name))
        assert agent_after < agent_before + 24 * 1024, (agent_before, agent_after)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 7), (signal.SIGINT, 8)])
def test_signals_are_forwarded(mx, project, sig, code):
    name = signal.Signals(sig).name[3:]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    script = (f'trap "echo got-{name}; exit {code}" {name}; echo ready; '
              f'while :; do sleep 0.05; done')
    proc = subprocess.Popen([*mariner_cmd(), "exec", "--", "sh", "-c", script], cwd=project.dir,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert out == f"got-{name}\n".encode(), err
    assert proc.returncode == code
    assert mx.served()[-1] == mx.expected


def test_output_into_a_closed_pipe_stops_the_command(mx, project):
    # `mariner exec -- yes | head -1` must end, not stream forever.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    cmd = " ".join(mariner_cmd()) + " exec -- yes | head -n 1"
    result = subprocess.run(["sh", "-c", cmd], cwd=project.dir, env=env, capture_output=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.stdout == b"y\n"
