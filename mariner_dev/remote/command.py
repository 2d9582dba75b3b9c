"""The remote command line that exec and shell send: quoting, workdir, env, login shell, sudo.

sshd hands the command string to the account's shell with `-c`; everything in it is quoted
here so that each argument arrives exactly as given. The command itself runs under
`bash -l -c` so that the guest's login environment (NixOS sets PATH in /etc/profile) applies,
and every layer `exec`s the next, so that signals reach the command and its status (or the
signal that killed it) comes back unchanged.
"""

from __future__ import annotations

# Character sets rather than regular expressions: the exec fast path does not import `re`.
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
_NAME_CHARS = _LETTERS + "0123456789"          # [A-Za-z0-9_]
_SAFE_CHARS = _NAME_CHARS + "@%+=:,./-"         # needs no quoting
LOGIN_SHELL = "bash"


def quote(arg: str) -> str:
    """Quote one word for a POSIX shell (single quotes; an empty string stays an argument)."""
    if arg and not arg.lstrip(_SAFE_CHARS):   # every character is a safe one
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def join(argv: list[str]) -> str:
    return " ".join(quote(a) for a in argv)


class ExecRequest:
    """One command to run in the guest, and how to wire it to our terminal.

    A plain class, not a dataclass: the exec fast path avoids importing dataclasses.
    """

    __slots__ = ("command", "tty", "stdin", "term", "cols", "rows")

    def __init__(self, command: str, tty: bool = False, stdin: bool = True,
                 term: str | None = None, cols: int = 0, rows: int = 0):
        self.command = command      # the complete remote command line (see build_command)
        self.tty = tty
        self.stdin = stdin          # stream our stdin (else the remote sees EOF at once)
        self.term = term
        self.cols = cols
        self.rows = rows

    def to_json(self) -> dict:
        return {"command": self.command, "tty": self.tty, "stdin": self.stdin,
                "term": self.term, "cols": self.cols, "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> "ExecRequest":
        return cls(command=str(data["command"]), tty=bool(data.get("tty")),
                   stdin=bool(data.get("stdin", True)), term=data.get("term"),
                   cols=int(data.get("cols") or 0), rows=int(data.get("rows") or 0))


def check_env_name(name: str) -> bool:
    """[A-Za-z_][A-Za-z0-9_]*"""
    return bool(name) and name[0] in _LETTERS and not name.lstrip(_NAME_CHARS)


def script(argv: list[str] | None, *, workdir: str | None, env: dict[str, str],
           shell_command: str | None = None, interactive: bool = False) -> str:
    """The script the login shell runs: cd, exports, then exec the command.

    `argv` is an exact argument vector; `shell_command` is a string for the shell to parse
    (hooks, `mariner shell CMD`); neither means an interactive login shell.
    """
    parts = []
    if workdir:
        parts.append(f"cd -- {quote(workdir)} || exit 125")
    for key, value in env.items():
        parts.append(f"export {key}={quote(value)}")
    if argv:
        parts.append("exec " + join(argv))
    elif shell_command is not None:
        parts.append(shell_command)
    else:
        parts.append(f'exec "${{SHELL:-{LOGIN_SHELL}}}" -l' + (" -i" if interactive else ""))
    return "\n".join(parts)


def build_command(argv: list[str] | None, *, workdir: str | None, env: dict[str, str],
                  user: str | None = None, shell_command: str | None = None,
                  interactive: bool = False) -> str:
    """The remote command line: a login shell running `script(...)`, via `sudo -u` for -u."""
    body = script(argv, workdir=workdir, env=env, shell_command=shell_command,
                  interactive=interactive)
    login = f"{LOGIN_SHELL} -l -c {quote(body)}"
    if user:
        # sudo -H: the other account's HOME, so that its login files are the ones read.
        return f"exec sudo -H -u {quote(user)} -- {login}"
    return f"exec {login}"
