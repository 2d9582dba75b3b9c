"""Which host files are private keys or credentials, and so stay on the host unless allowed.

The attack: the VM runs code nobody reviewed. A key, token or shell history synced into it is
handed to that code (and from there to whoever it talks to). So `[dotfiles] files` never
copies a file that is a secret by its place under ~ (the well-known credential stores, private
keys under ~/.ssh, shell and REPL histories), by its name (`*.pem`, `*.key`) or by its content
(a private-key header, a token of a well-known shape: the table in ../secret_shapes.py, which
`validate` also checks [env] values against), whatever it is called, unless `[dotfiles] allow`
(per-user config only) names it. `validate` and `sync --dry-run` name each refused file and
why. This module is the whole policy: the sync engine only asks it.
"""

from __future__ import annotations

import fnmatch

from ..secret_shapes import find

# Files under ~/.ssh that hold nothing private; everything else there is treated as private.
SSH_PUBLIC_NAMES = frozenset({"config", "known_hosts", "known_hosts.old"})

# (pattern on the path relative to ~, what it is): fnmatch patterns, `*` crosses `/`.
KNOWN_CREDENTIALS: tuple[tuple[str, str], ...] = (
    (".aws/*", "AWS credentials and settings (~/.aws)"),
    (".netrc", "a netrc with login passwords"),
    (".docker/config.json", "Docker registry credentials"),
    (".git-credentials", "git credentials"),
    (".config/git/credentials", "git credentials"),
    (".config/gh/hosts.yml", "a GitHub CLI token"),
    (".kube/config", "Kubernetes credentials"),
    (".gnupg/*", "GnuPG keys and trust data (~/.gnupg)"),
    (".password-store/*", "a pass password store"),
    (".npmrc", "an npm config (it holds registry tokens)"),
    (".pypirc", "a PyPI config (it holds upload tokens)"),
    (".config/hub", "a hub token"),
    (".cargo/credentials", "crates.io credentials"),
    (".cargo/credentials.toml", "crates.io credentials"),
    (".gem/credentials", "RubyGems credentials"),
    (".config/gcloud/*", "Google Cloud credentials"),
    (".azure/*", "Azure credentials"),
    (".vault-token", "a Vault token"),
    (".local/share/keyrings/*", "a desktop keyring"),
)

# Shell and REPL histories: what was typed, passwords and tokens pasted on command lines.
HISTORY_NAMES = frozenset({
    ".bash_history", ".zsh_history", ".zhistory", ".histfile", ".sh_history", ".history",
    ".python_history", ".node_repl_history", ".psql_history", ".mysql_history",
    ".sqlite_history", ".irb_history", ".pry_history", ".Rhistory", ".rediscli_history",
    ".lesshst", ".viminfo", ".ghci_history", ".erlang_history", ".scala_history",
    ".guile_history", ".ipython_history",
})
HISTORY_PATTERNS = (".local/share/fish/fish_history", ".config/fish/fish_history",
                    ".ipython/profile_*/history.sqlite", ".julia/logs/repl_history.jl",
                    ".local/share/nvim/shada/*", ".local/state/*history*",
                    ".local/share/*history*")

# A header or token split across two reads is still found: keep this many bytes of overlap.
HEADER_OVERLAP = 128


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
        return "private material under ~/.ssh (only *.pub, known_hosts and config are not)"
    for pattern, what in KNOWN_CREDENTIALS:
        if rel == pattern.removesuffix("/*") or fnmatch.fnmatchcase(rel, pattern):
            return what
    if name in HISTORY_NAMES or name.endswith("_history") \
            or any(fnmatch.fnmatchcase(rel, pattern) for pattern in HISTORY_PATTERNS):
        return "a shell or REPL history"
    lowered = name.lower()
    if lowered.endswith(".pem"):
        return "a PEM file (*.pem)"
    if lowered.endswith(".key"):
        return "a key file (*.key)"
    return None


def secret_by_content(chunk: bytes) -> str | None:
    """What secret `chunk` holds (a private-key header or a token's shape: secret_shapes.py),
    else None."""
    found = find(chunk)
    if found is None:
        return None
    shape, match = found
    return f"a file holding {shape.detail(match)}"


def refusal(rel: str, what: str) -> str:
    """The one-line message naming the file and the key that lets it through."""
    return (f"refused ~/{display(rel)}: it is {what}; secrets stay on the host "
            f"(to sync it anyway: [dotfiles] allow = [\"~/{display(rel)}\"] in your per-user "
            f"config)")


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


def file_secret(path: str) -> str | None:
    """What secret the file at `path` holds by its content (read in chunks), else None."""
    tail = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            what = secret_by_content(tail + chunk)
            if what is not None:
                return what
            tail = chunk[-HEADER_OVERLAP:]
    return None


def refused_dotfiles(settings, home) -> list[tuple[str, str]]:
    """Every file `[dotfiles] files` names (directories walked) that a sync would refuse, as
    (rel, one-line message): what `validate` shows before anything is copied."""
    from .tree import FILE, AllowList, Scanner, roots_for

    roots, _problems = roots_for(settings.files, home)
    allow = AllowList.from_paths(settings.allow, home)
    scan = Scanner(list(roots), home, allow).scan()
    refused = list(scan.refused)
    for rel, entry in scan.entries.items():
        if entry.kind != FILE or allow.allows(rel):
            continue
        try:
            what = file_secret(entry.source)
        except OSError:
            continue
        if what is not None:
            refused.append((rel, what))
    return sorted((rel, refusal(rel, what)) for rel, what in refused)
