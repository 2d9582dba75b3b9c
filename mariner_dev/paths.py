"""Where mariner keeps things, from the environment variables DESIGN.md fixes.

pathlib is imported by the functions that return a Path, not by this module: the exec fast
path uses the `*_str` functions, which return the same paths as strings.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def _normalized(path: str) -> str:
    """str(PurePosixPath(path)) without importing pathlib: repeated slashes and `.` parts go,
    `..` stays, and a root of exactly two slashes is kept, as POSIX allows."""
    rest = path.lstrip("/")
    root = "//" if len(path) - len(rest) == 2 else "/" if rest != path else ""
    return root + "/".join(part for part in rest.split("/") if part and part != ".") or "."


def mariner_home() -> Path:
    """MARINER_HOME, else $XDG_STATE_HOME/mariner, else ~/.local/state/mariner."""
    from pathlib import Path

    if os.environ.get("MARINER_HOME"):
        return Path(os.environ["MARINER_HOME"]).expanduser().absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return (base / "mariner").absolute()


def user_config_file() -> Path:
    """The per-user config: $XDG_CONFIG_HOME/mariner/config.toml, else ~/.config/mariner/config.toml."""
    from pathlib import Path

    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "mariner" / "config.toml"


def user_config_file_str() -> str:
    """user_config_file() as a string, for the exec fast path's cache check (it only stats it).

    The same file, except that where Path.home() raises (no $HOME and no password entry) this
    returns a path under `~` that does not exist."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = os.path.expanduser(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".config")
    return _normalized(os.path.join(base, "mariner", "config.toml"))


def microvms_dir() -> Path:
    """The microvm.nix state directory (MARINER_MICROVMS_DIR, default /var/lib/microvms)."""
    from pathlib import Path

    return Path(os.environ.get("MARINER_MICROVMS_DIR") or "/var/lib/microvms")


def runtime_dir() -> Path:
    """A short directory for Unix sockets: $XDG_RUNTIME_DIR/mariner or /tmp/mariner-<uid>."""
    from pathlib import Path

    return Path(runtime_dir_str())


def runtime_dir_str() -> str:
    """runtime_dir() as a string (normalized as str(runtime_dir()) is)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return _normalized(os.path.join(xdg, "mariner"))
    return f"/tmp/mariner-{os.getuid()}"


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
