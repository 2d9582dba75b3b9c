"""`mariner exec` without typer: parse, resolve the project, hand the command to the guest.

    mariner exec [-i] [-t|-T] [-e K=V]... [--env-file F] [-w DIR] [-u USER] [-C DIR] [-v]
                 [--trust-new-host-key] -- CMD [ARGS...]

The CLI edge dispatches here before importing typer; when the agent serves the call nothing
heavier than the standard library's tomllib is imported (no asyncssh, typer, rich, tomlkit),
and on a warm cache not even json, re, pathlib or typing.
"""

from __future__ import annotations

import marshal  # builtin and already loaded at start-up, unlike json (which pulls in re, enum)
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .errors import MarinerError

CONFIG_NAME = "mariner.toml"
CACHE_VERSION = 3

USAGE = """\
usage: mariner exec [-i] [-t|-T] [-e K=V]... [--env-file FILE] [-w DIR] [-u USER]
                    [-C DIR] [-v] [--trust-new-host-key] -- CMD [ARGS...]

Run a command in the project's VM, in the guest path of the current directory.

  -i, --interactive      stream stdin (the default when stdin is not a terminal)
  -t, --tty              allocate a TTY (default: when stdin and stdout are terminals)
  -T, --no-tty           never allocate a TTY
  -e, --env K=V          set an environment variable (K alone: take it from here)
  --env-file FILE        read K=V lines from FILE
  -w, --workdir DIR      working directory in the guest (default: mapped from here)
  -u, --user USER        run as USER (through sudo in the guest)
  -C, --project DIR      the project directory (default: found from here upwards)
  -v, --verbose          say which path (agent or direct connection) served the call
  --trust-new-host-key   accept and pin the VM's current host key
"""


class ExecOptions:
    """Parsed `exec` options (a plain class: the fast path does not import dataclasses)."""

    def __init__(self, argv=None, interactive=False, tty=None, env=None, env_files=None,
                 workdir=None, user=None, project=None, verbose=0, trust_new=False):
        self.argv: list[str] = list(argv or [])
        self.interactive = interactive
        self.tty: bool | None = tty
        self.env: list[str] = list(env or [])
        self.env_files: list[str] = list(env_files or [])
        self.workdir: str | None = workdir
        self.user: str | None = user
        self.project: str | None = project
        self.verbose = verbose
        self.trust_new = trust_new


def _usage_error(message: str) -> Exception:
    from .errors import UsageError

    return UsageError(message)


_FLAGS = {"-i": "interactive", "--interactive": "interactive", "-t": "tty", "--tty": "tty",
          "-T": "no_tty", "--no-tty": "no_tty", "-v": "verbose", "--verbose": "verbose",
          "--trust-new-host-key": "trust_new", "-h": "help", "--help": "help"}
_VALUED = {"-e": "env", "--env": "env", "--env-file": "env_file", "-w": "workdir",
           "--workdir": "workdir", "-u": "user", "--user": "user", "-C": "project",
           "--project": "project"}


class _Help(Exception):
    pass


def _apply(opts: ExecOptions, name: str, value: str | None = None) -> None:
    if name == "help":
        raise _Help
    if name == "interactive":
        opts.interactive = True
    elif name in ("tty", "no_tty"):
        wanted = name == "tty"
        if opts.tty is not None and opts.tty != wanted:
            raise _usage_error("exec: -t/--tty and -T/--no-tty contradict each other; give one")
        opts.tty = wanted
    elif name == "verbose":
        opts.verbose += 1
    elif name == "trust_new":
        opts.trust_new = True
    elif name == "env":
        opts.env.append(value)
    elif name == "env_file":
        opts.env_files.append(value)
    else:
        setattr(opts, name, value)


def parse_args(args: list[str]) -> ExecOptions:
    """Options up to `--` or the first non-option; everything after is the command, verbatim."""
    opts = ExecOptions()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            opts.argv = args[i + 1:]
            break
        if not arg.startswith("-") or arg == "-":
            opts.argv = args[i:]
            break
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            if key in _VALUED:
                if not eq:
                    i += 1
                    if i >= len(args):
                        raise _usage_error(f"exec: {key} needs a value")
                    value = args[i]
                _apply(opts, _VALUED[key], value)
            elif key in _FLAGS and not eq:
                _apply(opts, _FLAGS[key])
            else:
                raise _usage_error(f"exec: unknown option {arg} (see `mariner exec --help`)")
        else:
            # Short options, possibly bundled (-it) or with an attached value (-eK=V).
            j = 1
            while j < len(arg):
                short = "-" + arg[j]
                if short in _VALUED:
                    value = arg[j + 1:]
                    if not value:
                        i += 1
                        if i >= len(args):
                            raise _usage_error(f"exec: {short} needs a value")
                        value = args[i]
                    _apply(opts, _VALUED[short], value)
                    break
                if short not in _FLAGS:
                    raise _usage_error(f"exec: unknown option {short} (see `mariner exec --help`)")
                _apply(opts, _FLAGS[short])
                j += 1
        i += 1
    if not opts.argv:
        raise _usage_error("exec: no command given (usage: mariner exec [OPTIONS] -- CMD [ARGS...])")
    return opts


def _env_pair(item: str, origin: str) -> tuple[str, str]:
    from .remote.command import check_env_name

    key, eq, value = item.partition("=")
    if not eq:
        if key not in os.environ:
            return key, None  # docker: a bare name that is unset here is skipped
        value = os.environ[key]
    if not check_env_name(key):
        raise _usage_error(f"{origin}: {key!r} is not a valid environment variable name")
    return key, value


def collect_env(base: dict[str, str], opts: ExecOptions) -> dict[str, str]:
    """[env] from mariner.toml, then --env-file files in order, then -e: later wins."""
    env = dict(base)
    for file in opts.env_files:
        try:
            with open(file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise _usage_error(f"--env-file {file}: {exc.strerror}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            key, value = _env_pair(line, f"{file}:{number}")
            if value is not None:
                env[key] = value
    for item in opts.env:
        key, value = _env_pair(item, "-e")
        if value is not None:
            env[key] = value
    return env


def guest_workdir(project_dirs: list[str], mount: str, workdir: str | None,
                  cwd: str | None = None) -> str:
    """-w (relative to the mapped directory when not absolute), else the mapped cwd.

    The current directory maps into the workspace mount when it lies inside the project
    (checked with both the logical $PWD and the physical path); else the mount itself.
    """
    cwd = cwd or os.getcwd()
    candidates = []
    logical = os.environ.get("PWD")
    if logical and os.path.isabs(logical) and logical != cwd:
        try:
            if os.path.samefile(logical, cwd):
                candidates.append(logical)
        except OSError:
            pass
    candidates.append(cwd)
    mapped = mount
    for path in candidates:
        rel = next((os.path.relpath(path, root) for root in project_dirs
                    if path == root or path.startswith(root.rstrip("/") + "/")), None)
        if rel is not None:
            mapped = mount if rel == "." else mount.rstrip("/") + "/" + rel
            break
    if workdir:
        if workdir.startswith("/"):
            return workdir
        return mapped.rstrip("/") + "/" + workdir
    return mapped


def _find_config(project: str | None) -> str | None:
    """The mariner.toml of -C DIR or of the current directory: there or in a parent."""
    directory = os.path.abspath(project) if project else os.getcwd()
    while True:
        path = os.path.join(directory, CONFIG_NAME)
        if os.path.isfile(path):
            return path
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _stamp(path: str | None):
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _cache_file(config_file: str) -> str:
    from .paths import runtime_dir_str

    key = config_file.replace("%", "%25").replace("/", "%2F")
    if len(key) > 200:
        import hashlib

        key = hashlib.sha256(config_file.encode()).hexdigest()
    return os.path.join(runtime_dir_str(), "exec-cache", key + ".marshal")


class CachedTarget:
    """Stands in for a GuestTarget on the fast path (name, fingerprint, its JSON data)."""

    __slots__ = ("name", "user", "_fingerprint", "_data")

    def __init__(self, data: dict, fingerprint: str):
        self.name = data["name"]
        self.user = data["user"]
        self._data = data
        self._fingerprint = fingerprint

    def fingerprint(self) -> str:
        return self._fingerprint

    def to_json(self) -> dict:
        return self._data


def resolve_project(project: str | None) -> dict:
    """What exec needs from mariner.toml and the registry, cached in the runtime directory.

    The cache entry is valid while mariner.toml, the per-user config and the registry are
    unchanged (mtime, size, inode); otherwise the full loader runs and refreshes it. The cache
    is `marshal` data (the runtime directory is the user's own, 0700).
    """
    from .paths import user_config_file_str

    config_file = _find_config(project)
    cache = _cache_file(config_file) if config_file else None
    if cache:
        try:
            with open(cache, "rb") as fh:
                data = marshal.load(fh)
            stamps = [_stamp(config_file), _stamp(user_config_file_str()),
                      _stamp(data.get("registry"))]
            if data.get("version") == CACHE_VERSION and data.get("stamps") == stamps:
                return data
        except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
            pass
    data = _resolve_slow(project)
    if cache and data["config_file"] == config_file:
        _write_cache(cache, data)
    return data


def _resolve_slow(project: str | None) -> dict:
    from pathlib import Path

    from .config import load_project
    from .errors import GuestUnreachable
    from .paths import user_config_file
    from .remote.target import target_for
    from .state import Registry

    cfg = load_project(project_dir=Path(project)) if project else load_project()
    registry = Registry()
    record = registry.get(cfg.name)
    if record is None or not record.created:  # a render or a failed up registers, never builds
        raise GuestUnreachable(f"VM {cfg.name} does not exist yet",
                               hint="`mariner up` creates and starts it")
    target = target_for(cfg, record)
    dirs = [str(cfg.project_dir)]
    real = os.path.realpath(cfg.project_dir)
    if real not in dirs:
        dirs.append(real)
    config_file = str(cfg.config_file)
    from .tripwire import fast_file

    return {
        "version": CACHE_VERSION,
        "tripwire": [fast_file(str(cfg.project_dir)), str(cfg.project_dir)],
        "stamps": [_stamp(config_file), _stamp(str(user_config_file())),
                   _stamp(str(registry.file))],
        "registry": str(registry.file),
        "config_file": config_file,
        "name": cfg.name,
        "project_dirs": dirs,
        "mount": cfg.workspace_mount,
        "env": dict(cfg.env),
        "target": target.to_json(),
        "fingerprint": target.fingerprint(),
    }


def _write_cache(path: str, data: dict) -> None:
    from .paths import ensure_runtime_dir

    try:
        ensure_runtime_dir()
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            marshal.dump(data, fh)
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass  # a cache that cannot be written (or data marshal refuses) only costs speed


def _start_dir(opts: ExecOptions) -> str | None:
    """Where the command runs from: -C DIR as if `cd DIR` came first, else the cwd."""
    return os.path.abspath(opts.project) if opts.project else None


def run(opts: ExecOptions, *, fds=(0, 1, 2)) -> int:
    """Run `opts.argv` in the project's VM; returns the status to exit with."""
    from .remote.command import ExecRequest, build_command
    from .remote.dispatch import execute, transport_mode
    from .remote.terminal import want_tty, window_size

    transport_mode()  # bad usage (2) before anything else
    data = resolve_project(opts.project)
    target = CachedTarget(data["target"], data["fingerprint"])
    env = collect_env(data["env"], opts)
    workdir = guest_workdir(data["project_dirs"], data["mount"], opts.workdir,
                            cwd=_start_dir(opts))
    user = opts.user if opts.user and opts.user != target.user else None
    tty = want_tty(opts.tty)
    stdin = opts.interactive or tty or not os.isatty(0)
    cols, rows = window_size(1) if tty else (0, 0)
    request = ExecRequest(build_command(opts.argv, workdir=workdir, env=env, user=user),
                          tty=tty, stdin=stdin,
                          term=(os.environ.get("TERM") or "xterm-256color") if tty else None,
                          cols=cols, rows=rows)
    status = _explained(data["name"], lambda: execute(target, request, fds=fds,
                                                      trust_new=opts.trust_new,
                                                      verbose=bool(opts.verbose)))
    _tripwire(data)
    return status


def _explained(name: str, run_it):
    """run_it(); a VM that cannot be reached because it is not running is named as such (its
    state from the host, asked only on this failure path) with the next step."""
    try:
        return run_it()
    except Exception as exc:
        errors = sys.modules.get(f"{__package__}.errors")
        if errors is None or not isinstance(exc, errors.GuestUnreachable):
            raise
        from .lifecycle import why_unreachable

        try:
            better = why_unreachable(name)
        except (errors.MarinerError, OSError):
            better = None
        if better is None:
            raise
        raise better from None


def _tripwire(data: dict) -> None:
    """After the command: report, once, a change to the project files the host runs."""
    from .tripwire import after_command

    after_command(*data["tripwire"])


def run_shell(opts: ExecOptions, command: str | None = None) -> int:
    """An interactive login shell in the project's VM (or `command` in one), with a PTY."""
    from .remote.command import ExecRequest, build_command
    from .remote.dispatch import execute, transport_mode
    from .remote.terminal import window_size

    transport_mode()
    data = resolve_project(opts.project)
    target = CachedTarget(data["target"], data["fingerprint"])
    user = opts.user if opts.user and opts.user != target.user else None
    remote = build_command(None, workdir=guest_workdir(data["project_dirs"], data["mount"],
                                                       opts.workdir, cwd=_start_dir(opts)),
                           env=collect_env(data["env"], opts), user=user,
                           shell_command=command, interactive=command is None)
    cols, rows = window_size(1)
    request = ExecRequest(remote, tty=True, stdin=True,
                          term=os.environ.get("TERM") or "xterm-256color", cols=cols, rows=rows)
    status = _explained(data["name"], lambda: execute(target, request, trust_new=opts.trust_new,
                                                      verbose=bool(opts.verbose)))
    _tripwire(data)
    return status


def print_error(exc: "MarinerError") -> None:
    """The edge's one-line format, without importing the typer app. Control characters in
    the message (guest output, file names, config values in it) are escaped (termsafe)."""
    from .termsafe import printable

    lines = printable(str(exc), keep_newlines=True).splitlines() or [""]
    if len(lines) == 1:
        sys.stderr.write(f"mariner: error: {lines[0]}\n")
    else:
        sys.stderr.write("mariner: error:\n" + "".join(f"  {line}\n" for line in lines))
    if exc.hint:
        sys.stderr.write(f"  hint: {printable(exc.hint)}\n")


REPORT_BUG = ("this is a bug in mariner: please report it to the mariner project's issue "
              "tracker with the command you ran; MARINER_DEBUG=1 shows the traceback")


def print_internal_error(exc: BaseException) -> None:
    """The last resort for an exception that is not a MarinerError: one line naming it and the
    next step (MARINER_DEBUG=1 prints the traceback first). An OSError is about a file or
    directory mariner could not use; anything else is a bug, and says where to report it."""
    if os.environ.get("MARINER_DEBUG") == "1":
        import traceback

        traceback.print_exception(exc)
    sys.stderr.write(f"mariner: error: {unexpected_message(exc)}\n  hint: {unexpected_hint(exc)}\n")


def unexpected_message(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        from .paths import describe_os_error

        return describe_os_error(exc)
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"internal error ({what})"


def unexpected_hint(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        from .paths import DIRECTORY_HINT

        return DIRECTORY_HINT + "; MARINER_DEBUG=1 shows where it happened"
    return REPORT_BUG


def _as_mariner_error(exc: BaseException):
    """`exc` if it is a MarinerError. mariner_dev.errors imports dataclasses, so the fast path
    only looks at it when something was raised (it is loaded by whoever raised one)."""
    errors = sys.modules.get(f"{__package__}.errors")
    return exc if errors is not None and isinstance(exc, errors.MarinerError) else None


def main(argv: list[str]) -> int:
    """Entry point for `mariner exec ARGS`; returns the exit status."""
    try:
        opts = parse_args(argv)
    except _Help:
        sys.stdout.write(USAGE)
        return 0
    except Exception as exc:
        if _as_mariner_error(exc) is None:
            print_internal_error(exc)
            return 125
        print_error(exc)
        return exc.exit_code
    try:
        return run(opts)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _as_mariner_error(exc) is None:
            print_internal_error(exc)
            return 125
        print_error(exc)
        # exec passes statuses through, so its own failures are 125 unless it is bad usage.
        return exc.exit_code if exc.exit_code == 2 else 125
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
