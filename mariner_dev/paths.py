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


def xdg_dir(variable: str) -> str | None:
    """An XDG base directory variable (`~` expanded) when it is an absolute path; None when
    unset, empty or relative: the XDG Base Directory spec says a relative path is invalid and
    must be ignored (else state, keys included, would land in whatever directory mariner runs
    from, such as a project the VM can read)."""
    value = os.path.expanduser(os.environ.get(variable) or "")
    return value if os.path.isabs(value) else None


def mariner_home() -> Path:
    """MARINER_HOME, else $XDG_STATE_HOME/mariner, else ~/.local/state/mariner.

    A relative MARINER_HOME is refused (a UsageError), not resolved against the current
    directory: the private key and the registry would follow the user from project to project."""
    from pathlib import Path

    value = os.environ.get("MARINER_HOME")
    if value:
        home = os.path.expanduser(value)
        if not os.path.isabs(home):
            from .errors import UsageError

            raise UsageError(f"MARINER_HOME={value!r} is a relative path; set it to an absolute "
                             f"directory (or unset it for ~/.local/state/mariner)")
        return Path(_normalized(home))
    xdg = xdg_dir("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return (base / "mariner").absolute()


def user_config_file() -> Path:
    """The per-user config: $XDG_CONFIG_HOME/mariner/config.toml, else ~/.config/mariner/config.toml."""
    from pathlib import Path

    xdg = xdg_dir("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "mariner" / "config.toml"


def user_config_file_str() -> str:
    """user_config_file() as a string, for the exec fast path's cache check (it only stats it).

    The same file, except that where Path.home() raises (no $HOME and no password entry) this
    returns a path under `~` that does not exist."""
    xdg = xdg_dir("XDG_CONFIG_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".config")
    return _normalized(os.path.join(base, "mariner", "config.toml"))


def microvms_dir() -> Path:
    """The microvm.nix state directory (MARINER_MICROVMS_DIR, default /var/lib/microvms)."""
    from pathlib import Path

    return Path(os.environ.get("MARINER_MICROVMS_DIR") or "/var/lib/microvms")


def runtime_dir() -> Path:
    """A short directory for Unix sockets: $XDG_RUNTIME_DIR/mariner or /tmp/mariner-<uid>
    (verified when it exists: see ensure_runtime_dir)."""
    from pathlib import Path

    return Path(runtime_dir_str())


TMP = "/tmp"          # where the runtime directory goes without XDG_RUNTIME_DIR
_verified: str | None = None


def _runtime_candidate() -> tuple[str, str | None]:
    """(the runtime directory, the XDG_RUNTIME_DIR it is in or None)."""
    xdg = xdg_dir("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return _normalized(os.path.join(xdg, "mariner")), xdg
    return f"{TMP}/mariner-{os.getuid()}", None


def runtime_dir_str() -> str:
    """runtime_dir() as a string (normalized as str(runtime_dir()) is), verified when it
    exists: raises StateError for one that another user could control."""
    global _verified
    path, xdg = _runtime_candidate()
    if path != _verified and _check_runtime(path, xdg, create=False):
        _verified = path
    return path


def ensure_runtime_dir() -> str:
    """Create the runtime directory (0700) if needed and verify it: the user's own real
    directory, mode 0700, in an XDG_RUNTIME_DIR of the user's own that no one else can
    write to. StateError (one line) otherwise: nothing is created in a directory another
    user controls, as OpenSSH and tmux refuse."""
    global _verified
    path, xdg = _runtime_candidate()
    _check_runtime(path, xdg, create=True)
    _verified = path
    return path


def _refuse(message: str) -> Exception:
    from .errors import StateError

    return StateError(message)


def _check_runtime(path: str, xdg: str | None, create: bool) -> bool:
    """True when `path` is a safe runtime directory; False when it does not exist (and
    `create` is off); raises StateError when it is not safe."""
    import stat

    uid = os.getuid()
    if xdg is not None:
        st = os.stat(xdg)
        if st.st_uid != uid:
            raise _refuse(f"XDG_RUNTIME_DIR={xdg} belongs to uid {st.st_uid}, not to you "
                          f"(uid {uid}): mariner keeps its agent sockets only in a directory "
                          f"of your own; unset XDG_RUNTIME_DIR or point it at yours")
        if st.st_mode & 0o022:
            raise _refuse(f"XDG_RUNTIME_DIR={xdg} is writable by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): mariner keeps its agent sockets "
                          f"only where no one else can plant one; `chmod 700 {xdg}`")
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise
        return False
    what = None
    if stat.S_ISLNK(st.st_mode):
        what = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        what = "is not a directory"
    elif st.st_uid != uid:
        what = f"belongs to uid {st.st_uid}, not to you (uid {uid})"
    elif stat.S_IMODE(st.st_mode) & 0o077:
        what = f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    if what is not None:
        raise _refuse(f"the runtime directory {path} {what}: mariner keeps its agent sockets "
                      f"and caches only in a directory of your own with mode 0700; remove it "
                      f"(if someone else made it, ask an administrator) or set "
                      f"XDG_RUNTIME_DIR")
    return True


def vm_dir(name: str) -> Path:
    """mariner's per-VM directory in MARINER_HOME (rendered flake, manifests)."""
    return mariner_home() / "vms" / name


def default_flake_dir(name: str) -> Path:
    return vm_dir(name) / "flake"


def unapproved_flake_dir(name: str) -> Path:
    """Where `render` writes a flake whose host settings are not approved (see approval.py)."""
    return vm_dir(name) / "flake.unapproved"


def keys_dir() -> Path:
    return mariner_home() / "keys"


def known_hosts_file() -> Path:
    """mariner's own known_hosts: the pinned guest host keys, keyed by `mariner-<name>`."""
    return mariner_home() / "known_hosts"


def ssh_config_file() -> Path:
    """The mariner-owned ssh-config that ~/.ssh/config includes."""
    return mariner_home() / "ssh_config"


def ensure_private_dir(path: Path) -> Path:
    """Create a directory (and parents) readable only by the user. A path that cannot be one
    (a file or a dangling symlink in the way, no permission) is a StateError naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    except OSError as exc:
        from .errors import StateError

        if path.is_symlink() and not path.exists():
            why = f"it is a dangling symlink (to {os.readlink(path)})"
        elif path.exists() and not path.is_dir():
            why = "it is a file, not a directory"
        else:
            why = describe_os_error(exc)
        raise StateError(f"cannot use {path} as a directory: {why}", hint=DIRECTORY_HINT) \
            from None
    return path


DIRECTORY_HINT = ("MARINER_HOME, XDG_STATE_HOME and XDG_RUNTIME_DIR must name directories you "
                  "can write (or be unset); `mariner doctor` checks them")


def describe_os_error(exc: OSError) -> str:
    """`Not a directory: /a/b` for an OSError, naming the path it is about when it has one."""
    what = exc.strerror or str(exc)
    if exc.filename and str(exc.filename) not in what:
        what += f": {exc.filename}"
    return what
