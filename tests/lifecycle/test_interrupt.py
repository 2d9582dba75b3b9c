"""SIGINT or SIGTERM to a real `mariner up` in each of its phases; the next `up` completes.

Each test stops a real `mariner up` process (fake host, real sshd guest) while it is inside
one phase (allocation, render, build, start, wait for SSH, pin, dotfiles, post_create,
post_start), checks that it ended cleanly (130 or 143, one line, no traceback, nothing
half-written), then runs a plain `up` that must bring the VM to running, with its hooks done.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from support.fakehost import port_open


@pytest.fixture
def backend(monkeypatch) -> str:
    """These interruptions are the microvm backend's (sudo, systemd units); the runner
    backend's are not covered here yet."""
    monkeypatch.setenv("MARINER_BACKEND", "microvm")
    return "microvm"


WRAPPER = """import subprocess, sys
# Like sudo: the command runs on when this process is SIGKILLed (sudo cannot relay SIGKILL).
sys.exit(subprocess.Popen(sys.argv[1:], start_new_session=True).wait())
"""


def _home() -> Path:
    return Path(os.environ["MARINER_HOME"])


def _registry() -> dict:
    try:
        return json.loads((_home() / "registry.json").read_text())["vms"]
    except FileNotFoundError:
        return {}


class Up:
    """A `mariner up` running in the background, its stderr in a file."""

    def __init__(self, project, env: dict | None = None):
        self.project = project
        self.err_file = project.dir.parent / f"up-{uuid.uuid4().hex[:6]}.err"
        with open(self.err_file, "w") as err:
            self.proc = subprocess.Popen(project.argv("up"),
                                         cwd=project.dir, env={**os.environ, **(env or {})},
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)

    @property
    def stderr(self) -> str:
        return self.err_file.read_text()

    def wait_until(self, predicate, what: str, timeout: float = 90.0, poll: float = 0.02):
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"`mariner up` ended (exit {self.proc.returncode}) before {what}:\n"
                            f"{self.stderr}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.stderr}")
            time.sleep(poll)

    def interrupt(self, sig: int) -> None:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        err = self.stderr
        assert code == 128 + sig, (code, err)
        assert "Traceback" not in err, err
        word = "interrupted" if sig == signal.SIGINT else "terminated"
        last = err.rstrip().splitlines()[-1]
        assert last.startswith("mariner: ") and "`mariner up`" in last, err
        assert word in last or "hook was interrupted" in last, err


def _calls(project, prefix: list[str]) -> bool:
    return any(c[:len(prefix)] == prefix for c in project.host_calls())


def _completes(project) -> dict:
    """The next `up` (no knobs) brings the VM to running, with nothing left half-done."""
    result = project.up_json()
    assert result["state"] == "running"
    status = project.status_json()
    assert status["state"] == "running" and not status["outdated"], status
    record = _registry()[project.name]
    assert record["post_create_done"] and not record["post_start_pending"], record
    vm_dir = _home() / "vms" / project.name
    assert sorted(p.name for p in vm_dir.iterdir() if p.name.startswith(".flake")) == []
    assert [p.name for p in _home().iterdir() if p.name.endswith(".tmp")] == []
    # and one more `up` has nothing left to do
    again = project.up_json()
    assert not (again["created"] or again["updated"] or again["started"])
    return result


def test_allocation(project):
    """Waiting for the host-wide allocation lock (another user's mariner holds it)."""
    interrupted_waiting_for_the_allocation_lock(project, os.environ["MARINER_MICROVMS_DIR"])


def interrupted_waiting_for_the_allocation_lock(project, directory) -> None:
    """`up` waits while the allocation lock (an flock on `directory`) is held elsewhere; a
    SIGTERM then ends it having changed nothing, and the next `up` completes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        up = Up(project)
        up.wait_until(lambda: "checking the configuration" in up.stderr, "the config check")
        time.sleep(0.5)
        assert up.proc.poll() is None and project.name not in _registry()
        up.interrupt(signal.SIGTERM)
    finally:
        os.close(fd)
    assert project.changing_calls() == []
    _completes(project)


def test_render(project):
    """Writing the flake (a module directory of 15 MiB makes the write take a while)."""
    big = project.dir / "nix" / "big"
    big.mkdir(parents=True)
    (big / "default.nix").write_text("{ }\n")
    chunk = os.urandom(15 * 1024)
    for i in range(1000):
        (big / f"data{i:04}.bin").write_bytes(chunk)
    project.write(extra='[nix]\nmodules = ["nix/big"]\n')
    staging = _home() / "vms" / project.name
    up = Up(project)
    up.wait_until(lambda: staging.is_dir() and any(p.name.startswith(".flake.new-")
                                                   for p in staging.iterdir()),
                  "the flake's staging directory", poll=0.002)
    up.interrupt(signal.SIGINT)
    assert not any(p.name.startswith(".flake.new-") for p in staging.iterdir())
    assert project.changing_calls() == []
    _completes(project)


def test_build_under_sudo(project, tmp_path):
    """`microvm -c` under sudo: mariner's SIGKILL does not reach the build, which finishes
    while the next `up` builds too; that `up` takes the VM the first one created."""
    wrapper = tmp_path / "fake-sudo.py"
    wrapper.write_text(WRAPPER)
    sudo = {"MARINER_SUDO": f"{sys.executable} {wrapper}"}
    up = Up(project, {**sudo, "MARINER_FAKE_BUILD_DELAY": "8"})
    up.wait_until(lambda: _calls(project, ["microvm", "-c"]), "the build")
    up.interrupt(signal.SIGINT)
    proc = project.mariner("up", env={**sudo, "MARINER_FAKE_BUILD_DELAY": "16"}, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert len([c for c in project.host_calls() if c[:2] == ["microvm", "-c"]]) == 2
    assert "was created meanwhile" in proc.stderr
    _completes(project)


def test_start(project):
    """`systemctl start` is waiting for the job (the unit starts anyway, as with systemd)."""
    up = Up(project, {"MARINER_FAKE_START_DELAY": "10"})
    up.wait_until(lambda: _calls(project, ["systemctl", "start"]), "the start")
    time.sleep(0.3)
    up.interrupt(signal.SIGTERM)
    _completes(project)


def test_wait_for_ssh(project):
    up = Up(project, {"MARINER_FAKE_BOOT_DELAY": "5"})
    up.wait_until(lambda: "waiting for SSH" in up.stderr, "the wait for SSH")
    time.sleep(0.3)
    up.interrupt(signal.SIGINT)
    _completes(project)


def test_pin(project):
    """The guest's sshd just answered: the handshake that pins its key is under way (or
    about to be): stopped there, the VM runs with no key pinned."""
    interrupted_at_the_pin(project, signal.SIGTERM)


def interrupted_at_the_pin(project, sig: int) -> None:
    """`up` stopped the moment the guest's sshd answers; the next `up` pins and completes."""
    up = Up(project, {"MARINER_FAKE_BOOT_DELAY": "1"})
    up.wait_until(lambda: "waiting for SSH" in up.stderr, "the wait for SSH")
    port = _registry()[project.name]["ssh_port"]
    up.wait_until(lambda: port_open(port), "the guest's sshd", poll=0.005)
    up.interrupt(sig)
    _completes(project)


def test_a_running_vm_with_no_pinned_key_is_pinned_by_the_next_up(project):
    """What an `up` stopped before the first handshake leaves, made deterministic."""
    project.up_json()
    known = _home() / "known_hosts"
    known.write_text("".join(line for line in known.read_text().splitlines(True)
                             if f"mariner-{project.name}" not in line))
    _completes(project)
    assert f"mariner-{project.name} " in known.read_text()


def test_dotfiles(project):
    import pwd
    import shutil

    name = f".mariner-interrupt-{uuid.uuid4().hex[:8]}"
    source = Path(os.environ["HOME"]) / name
    source.mkdir()
    count = 3000     # enough that the sync is still under way when it is seen to have begun
    for i in range(count):
        (source / f"f{i:04}").write_text(f"{i}\n")
    user_config = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
    user_config.parent.mkdir(parents=True, exist_ok=True)
    user_config.write_text(f'[dotfiles]\nfiles = ["~/{name}"]\n')
    guest_copy = Path(pwd.getpwnam("mariner-guest").pw_dir) / name
    try:
        up = Up(project)
        up.wait_until(lambda: "syncing dotfiles" in up.stderr, "the dotfiles sync")
        # Under way: some files are in the guest (a fixed sleep lost the race on a fast sync)
        up.wait_until(lambda: guest_copy.is_dir() and any(guest_copy.iterdir()),
                      "the first synced file", poll=0.002)
        assert len(list(guest_copy.iterdir())) < count, "the sync ended before the interrupt"
        up.interrupt(signal.SIGINT)
        _completes(project)
        assert sorted(p.name for p in guest_copy.iterdir()) == sorted(
            p.name for p in source.iterdir())
    finally:
        shutil.rmtree(guest_copy, ignore_errors=True)


@pytest.mark.parametrize("hook,sig", [("post_create", signal.SIGTERM),
                                      ("post_start", signal.SIGINT)])
def test_hooks(project, hook, sig):
    interrupted_in_a_hook(project, hook, sig)


def interrupted_in_a_hook(project, hook: str, sig: int) -> None:
    """`up` stopped while `hook` runs in the guest; the next `up` runs it again to the end."""
    marker = project.dir / "hook.log"
    slow = project.dir / "slow"
    slow.write_text("")
    project.write(extra=f'[hooks]\n{hook} = "echo run >> {marker}; '
                        f'if [ -e {slow} ]; then sleep 30; fi; echo done >> {marker}"\n')
    up = Up(project)
    up.wait_until(lambda: marker.exists() and "run" in marker.read_text(), f"the {hook} hook")
    up.interrupt(sig)
    slow.unlink()
    _completes(project)
    lines = marker.read_text().split()
    assert lines.count("run") == 2 and lines[-1] == "done", lines


def test_a_hook_leaves_the_callers_signal_handlers_in_place(project):
    """run_hook forwards SIGINT/SIGTERM to the hook through asyncio, which resets them to their
    defaults afterwards: a SIGTERM after the first hook would kill `up` with no cleanup."""
    from mariner_dev import remote
    from mariner_dev.config import load_project
    from mariner_dev.state import Registry

    project.up_json()
    cfg = load_project(project_dir=project.dir)
    target = remote.target_for(cfg, Registry().get(project.name))

    def mine(signum, frame):
        raise AssertionError("not expected to run")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert remote.run_hook(target, "exit 3", cwd="/", env={}) == 3
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
