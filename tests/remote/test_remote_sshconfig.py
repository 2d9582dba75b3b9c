"""mariner's ssh-config file, the Include line in ~/.ssh/config, and the real ssh client."""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from mariner_dev import paths, sshconfig
from support.tools import require_tool

USER_CONFIG = """\
# my own settings
Host work
    HostName work.example.com
    User me

Match host *.internal exec "true"
    ForwardAgent yes

Host *
    ServerAliveInterval 30
"""


@pytest.fixture
def user_config() -> Path:
    return Path.home() / ".ssh" / "config"


def _include() -> str:
    return f"Include {paths.ssh_config_file()}"


def test_creates_the_config_with_private_modes(user_config):
    assert not user_config.parent.exists()
    assert sshconfig.ensure_include() is None
    assert stat.S_IMODE(user_config.stat().st_mode) == 0o600
    assert stat.S_IMODE(user_config.parent.stat().st_mode) == 0o700
    assert _include() in user_config.read_text().splitlines()


def test_include_goes_on_top_once_and_keeps_the_users_entries(user_config):
    user_config.parent.mkdir(mode=0o700)
    user_config.write_text(USER_CONFIG)
    user_config.chmod(0o644)
    assert sshconfig.ensure_include() is None
    text = user_config.read_text()
    lines = text.splitlines()
    first_entry = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    assert lines[first_entry] == _include()
    assert text.endswith(USER_CONFIG)
    assert stat.S_IMODE(user_config.stat().st_mode) == 0o644
    assert sshconfig.ensure_include() is None
    assert user_config.read_text() == text


@pytest.mark.parametrize("existing", [
    "Include {path}\n", "include {path}\n", "Include={path}\n", "  Include \"{path}\"\n",
    "Host a\n  User b\nInclude ~/{rel}\n",
])
def test_an_existing_include_is_respected(user_config, existing):
    path = paths.ssh_config_file()
    rel = os.path.relpath(path, Path.home())
    user_config.parent.mkdir(mode=0o700)
    text = existing.format(path=path, rel=rel) + USER_CONFIG
    user_config.write_text(text)
    assert sshconfig.ensure_include() is None
    assert user_config.read_text() == text


def test_crlf_and_bom_are_preserved(user_config):
    user_config.parent.mkdir(mode=0o700)
    original = "\ufeff" + USER_CONFIG.replace("\n", "\r\n")
    user_config.write_bytes(original.encode())
    assert sshconfig.ensure_include() is None
    raw = user_config.read_bytes().decode()
    assert raw.startswith("\ufeff#")
    assert raw.endswith(original[1:])
    assert "\n" not in raw.replace("\r\n", "")
    assert f"\r\n{_include()}\r\n" in raw


def test_read_only_config_gets_instructions(user_config):
    user_config.parent.mkdir(mode=0o700)
    user_config.write_text(USER_CONFIG)
    user_config.chmod(0o444)
    advice = sshconfig.ensure_include()
    assert advice is not None and _include() in advice and "read-only" in advice
    assert user_config.read_text() == USER_CONFIG


def test_symlinked_config_gets_instructions(user_config, tmp_path):
    target = tmp_path / "managed-config"
    target.write_text(USER_CONFIG)
    user_config.parent.mkdir(mode=0o700)
    user_config.symlink_to(target)
    advice = sshconfig.ensure_include()
    assert advice is not None and _include() in advice and "symlink" in advice
    assert target.read_text() == USER_CONFIG and user_config.is_symlink()


def test_block_contents(project):
    block = sshconfig.render_block(project.target)
    lines = [l.strip() for l in block.splitlines()]
    assert lines[0] == f"Host mariner-{project.name}"
    for expected in ("HostName 127.0.0.1", f"Port {project.target.port}",
                     f"User {project.target.user}", f"IdentityFile {project.target.identity}",
                     "IdentitiesOnly yes", f"HostKeyAlias mariner-{project.name}",
                     f"UserKnownHostsFile {paths.known_hosts_file()}",
                     "StrictHostKeyChecking yes", "ForwardAgent no", "ForwardX11 no"):
        assert expected in lines
    assert "~" not in block


def test_vsock_only_vm_uses_mariner_as_proxy(project):
    target = replace(project.target, host=None, vsock_cid=42)
    block = sshconfig.render_block(target)
    proxy = next(l.strip() for l in block.splitlines() if l.strip().startswith("ProxyCommand"))
    assert "mariner_dev.remote.bridge 42 22" in proxy
    assert "Port" not in block


def test_entries_are_kept_per_vm_and_removed(project):
    other = replace(project.record, name="other-vm")
    other_cfg = replace(project.cfg, vm=replace(project.cfg.vm, name="other-vm"))
    sshconfig.write_entry(project.cfg, project.record)
    sshconfig.write_entry(other_cfg, other)
    sshconfig.write_entry(project.cfg, project.record)  # idempotent
    text = paths.ssh_config_file().read_text()
    assert text.count(f"Host mariner-{project.name}\n") == 1
    assert text.count("Host mariner-other-vm\n") == 1
    sshconfig.remove_entry("other-vm")
    text = paths.ssh_config_file().read_text()
    assert "mariner-other-vm" not in text and f"Host mariner-{project.name}" in text


def test_real_ssh_client_connects_through_the_include(project, user_config):
    user_config.parent.mkdir(mode=0o700)
    user_config.write_text(USER_CONFIG)
    sshconfig.write_entry(project.cfg, project.record)
    assert sshconfig.ensure_include() is None
    # OpenSSH takes ~ from the password database: point it at this test's config explicitly.
    result = subprocess.run([require_tool("ssh"), "-F", str(user_config), "-o", "BatchMode=yes",
                             f"mariner-{project.name}", "echo", "via-openssh"],
                            capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"via-openssh\n"


def test_cli_ssh_config_and_code_print(project, user_config):
    from support.fixtures import run_mariner

    printed = run_mariner("ssh-config", "--print", cwd=project.dir)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.decode() == sshconfig.render_block(project.target)
    assert not user_config.exists()
    written = run_mariner("ssh-config", cwd=project.dir)
    assert written.returncode == 0, written.stderr
    assert _include() in user_config.read_text()
    code = run_mariner("code", "--print", cwd=project.dir / "pkg" / "sub dir")
    assert code.returncode == 0, code.stderr
    mount = project.mount.replace(" ", "%20")
    assert code.stdout.decode() == (f"code --folder-uri vscode-remote://ssh-remote+mariner-"
                                    f"{project.name}{mount}/pkg/sub%20dir\n")
