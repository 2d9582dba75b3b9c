"""Where mariner keeps things, from the environment variables DESIGN.md fixes."""

from __future__ import annotations

import os
from pathlib import Path


def mariner_home() -> Path:
    """MARINER_HOME, else $XDG_STATE_HOME/mariner, else ~/.local/state/mariner."""
    if os.environ.get("MARINER_HOME"):
        return Path(os.environ["MARINER_HOME"]).expanduser().absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return (base / "mariner").absolute()


def user_config_file() -> Path:
    """The per-user config: $XDG_CONFIG_HOME/mariner/config.toml, else ~/.config/mariner/config.toml."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "mariner" / "config.toml"


def microvms_dir() -> Path:
    """The microvm.nix state directory (MARINER_MICROVMS_DIR, default /var/lib/microvms)."""
    return Path(os.environ.get("MARINER_MICROVMS_DIR") or "/var/lib/microvms")


def runtime_dir() -> Path:
    """A short directory for Unix sockets: $XDG_RUNTIME_DIR/mariner or /tmp/mariner-<uid>."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "mariner"
    return Path(f"/tmp/mariner-{os.getuid()}")


def vm_dir(name: str) -> Path:
    """mariner's per-VM directory in MARINER_HOME (rendered flake, manifests)."""
    return mariner_home() / "vms" / name


def default_flake_dir(name: str) -> Path:
    return vm_dir(name) / "flake"


def keys_dir() -> Path:
    return mariner_home() / "keys"


def known_hosts_file() -> Path:
    """mariner's own known_hosts: the pinned guest host keys, keyed by `mariner-<name>`."""
    return mariner_home() / "known_hosts"


def ssh_config_file() -> Path:
    """The mariner-owned ssh-config that ~/.ssh/config includes."""
    return mariner_home() / "ssh_config"


def ensure_private_dir(path: Path) -> Path:
    """Create a directory (and parents) readable only by the user."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
