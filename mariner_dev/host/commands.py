"""The one wrapper that runs every host command (microvm, systemctl, journalctl, nix, ...).

Each command is found on PATH by its exact name and resolved to an absolute path *before* the
privilege prefix is added, so `sudo`'s own secure_path never decides which binary runs. The
exact argv is logged on the `mariner.host` logger (the CLI's `-v` shows it), and a failure
becomes a HostError that carries the argv and the tail of the command's stderr.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Collection, Iterator, Mapping, Sequence

from ..errors import HostError

log = logging.getLogger("mariner.host")

STDERR_TAIL_LINES = 20

_DOCTOR = "run `mariner doctor`"
MISSING_HINTS: dict[str, str] = {
    "microvm": "is this a NixOS host with the microvm.nix host module "
               f"(microvm.nixosModules.host)? {_DOCTOR}",
    "systemctl": f"mariner needs a systemd host; {_DOCTOR}",
    "journalctl": f"mariner reads VM logs from the systemd journal; {_DOCTOR}",
    "nix": f"install Nix and enable the `nix-command` and `flakes` features; {_DOCTOR}",
    "sudo": "install sudo with a NOPASSWD rule for microvm and systemctl, "
            "or set MARINER_SUDO to another prefix (empty for none)",
}


@dataclass(frozen=True)
class CommandResult:
    """What a finished host command left behind."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def sudo_prefix() -> list[str]:
    """The privilege prefix: MARINER_SUDO split like a shell would; default `sudo -n` unless root."""
    value = os.environ.get("MARINER_SUDO")
    if value is None:
        return [] if os.geteuid() == 0 else ["sudo", "-n"]
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise HostError(f"MARINER_SUDO={value!r} cannot be parsed: {exc}") from None


def which(name: str) -> str:
    """The absolute path of `name` on PATH, or a HostError with a hint for the user."""
    if os.sep in name:
        raise ValueError(f"host commands are looked up by name, not by path: {name!r}")
    found = shutil.which(name)
    if found is None:
        raise HostError(f"{name} not found on PATH", argv=[name],
                        hint=MISSING_HINTS.get(name, _DOCTOR))
    return os.path.abspath(found)


def command_argv(name: str, args: Sequence[str], *, privileged: bool = False) -> list[str]:
    """The exact argv that runs `name args...`: absolute program, sudo prefix when privileged."""
    argv = [which(name), *map(str, args)]
    if not privileged:
        return argv
    prefix = sudo_prefix()
    if prefix and os.sep not in prefix[0]:
        prefix = [which(prefix[0]), *prefix[1:]]
    return prefix + argv


def tail_lines(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    """The last `lines` lines of `text`, trailing blanks stripped."""
    kept = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(kept[-lines:])


def _last_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            return line.strip()
    return ""


def _failure_hint(argv: list[str], stderr: str) -> str | None:
    if "sudo" in os.path.basename(argv[0]) and "password is required" in stderr:
        return ("sudo wants a password: add a NOPASSWD sudoers rule for microvm, systemctl "
                "and rm, run as root, or set MARINER_SUDO")
    return None


def failure(argv: list[str], returncode: int, stdout: str, stderr: str) -> HostError:
    """The HostError for a command that exited with `returncode`."""
    tail = tail_lines(stderr) or tail_lines(stdout)
    detail = _last_line(tail)
    message = f"`{shlex.join(argv)}` failed with exit status {returncode}"
    if detail:
        message += f": {detail}"
    return HostError(message, argv=argv, stderr_tail=tail, returncode=returncode,
                     hint=_failure_hint(argv, stderr))


def run(name: str, args: Sequence[str] = (), *, privileged: bool = False,
        ok_codes: Collection[int] | None = (0,), timeout: float | None = None,
        input: str | None = None, env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None) -> CommandResult:
    """Run a host command to completion, capturing stdout and stderr.

    An exit status outside `ok_codes` raises HostError (`ok_codes=None` accepts any status and
    leaves the judgement to the caller); so does the timeout, in seconds.
    """
    return _run(command_argv(name, args, privileged=privileged), ok_codes=ok_codes,
                timeout=timeout, input=input, env=env, cwd=cwd)


def run_built(program: os.PathLike, args: Sequence[str] = (), *, cwd: str | os.PathLike,
              ok_codes: Collection[int] | None = (0,), timeout: float | None = None,
              env: Mapping[str, str] | None = None) -> CommandResult:
    """Run a program that a Nix build produced (a VM runner's `bin/microvm-shutdown`), by its
    absolute path, never with privilege, in the working directory `cwd`."""
    return _run(built_argv(program, args), ok_codes=ok_codes, timeout=timeout, input=None,
                env=env, cwd=cwd)


def built_argv(program: os.PathLike, args: Sequence[str] = ()) -> list[str]:
    """The argv of a built program: its absolute path (never looked up on PATH) and `args`."""
    path = os.fspath(program)
    if not os.path.isabs(path):
        raise ValueError(f"a built program is run by its absolute path, not {path!r}")
    return [path, *map(str, args)]


def spawn(argv: list[str], *, cwd: str | os.PathLike, stdout, stderr=subprocess.STDOUT,
          new_session: bool = False, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start a long-running host process (a VM's supervisor, QEMU, virtiofsd) with stdin from
    /dev/null; the caller owns it. `argv` comes from command_argv() or built_argv()."""
    log.info("$ %s  (in %s, background)", shlex.join(argv), cwd)
    try:
        return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, start_new_session=new_session, close_fds=True,
                                env=None if env is None else {**os.environ, **env})
    except OSError as exc:
        raise HostError(f"cannot run `{shlex.join(argv)}`: {exc.strerror or exc}",
                        argv=argv) from None


def _run(argv: list[str], *, ok_codes: Collection[int] | None, timeout: float | None,
         input: str | None, env: Mapping[str, str] | None,
         cwd: str | os.PathLike | None) -> CommandResult:
    log.info("$ %s", shlex.join(argv))
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              env=None if env is None else {**os.environ, **env}, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise HostError(f"`{shlex.join(argv)}` did not finish within {timeout:g} s",
                        argv=argv, stderr_tail=tail_lines(stderr)) from None
    except OSError as exc:
        raise HostError(f"cannot run `{shlex.join(argv)}`: {exc.strerror or exc}", argv=argv) from None
    log.debug("exit %d after %.3f s", proc.returncode, time.monotonic() - started)
    if ok_codes is not None and proc.returncode not in ok_codes:
        raise failure(argv, proc.returncode, proc.stdout, proc.stderr)
    return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)


def stream(name: str, args: Sequence[str] = (), *, privileged: bool = False,
           timeout: float | None = None, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run a host command and yield its stdout line by line as it comes (e.g. `journalctl -f`).

    Closing the iterator (or Ctrl-C in the consumer) terminates the command. A non-zero exit
    raises HostError with the stderr tail; so does the timeout, which bounds the whole run.
    """
    argv = command_argv(name, args, privileged=privileged)
    log.info("$ %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, errors="replace",
                                bufsize=1, env=None if env is None else {**os.environ, **env})
    except OSError as exc:
        raise HostError(f"cannot run `{shlex.join(argv)}`: {exc.strerror or exc}", argv=argv) from None
    return _follow(proc, argv, timeout)


def _follow(proc: subprocess.Popen, argv: list[str], timeout: float | None) -> Iterator[str]:
    stderr_lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    def drain_stderr() -> None:
        try:
            stderr_lines.extend(proc.stderr)
        except (OSError, ValueError):  # the pipe was closed under us after a kill
            pass

    reader = threading.Thread(target=drain_stderr, daemon=True)
    reader.start()
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, expire) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            yield line.rstrip("\n")
        proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=2)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    stderr = "".join(stderr_lines)
    if timed_out.is_set():
        raise HostError(f"`{shlex.join(argv)}` did not finish within {timeout:g} s",
                        argv=argv, stderr_tail=tail_lines(stderr))
    if proc.returncode != 0:
        raise failure(argv, proc.returncode, "", stderr)
