"""The shapes of well-known secrets (private keys, tokens): one table for every place mariner
looks for them by content.

The attack: a secret that reaches the VM is handed to code nobody reviewed, and one in
mariner.toml's [env] lands in the world-readable Nix store. So `validate` warns about an [env]
value holding one (advisories.py), and `[dotfiles] files` refuses to copy a file holding one
(sync/credentials.py). Both ask find(); a shape added here is found by both. The matched secret
itself is never printed, only what kind it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SecretShape:
    what: str                # what it is, in both messages: "a GitHub token"
    pattern: re.Pattern      # on bytes; found anywhere (each pattern bounds itself)
    shown: str | None        # how it starts, for a refused file's message: "ghp_..."; None:
                             # the match's first group names it (a private key's header)
    in_files: bool = True    # False: judged only as an [env] value, from its start; inside
                             # a file's free text the shape would match too much

    def detail(self, match: re.Match) -> str:
        """`what (how it starts)`, for the message about a refused file."""
        shown = self.shown if self.shown is not None else match.group(1).decode()
        return f"{self.what} ({shown})"


# The first that matches names the secret: an [env] value that is a URL with a password is
# called that even when the password is a token.
SHAPES: tuple[SecretShape, ...] = (
    SecretShape("an API secret key", re.compile(rb"^sk-[A-Za-z0-9_-]{20,}"), "sk-...",
                in_files=False),
    SecretShape("a URL with a password",
                re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:[^/@\s]+@"), "user:password@",
                in_files=False),
    SecretShape("a private key",
                re.compile(rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----"), None),
    SecretShape("a GitHub token", re.compile(rb"\bgh[pousr]_[A-Za-z0-9]{20,}"), "ghp_..."),
    SecretShape("a GitHub token", re.compile(rb"\bgithub_pat_[A-Za-z0-9_]{20,}"),
                "github_pat_..."),
    SecretShape("an npm token", re.compile(rb"\bnpm_[A-Za-z0-9]{36}"), "npm_..."),
    SecretShape("an AWS access key id", re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
                "AKIA..."),
    SecretShape("a Slack token", re.compile(rb"\bxox[abprs]-[0-9A-Za-z-]{10,}"),
                "xoxb-/xoxp-..."),
    SecretShape("a registry token", re.compile(rb"_authToken\s*=\s*\S"), "_authToken=..."),
    SecretShape("a GitLab token", re.compile(rb"\bglpat-[0-9A-Za-z_-]{20,}"), "glpat-..."),
    SecretShape("a PyPI token", re.compile(rb"\bpypi-AgEIcHlwaS5vcmc[0-9A-Za-z_-]{20,}"),
                "pypi-..."),
)


def find(data: bytes, *, value: bool = False) -> tuple[SecretShape, re.Match] | None:
    """The first shape in SHAPES that `data` holds, with its match; None when none does.
    `value`: data is a whole [env] value, judged by every shape; else a file's content, judged
    by those with in_files."""
    for shape in SHAPES:
        if value or shape.in_files:
            match = shape.pattern.search(data)
            if match is not None:
                return shape, match
    return None
