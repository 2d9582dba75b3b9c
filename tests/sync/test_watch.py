"""`sync --watch` against the real sshd: sees changes, folds bursts, survives a VM restart."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from mariner_dev.remote.target import target_for
from mariner_dev.sync import spec_for
from mariner_dev.sync.link import GuestLink
from mariner_dev.sync.watch import watch_over
from support.fixtures import REPO

from sync_helpers import LineReader, Lines, LoopThread, fresh_root, write
from support.fakehost import wait_for


class Watching:
    """watch_over running on a loop thread, with its output lines."""

    def __init__(self, cfg, record, guest_root):
        self.lines = Lines()
        self.ready = threading.Event()
        self.loop = LoopThread()
        self.link = GuestLink(target_for(cfg, record), self.lines)
        spec = spec_for(cfg, str(guest_root))
        self.future = self.loop.spawn(watch_over(spec, self.link, self.lines, self.ready.set))
        if not self.ready.wait(20):
            raise AssertionError(f"watch did not start: {self.lines.snapshot()}")

    def stop(self) -> None:
        self.loop.loop.call_soon_threadsafe(self.future.cancel)
        self.loop.call(self.link.close())
        self.loop.close()


@pytest.fixture
def watching():
    started = []

    def start(cfg, record, guest_root) -> Watching:
        w = Watching(cfg, record, guest_root)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def content(path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def test_watch_syncs_a_change_and_folds_a_burst(home, project, guest_root, watching):
    write(home / ".config/app/settings", "v0\n")
    write(home / ".zshrc", "z0\n")
    cfg, record = project('files = ["~/.config/app", "~/.zshrc"]\n').register()
    w = watching(cfg, record, guest_root)
    assert content(guest_root / ".config/app/settings") == b"v0\n"    # the initial sync
    write(home / ".zshrc", "z1\n")
    wait_for(lambda: content(guest_root / ".zshrc") == b"z1\n", 10, "the edit in the guest")
    # An editor's save storm: many writes and a rename in a few milliseconds -> one sync.
    target = home / ".config/app/settings"
    for i in range(30):
        target.write_text(f"draft {i}\n")
    tmp = home / ".config/app/.settings.swp"
    tmp.write_text("final\n")
    os.replace(tmp, target)
    wait_for(lambda: content(guest_root / ".config/app/settings") == b"final\n", 10,
               "the saved file in the guest")
    updates = wait_for(lambda: w.lines.having("~/.config/app/settings"), 5, "the report line")
    assert 1 <= len(updates) <= 2, w.lines.snapshot()
    assert not (guest_root / ".config/app/.settings.swp").exists()
    # Additions and deletions under a watched directory.
    write(home / ".config/app/new", "n\n")
    wait_for(lambda: content(guest_root / ".config/app/new") == b"n\n", 10, "the new file")
    (home / ".config/app/new").unlink()
    wait_for(lambda: not (guest_root / ".config/app/new").exists(), 10, "the removal")
    assert w.lines.having("removed  ~/.config/app/new")


def test_watch_survives_a_vm_restart(home, project, own_guest, watching):
    root = fresh_root(own_guest)
    try:
        write(home / ".gitconfig", "a\n")
        cfg, record = project('files = ["~/.gitconfig"]\n', on=own_guest).register()
        w = watching(cfg, record, root)
        own_guest.sshd.stop()
        wait_for(lambda: w.lines.having("lost the connection"), 20, "the drop")
        write(home / ".gitconfig", "changed while the VM was down\n")
        (root / ".gitconfig").unlink()    # and the guest lost its copy meanwhile
        own_guest.sshd.start()
        wait_for(lambda: content(root / ".gitconfig") == b"changed while the VM was down\n",
                   20, "the resync after the reconnect")
        assert w.lines.having("reconnected to VM")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_cli_watch_reports_changes_and_stops_on_ctrl_c(home, project, guest):
    # Through the CLI the files land in the guest's real home: a unique name, removed after.
    name = f".mt-watch-{secrets.token_hex(4)}"
    write(home / name / "conf", "one\n")
    p = project(f'files = ["~/{name}"]\n')
    p.register()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "mariner_dev", "sync", "--watch"], cwd=p.dir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = LineReader(proc.stdout)
    try:
        first = lines.next()
        assert first.startswith("added") and f"~/{name}/conf" in first, first
        assert "watching" in lines.next()
        write(home / name / "conf", "two\n")
        changed = lines.next()
        assert changed.startswith("updated") and f"~/{name}/conf" in changed
        assert (guest.home / name / "conf").read_text() == "two\n"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        err = proc.stderr.read()
        assert proc.returncode == 0, err
        assert b"stopped watching." in err and b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(guest.home / name, ignore_errors=True)
