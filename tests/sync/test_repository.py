"""`[dotfiles] repository` + `install`: cloned in the guest from a local bare repository."""

from __future__ import annotations

import os
import time
import subprocess
from pathlib import Path

import pytest

from mariner_dev.sync import sync_once
from mariner_dev.sync.repository import RepositoryError
from support.tools import require_tool


def git(*args: str, cwd: Path | None = None) -> str:
    # The bare repository belongs to the guest account; the test pushes to it as another user.
    config = Path(os.environ["HOME"]).parent / "test-gitconfig"
    if not config.exists():
        config.write_text("[safe]\n\tdirectory = *\n")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_GLOBAL=str(config))
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def dotrepo(guest, tmp_path):
    """make(files) -> file:// URL of a bare repository the guest account can read."""
    require_tool("git")
    made = []

    def make(files: dict[str, str], name: str = "dots") -> tuple[str, callable]:
        work = tmp_path / f"{name}-work"
        work.mkdir()
        git("init", "-q", "-b", "main", cwd=work)

        def commit(more: dict[str, str]) -> None:
            for rel, text in more.items():
                path = work / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                if rel.endswith(".sh") or "/" not in rel and rel in ("install", "setup"):
                    path.chmod(0o755)
            git("add", "-A", cwd=work)
            git("commit", "-q", "-m", "dots", cwd=work)
            git("push", "-q", str(bare), "main", cwd=work)

        bare = guest.scratch / f"{name}-{os.getpid()}-{len(made)}.git"
        git("init", "-q", "--bare", "-b", "main", str(bare))
        made.append(bare)
        commit(files)
        subprocess.run(["chmod", "-R", "a+rX", str(bare)], check=True)
        subprocess.run(["chown", "-R", str(guest.uid), str(bare)], check=True)
        return f"file://{bare}", commit

    yield make
    import shutil

    for bare in made:
        shutil.rmtree(bare, ignore_errors=True)


INSTALL = """#!/bin/sh
set -e
echo "ran in $(pwd)" >> "$HOME/install.log"
cp .vimrc "$HOME/.vimrc-installed"
"""


def test_clone_and_install_script(project, dotrepo, guest_root):
    url, commit = dotrepo({"install.sh": INSTALL, ".vimrc": "set nu\n"})
    p = project(f'repository = "{url}"\n')
    cfg, record = p.register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert (guest_root / "dotfiles/.git").is_dir()
    assert (guest_root / ".vimrc-installed").read_text() == "set nu\n"
    log = (guest_root / "install.log").read_text().splitlines()
    assert log == [f"ran in {guest_root}/dotfiles"]
    assert report.repository == ["repository cloned ~/dotfiles", "ran install.sh in ~/dotfiles"]

    # Same settings: nothing runs again.
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert report.repository == []
    assert len((guest_root / "install.log").read_text().splitlines()) == 1

    # After a rebuild (`up` asks for install): the clone is updated and the install re-runs.
    commit({".vimrc": "set nu rnu\n"})
    report = sync_once(cfg, record, guest_root=str(guest_root), install=True)
    assert report.repository == ["repository updated ~/dotfiles", "ran install.sh in ~/dotfiles"]
    assert (guest_root / ".vimrc-installed").read_text() == "set nu rnu\n"
    assert len((guest_root / "install.log").read_text().splitlines()) == 2


def test_install_command_and_target_from_config(project, dotrepo, guest_root):
    url, _ = dotrepo({"scripts/go.sh": "#!/bin/sh\necho custom > \"$HOME/custom\"\n",
                      "install.sh": "#!/bin/sh\nexit 9\n"})
    p = project(f'repository = "{url}"\ninstall = "scripts/go.sh"\ntarget = "~/src/dots"\n')
    cfg, record = p.register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert (guest_root / "src/dots/.git").is_dir()
    assert (guest_root / "custom").read_text() == "custom\n"
    assert report.repository[-1] == "ran scripts/go.sh in ~/src/dots"
    # A changed install command runs again, without a new clone.
    p.write(f'repository = "{url}"\ninstall = "echo shell >> \\"$HOME/custom\\""\n'
            f'target = "~/src/dots"\n')
    cfg, record = p.register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert (guest_root / "custom").read_text() == "custom\nshell\n"


def test_without_a_script_the_dotfiles_are_linked(project, dotrepo, guest_root):
    url, _ = dotrepo({".vimrc": "v\n", ".tmux.conf": "t\n", "README.md": "r\n",
                      ".gitignore": "x\n"})
    (guest_root / ".tmux.conf").write_text("the guest's own\n")
    cfg, record = project(f'repository = "{url}"\n').register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert os.readlink(guest_root / ".vimrc") == f"{guest_root}/dotfiles/.vimrc"
    assert (guest_root / ".vimrc").read_text() == "v\n"
    assert (guest_root / ".tmux.conf").read_text() == "the guest's own\n"   # not clobbered
    assert not (guest_root / ".gitignore").exists() and not (guest_root / "README.md").exists()
    assert "linked ~/.vimrc" in report.repository
    assert "kept ~/.tmux.conf (the guest already has one)" in report.repository


def test_a_failing_install_is_an_error_with_its_output(project, dotrepo, guest_root):
    url, _ = dotrepo({"install.sh": "#!/bin/sh\necho about to fail\nexit 3\n"})
    cfg, record = project(f'repository = "{url}"\n').register()
    with pytest.raises(RepositoryError) as info:
        sync_once(cfg, record, guest_root=str(guest_root))
    assert "exited with status 3" in info.value.message
    assert "about to fail" in info.value.message


def test_a_bad_repository_is_an_error(project, guest_root, guest):
    cfg, record = project(f'repository = "file://{guest.scratch}/no-such.git"\n').register()
    with pytest.raises(RepositoryError) as info:
        sync_once(cfg, record, guest_root=str(guest_root))
    assert "could not clone" in info.value.message


def test_an_install_that_hangs_is_stopped_after_the_timeout(project, dotrepo, guest_root):
    url, _ = dotrepo({"install.sh": "#!/bin/sh\necho $$ > \"$HOME/install.pid\"\n"
                                    "sleep 300\n"})
    cfg, record = project(f'repository = "{url}"\ntimeout = 2\n').register()
    assert cfg.dotfiles.timeout == 2
    started = time.monotonic()
    with pytest.raises(RepositoryError) as info:
        sync_once(cfg, record, guest_root=str(guest_root))
    assert time.monotonic() - started < 20
    assert "install in ~/dotfiles did not finish within 2 s" in info.value.message
    assert "[dotfiles] timeout" in info.value.hint
    pid = int((guest_root / "install.pid").read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")          # stopped, not left running
