"""Running mariner as an unprivileged account from a test suite that runs as root (as CI does).

Runner mode promises that a developer's own account is enough: these helpers let a test run the
real CLI as one. The account runs the system's Python 3 (the test venv's interpreter and
packages may sit in root's 0700 home) with the test venv's packages linked into a directory it
can read, and the checkout on PYTHONPATH. Run by a non-root developer, everything runs as them
with the venv's own interpreter.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from support.guest_sshd import ensure_guest_user
from support.tools import REPO

_SKIP = ("pip", "setuptools", "_pytest", "pytest", "pkg_resources", "mariner_dev", "_editable",
         "__pycache__", "_distutils_hack", "py.py")


def is_root() -> bool:
    return os.geteuid() == 0


def ensure_account(name: str, *, uid: int | None = None, group: int | None = None,
                   groups: tuple[str, ...] = ()):
    """The account (created when root, with `uid` and primary `group` if given, and in those
    of `groups` that exist); a non-root run uses the developer running the tests instead.
    Returns its pwd entry."""
    if not is_root():
        return pwd.getpwuid(os.getuid())
    try:
        pwd.getpwnam(name)
    except KeyError:
        if uid is not None or group is not None:
            subprocess.run(["useradd", "-M", "-s", "/bin/bash",
                            *(["-u", str(uid)] if uid is not None else []),
                            *(["-g", str(group)] if group is not None else []), name],
                           capture_output=True, text=True)
    ensure_guest_user(name)
    wanted = [g for g in groups if _group_exists(g)]
    if wanted:
        subprocess.run(["usermod", "-a", "-G", ",".join(wanted), name], check=True,
                       capture_output=True)
    return pwd.getpwnam(name)


def _group_exists(group: str) -> bool:
    import grp

    try:
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


_SITE: list[Path] = []


def readable_site_packages() -> Path:
    """The test venv's third-party packages in a directory any account can read (hard links
    where the file system allows, else copies), made once per test process and removed at its
    exit; mariner itself comes from the checkout. Never chown what is in it: its files are the
    venv's own."""
    if _SITE:
        return _SITE[0]
    import atexit
    import sysconfig
    import tempfile

    source = Path(sysconfig.get_paths()["purelib"])
    top = Path(tempfile.mkdtemp(prefix="mrsite-", dir="/tmp"))
    top.chmod(0o755)
    atexit.register(shutil.rmtree, top, True)
    target = top / "site"

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, symlinks=True, copy_function=link,
                    ignore=lambda d, names: [n for n in names
                                             if d == str(source) and n.startswith(_SKIP)
                                             or n.endswith(".pth")])
    for path in [target, *target.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    _SITE.append(target)
    return target


def python_argv(account, *, supplementary_groups: bool = True) -> tuple[list[str], str]:
    """(the command that starts Python as `account`, the PYTHONPATH it needs). As root:
    setpriv to the account (with its supplementary groups, or none) and the system's python3,
    with the venv's packages where it can read them; otherwise this interpreter, as the
    developer running the tests."""
    if not is_root():
        return [sys.executable], str(REPO)
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        raise RuntimeError("no system python3 (/usr/bin/python3) for the unprivileged account")
    site = readable_site_packages()
    return (["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
             "--init-groups" if supplementary_groups else "--clear-groups", python],
            f"{site}{os.pathsep}{REPO}")


def account_env(account, env: dict) -> dict:
    """`env` with the account's login names (getpass.getuser() reads them first)."""
    return {**env, "USER": account.pw_name, "LOGNAME": account.pw_name}


def give_to(account, *paths: Path) -> None:
    """Make `paths` and everything under them the account's (a no-op for a non-root run)."""
    if not is_root():
        return
    for top in paths:
        for path in [top, *top.rglob("*")]:
            os.lchown(path, account.pw_uid, account.pw_gid)
