"""Domain errors: each carries the one-line message the user sees and the exit code."""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANNOT_RUN = 125  # exec/shell: mariner itself could not run the command


class MarinerError(Exception):
    """An error meant for the user: one line on stderr, no traceback."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, exit_code: int | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message

    def json_fields(self) -> dict:
        """Fields this error adds to a --json failure document (beyond message and hint)."""
        return {}


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration file, located as precisely as possible."""

    file: str
    line: int | None
    column: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "column": self.column,
                "key": self.key, "message": self.message}


class ConfigError(MarinerError):
    """An invalid or missing mariner.toml; may carry several problems at once."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[ConfigProblem] | str, *, hint: str | None = None):
        if isinstance(problems, str):
            self.problems: list[ConfigProblem] = []
            message = problems
        else:
            self.problems = list(problems)
            message = "\n".join(str(p) for p in self.problems)
        super().__init__(message, hint=hint)

    def json_fields(self) -> dict:
        errors = [p.as_dict() for p in self.problems] or [
            {"file": None, "line": None, "column": None, "key": "", "message": self.message}]
        return {"errors": errors}


class UsageError(MarinerError):
    exit_code = EXIT_USAGE


class HostError(MarinerError):
    """A host command (microvm, systemctl, journalctl, nix) failed or is missing."""

    def __init__(self, message: str, *, argv: list[str] | None = None, stderr_tail: str = "",
                 returncode: int | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.argv = argv or []
        self.stderr_tail = stderr_tail
        self.returncode = returncode


class HostUnavailable(HostError):
    """The selected host backend cannot work on this machine (no `microvm` command, no systemd,
    no microvm@ unit, ...): raised before the first host command, with the next step."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, hint=hint or "run `mariner doctor` to see what this host lacks")


class StateError(MarinerError):
    """mariner's own registry or a lock is in a bad state."""


class OwnershipError(MarinerError):
    """The VM belongs to another project, or was not created by mariner."""


class GuestUnreachable(MarinerError):
    """The guest cannot be reached over SSH (down, refused, auth failed, host key mismatch)."""

    exit_code = EXIT_CANNOT_RUN
