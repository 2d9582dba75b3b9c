"""The ssh-config entries that let plain `ssh` and VS Code Remote-SSH reach mariner's VMs.

mariner owns one file, `paths.ssh_config_file()`, holding a `Host mariner-<name>` block per
VM, and adds a single `Include` line for it at the top of the user's ~/.ssh/config (once,
never touching the user's own entries). Every path written is absolute: OpenSSH expands `~`
from the password database, not from $HOME. The pinned host key is checked strictly.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from . import paths
from .errors import MarinerError
from .fsutil import file_lock, write_atomic

HEADER = ("# Managed by mariner: one Host block per VM, rewritten by `mariner up` and\n"
          "# `mariner ssh-config`; edits here are lost. Your own ~/.ssh/config includes it.\n")
INCLUDE_COMMENT = "# Added by mariner (mariner ssh-config): reach VMs as `ssh mariner-<name>`"
_HOST_LINE = re.compile(r"^\s*Host\s+(\S+)\s*$", re.IGNORECASE)


def _arg(value: str) -> str:
    """One ssh_config argument: double-quoted when it holds whitespace."""
    if '"' in value or "\n" in value:
        raise MarinerError(f"cannot write {value!r} into an ssh-config file (it contains a "
                           f"double quote or a newline)")
    return f'"{value}"' if (not value or any(c.isspace() for c in value)) else value


def bridge_command(cid: int, port: int = 22) -> str:
    """The ProxyCommand of a vsock-only VM: mariner itself as a stdio<->vsock bridge."""
    argv = [sys.executable, "-m", "mariner_dev.remote.bridge", str(cid), str(port)]
    # ProxyCommand runs through /bin/sh; `%` starts an ssh token and must be doubled.
    return " ".join(shlex.quote(a) for a in argv).replace("%", "%%")


def render_block(target) -> str:
    """The `Host mariner-<name>` block of one VM's GuestTarget."""
    lines = [f"Host {target.alias}"]
    if target.host is None:
        lines += [f"  HostName {target.alias}",
                  f"  ProxyCommand {bridge_command(target.vsock_cid)}"]
    else:
        lines += [f"  HostName {target.host}", f"  Port {target.port}"]
    lines += [
        f"  User {_arg(target.user)}",
        f"  IdentityFile {_arg(str(Path(target.identity).absolute()))}",
        "  IdentitiesOnly yes",
        f"  HostKeyAlias {target.alias}",
        f"  UserKnownHostsFile {_arg(str(Path(target.known_hosts).absolute()))}",
        "  StrictHostKeyChecking yes",
        "  CheckHostIP no",
        f"  ForwardAgent {'yes' if target.forward_agent else 'no'}",
        "  ForwardX11 no",
    ]
    return "\n".join(lines) + "\n"


def _blocks(text: str) -> dict[str, str]:
    """The Host blocks of mariner's file, by alias (anything else in it is dropped)."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _HOST_LINE.match(line)
        if match:
            current = match.group(1)
            blocks[current] = [line.rstrip()]
        elif current is not None and line.strip() and not line.lstrip().startswith("#"):
            blocks[current].append(line.rstrip())
    return {alias: "\n".join(lines) + "\n" for alias, lines in blocks.items()}


def _update(alias: str, block: str | None) -> Path:
    file = paths.ssh_config_file()
    paths.ensure_private_dir(file.parent)
    with file_lock(file.with_name(file.name + ".lock"), what="mariner's ssh-config"):
        try:
            blocks = _blocks(file.read_text())
        except FileNotFoundError:
            blocks = {}
        if block is None:
            if alias not in blocks and file.exists():
                return file
            blocks.pop(alias, None)
        else:
            blocks[alias] = block
        body = "\n".join(blocks[a] for a in sorted(blocks))
        write_atomic(file, HEADER + ("\n" + body if body else ""), mode=0o600)
    return file


def write_entry(cfg, record) -> Path:
    """Write (or refresh) the VM's Host block in mariner's ssh-config; returns the file."""
    from .remote.target import target_for

    target = target_for(cfg, record)
    return _update(target.alias, render_block(target))


def remove_entry(name: str) -> None:
    """Drop the VM's Host block (destroy)."""
    from .remote.target import alias_for

    _update(alias_for(name), None)


def user_ssh_config() -> Path:
    return Path.home() / ".ssh" / "config"


def include_line() -> str:
    return f"Include {_arg(str(paths.ssh_config_file()))}"


def _includes_ours(text: str, ours: Path) -> bool:
    home = str(Path.home())
    for raw in text.splitlines():
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.replace("=", " ", 1).partition(" ")
        if keyword.lower() != "include":
            continue
        try:
            args = shlex.split(rest)
        except ValueError:
            args = rest.split()
        for arg in args:
            expanded = home + arg[1:] if arg.startswith("~/") else arg
            if os.path.normpath(expanded) == os.path.normpath(str(ours)):
                return True
    return False


def ensure_include(user_config: Path | None = None) -> str | None:
    """Add `Include <mariner's file>` at the top of ~/.ssh/config once.

    Returns None when the line is there (added now or before), else the instructions for the
    user (a symlinked config, e.g. from home-manager, or one we may not write).
    """
    config = user_config or user_ssh_config()
    ours = paths.ssh_config_file()
    line = include_line()

    def instructions(why: str) -> str:
        return (f"{config} {why}; add this line at its top (before any Host or Match block) "
                f"so that `ssh mariner-<name>` and VS Code find mariner's VMs:\n    {line}")

    if config.is_symlink():
        return instructions("is a symlink (managed by another tool, e.g. home-manager)")
    if not config.exists():
        folder = config.parent
        if folder.is_symlink() and not folder.exists():
            return instructions(f"cannot be created ({folder} is a dangling symlink)")
        if folder.exists() and not folder.is_dir():
            return instructions(f"cannot be created ({folder} is not a directory)")
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # created meanwhile (another mariner): read it below, like any existing one
        except OSError as exc:
            return instructions(f"cannot be created ({exc.strerror})")
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{INCLUDE_COMMENT}\n{line}\n")
            return None
    try:
        raw = config.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        return instructions(f"cannot be read ({exc.strerror})")
    except UnicodeDecodeError:
        return instructions("is not UTF-8 text")
    if _includes_ours(text, ours):
        return None
    st = config.stat()
    if not st.st_mode & 0o222:
        return instructions("is read-only")
    newline = "\r\n" if "\r\n" in text else "\n"
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    rest = text[len(bom):]
    updated = f"{bom}{INCLUDE_COMMENT}{newline}{line}{newline}{newline}{rest}"
    try:
        write_atomic(config, updated, mode=st.st_mode & 0o7777)
        try:
            os.chown(config, st.st_uid, st.st_gid)
        except OSError:
            pass
    except OSError as exc:
        return instructions(f"cannot be written ({exc.strerror})")
    return None


def vscode_uri(alias: str, guest_path: str) -> str:
    from urllib.parse import quote

    return f"vscode-remote://ssh-remote+{alias}{quote(guest_path)}"


def vscode_command(alias: str, guest_path: str) -> list[str]:
    """`code --folder-uri vscode-remote://ssh-remote+mariner-<name><guest path>`."""
    return ["code", "--folder-uri", vscode_uri(alias, guest_path)]
