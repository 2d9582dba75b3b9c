"""The developer: the one person mariner acts for, also when it runs as root or under sudo.

Everything that acts "as the developer" uses these ids: the guest user's default uid and gid
(so files the VM writes into the project belong to the developer), the identity virtiofsd
serves shares with, and the owner of files mariner writes for the developer. Without one
answer, `sudo mariner up` would give the guest user the ids of root's fallback while the
project belongs to someone else, and the guest could not write the workspace.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

# The guest defaults when the developer is root or a system account (they make no sense as
# the ids of a login user in the guest): NixOS's first normal uid and its `users` group.
GUEST_FALLBACK_UID = 1000
GUEST_FALLBACK_GID = 100
_FIRST_NORMAL_ID = 1000
_LAST_NORMAL_ID = 65533   # 65534 is nobody/nogroup; the schema's [vm] uid/gid maximum


@dataclass(frozen=True)
class Developer:
    """Who mariner acts for: uid, primary gid, login name and home (None when unknown)."""

    uid: int
    gid: int
    name: str
    home: Path | None

    @property
    def guest_uid(self) -> int:
        """The guest user's default uid: the developer's, unless that is root or a system uid."""
        return self.uid if _FIRST_NORMAL_ID <= self.uid <= _LAST_NORMAL_ID else GUEST_FALLBACK_UID

    @property
    def guest_gid(self) -> int:
        """The guest user's default gid: the developer's, unless that is root or a system group
        (NixOS's `users`, 100, is kept: it is the guest's own default)."""
        if self.gid == GUEST_FALLBACK_GID or _FIRST_NORMAL_ID <= self.gid <= _LAST_NORMAL_ID:
            return self.gid
        return GUEST_FALLBACK_GID


def _sudo_ids() -> tuple[int, int] | None:
    """SUDO_UID/SUDO_GID when both are plain numbers, else None."""
    raw_uid, raw_gid = os.environ.get("SUDO_UID", ""), os.environ.get("SUDO_GID", "")
    if raw_uid.isdigit() and raw_gid.isdigit():
        return int(raw_uid), int(raw_gid)
    return None


def _account(uid: int, gid: int | None) -> Developer:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Developer(uid, gid if gid is not None else uid, str(uid), None)
    return Developer(uid, gid if gid is not None else entry.pw_gid, entry.pw_name,
                     Path(entry.pw_dir))


def developer(project_dir: Path | None = None) -> Developer:
    """The developer: SUDO_UID/SUDO_GID when running as root under sudo, else the owner of
    `project_dir` when running as root, else the current user.

    SUDO_* count only when mariner is root: a plain user who sets them gains nothing, and
    their own files stay theirs.
    """
    if os.geteuid() == 0:
        ids = _sudo_ids()
        if ids is not None and ids[0] != 0:  # root running sudo is still root: look further
            return _account(ids[0], ids[1])
        if project_dir is not None:
            try:
                st = os.stat(project_dir)
            except OSError:
                pass
            else:
                dev = _account(st.st_uid, None)
                if dev.home is None:  # no account: the directory's group is all we know
                    return Developer(st.st_uid, st.st_gid, dev.name, None)
                return dev
    return _account(os.getuid(), os.getgid())
