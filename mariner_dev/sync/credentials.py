"""Which host files are private keys or credentials, and so stay on the host unless allowed.

The VM runs untrusted code: a key synced into it is a key handed to that code. A file is a
secret by its place under ~ (the well-known credential files), by its name (`*.pem`, `*.key`)
or by its content (a PEM/OpenSSH private-key header), whatever it is called.
"""

from __future__ import annotations

import fnmatch
import re

# Files under ~/.ssh that hold nothing private; everything else there is treated as private.
SSH_PUBLIC_NAMES = frozenset({"config", "known_hosts", "known_hosts.old", "authorized_keys",
                              "authorized_keys2", "allowed_signers", "environment", "rc"})

# (pattern on the path relative to ~, what it is): fnmatch patterns, `*` crosses `/`.
KNOWN_CREDENTIALS: tuple[tuple[str, str], ...] = (
    (".aws/credentials", "AWS credentials"),
    (".netrc", "a netrc with login passwords"),
    (".docker/config.json", "Docker registry credentials"),
    (".git-credentials", "git credentials"),
    (".config/gh/hosts.yml", "a GitHub CLI token"),
    (".kube/config", "Kubernetes credentials"),
    (".gnupg/private-keys-v1.d/*", "a GnuPG private key"),
    (".gnupg/secring.gpg", "a GnuPG secret keyring"),
    (".gnupg/openpgp-revocs.d/*", "a GnuPG revocation certificate"),
)

PRIVATE_KEY_HEADER = re.compile(
    rb"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----")
# A header split across two reads is still found: keep this many bytes of overlap.
HEADER_OVERLAP = 64


def secret_by_name(rel: str) -> str | None:
    """What the file at `rel` (relative to ~, '/'-separated) is, if its place makes it a secret."""
    parts = rel.split("/")
    name = parts[-1]
    if parts[0] == ".ssh" and len(parts) >= 2:
        if name.endswith(".pub"):
            return None
        if name.startswith("id_"):
            return "an SSH private key"
        if len(parts) == 2 and name in SSH_PUBLIC_NAMES:
            return None
        if len(parts) >= 3 and parts[1] in ("config.d", "conf.d"):
            return None
        return "private material under ~/.ssh"
    for pattern, what in KNOWN_CREDENTIALS:
        if fnmatch.fnmatchcase(rel, pattern):
            return what
    lowered = name.lower()
    if lowered.endswith(".pem"):
        return "a PEM file (*.pem)"
    if lowered.endswith(".key"):
        return "a key file (*.key)"
    return None


def secret_by_content(chunk: bytes) -> str | None:
    """'a ... private key' when `chunk` holds a private-key header."""
    match = PRIVATE_KEY_HEADER.search(chunk)
    if match is None:
        return None
    return f"a file holding a private key ({match.group(1).decode()})"


def refusal(rel: str, what: str) -> str:
    """The one-line message naming the file and the key that lets it through."""
    return (f"refused ~/{display(rel)}: it is {what}; secrets stay on the host "
            f"(to sync it anyway: [dotfiles] allow = [\"~/{display(rel)}\"])")


def display(rel: str) -> str:
    """A path for a one-line message: control characters and undecodable bytes escaped."""
    out = []
    for ch in rel:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:           # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)
