"""Which host directories may be handed to a VM: the project directory and `[[shares]]` sources.

The attack: virtiofsd serves a share with its own credentials, so a share hands the VM
everything below its source. A share of `/nix`, `/var` or `~/.config` gives away as much as a
share of `/` (the Nix store's secrets, other users' VM volumes, every token under ~/.config),
and a share of the home directory or a parent of it gives away `~/.ssh`. The `mariner.toml`
that asks for a share may come from a cloned repository, or from the VM itself, which can
write the project directory. So shares are an allowlist, not a denylist: a source (and the
project directory, which is always shared read-write) must be

- a directory the developer owns,
- outside the system trees (/, /nix, /usr, /var, /etc, /boot, /root, /run, /proc, /sys,
  /dev), unless it lies inside the developer's home (on some systems /home is /var/home),
- neither the home directory nor a parent of it,
- neither containing nor inside credential stores or mariner's own state (~/.ssh, ~/.gnupg,
  ~/.aws, ~/.config, MARINER_HOME, the microvms state directory),

all checked on the resolved real path, so a symlink cannot dress one directory up as another.
`validate` (and so every command that loads the config) refuses the rest with exit 2, whatever
`mariner trust` approved. `[[shares]]` are read-only unless `readonly = false` asks otherwise.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

SYSTEM_TREES = ("/nix", "/usr", "/var", "/etc", "/boot", "/root", "/run", "/proc", "/sys",
                "/dev")
# Under the home directory: where credentials live (whole trees: ~/.config holds the tokens of
# gh, gcloud, hub, docker helpers and more).
CREDENTIAL_DIRS = (".ssh", ".gnupg", ".aws", ".config")


def _inside(path: str, root: str) -> bool:
    """True when `path` is strictly below `root` (both real, normalised paths)."""
    return path != root and path.startswith(root.rstrip("/") + "/")


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def protected_dirs(homes: list[str]) -> list[tuple[str, str]]:
    """(real path, what it is) of every directory no share may contain or lie in."""
    from . import paths

    out = []
    for home in homes:
        for name in CREDENTIAL_DIRS:
            out.append((os.path.realpath(os.path.join(home, name)), f"~/{name}"))
    out.append((os.path.realpath(paths.mariner_home()), "MARINER_HOME, mariner's own state"))
    out.append((os.path.realpath(paths.microvms_dir()), "the microvm state directory"))
    # The runner backend's VM state: the runner mariner executes as you and its supervisor's
    # records. A guest that could write them would choose what mariner runs on the host.
    from .host.userhost import state_root

    out.append((os.path.realpath(state_root().parent),
                "mariner's runner state ($XDG_DATA_HOME/mariner)"))
    return out


def refusal(path: Path, developer_uid: int, homes: list[Path | None]) -> str | None:
    """Why `path` may not be shared with a VM (one clause, naming the rule), or None.

    `homes`: the developer's home directories ($HOME and the account's), None entries ignored.
    """
    real = os.path.realpath(path)
    home_reals = sorted({os.path.realpath(h) for h in homes if h is not None} - {"/"})
    if real == "/":
        return "it is the root directory (/), which holds everything on the host"
    for home in home_reals:
        if real == home:
            return (f"it is your home directory ({home}), which holds your keys and "
                    f"credentials; share a directory under it instead")
        if _inside(home, real):
            return f"it contains your home directory {home}"
    if not any(_inside(real, home) for home in home_reals):
        for tree in SYSTEM_TREES:
            if real == tree or _inside(real, tree):
                return f"it is in the system tree {tree}, not a directory of yours"
    for protected, what in protected_dirs(home_reals):
        if real == protected or _inside(real, protected):
            return f"it is inside {what} ({protected})"
        if _inside(protected, real):
            return f"it contains {what} ({protected})"
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if st.st_uid != developer_uid:
        return (f"it belongs to {_owner(st.st_uid)}, not to you ({_owner(developer_uid)}); "
                f"virtiofsd serves shares as you")
    return None
