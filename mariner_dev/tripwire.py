"""The tripwire on the project files that the host runs: who changed them since you looked?

The attack it reports. The project directory is shared read-write with the VM, and some of
its files are run on the host by the developer's own tools, with no question asked: git runs
`.git/hooks/*` (and the hooks in the directory `core.hooksPath` names, and `core.fsmonitor`
from `.git/config`) on the next `git status` or `git commit`; direnv evaluates `.envrc` on the
next `cd`; VS Code runs `.vscode/tasks.json` tasks. Code in the VM can write all of them. It
cannot be stopped from writing them, but it cannot hide it either: the host kernel sets each
file's ctime, which no process can set back. So, before the VM first boots (before
`post_create` runs any repository code), mariner records the state of these paths (inode,
size, mode, ctime, and a hash of the content) in MARINER_HOME, and reports every change since
the developer last acknowledged them: `up` and `status` every change, `exec` and `shell` each
new change once, on stderr, after the command returned. Only `mariner trust` acknowledges (it
shows these apart from the config approval, so neither is accepted by accident); `up` never
moves the baseline.

Watched (each with the tool that runs it, in ROLES): the git directory's `config`, `hooks/` and
those of its submodules (`.git/modules/*/`), the hooks directory `core.hooksPath` names and the
files `include.path`/`includeIf.*.path` name when they are inside the project, a `.git` file
(it points git at another directory); `.envrc` and what direnv evaluates with it (`.env`,
`flake.nix`, `shell.nix`, `default.nix`); `.vscode/settings.json`, `tasks.json`, `launch.json`;
`.devcontainer/`; `.pre-commit-config.yaml`; package-manager settings that name programs to run
(`.yarnrc.yml`, `.yarnrc`, `.npmrc`, `.pnpmfile.cjs`), mise's `mise.toml`/`.mise.toml` (hooks
on `cd`) and `.cargo/config.toml` (rustc wrappers, runners, aliases).

Not watched, on purpose: `.gitattributes` and `.git/info/attributes` (they only select filters
and diff drivers, which run only when a git config defines them, and those are watched);
`flake.lock` (pins what flake.nix names; a changed lock is routine); hooks named `*.sample`
(git never runs them; renaming one shows as a new hook). Files that run only when the developer
asks (a Makefile, test scripts, package.json scripts) are the exposure the README's "Security
model" names: the project is code the VM could have changed.

Speed: `exec` pays for one read of a small table (marshal) and one lstat per recorded path
(typically 20-40), about 0.1 ms; the content is hashed only when a stat differs. This module
imports only os and marshal at the top, because the exec fast path imports it.
"""

from __future__ import annotations

import marshal
import os

TRIPWIRE_VERSION = 1
BASELINE = "tripwire.json"      # acknowledged by `mariner trust`
SEEN = "tripwire-seen.json"     # what exec/shell last reported (or the baseline)
FAST = "tripwire.fast"          # SEEN's stat signatures, for the exec fast path
MAX_TREE_FILES = 200            # per watched directory tree
MAX_HASH_BYTES = 64 << 20

# Paths relative to the project, and who runs them on the host.
FILES = (
    (".git", "git follows a .git file to the repository it names"),
    (".envrc", "direnv evaluates it when you enter the directory"),
    (".env", "direnv's dotenv and many tools load it"),
    ("flake.nix", "direnv's `use flake` and `nix develop` evaluate it"),
    ("shell.nix", "direnv's `use nix` and nix-shell evaluate it"),
    ("default.nix", "nix-shell and nix-build evaluate it"),
    (".vscode/settings.json", "VS Code applies it: terminal environment, tool paths"),
    (".vscode/tasks.json", "VS Code runs its tasks, some when the folder opens"),
    (".vscode/launch.json", "VS Code runs it when you start debugging"),
    (".pre-commit-config.yaml", "pre-commit installs and runs its hooks"),
    (".yarnrc.yml", "yarn runs its yarnPath and plugins"),
    (".yarnrc", "yarn 1 runs its yarn-path"),
    (".npmrc", "npm runs its script-shell and node-options"),
    (".pnpmfile.cjs", "pnpm runs it on install"),
    ("mise.toml", "mise runs its hooks and templates when you enter the directory"),
    (".mise.toml", "mise runs its hooks and templates when you enter the directory"),
    (".cargo/config.toml", "cargo runs its rustc wrappers, runners and aliases"),
    (".cargo/config", "cargo runs its rustc wrappers, runners and aliases"),
)
TREES = ((".devcontainer", "devcontainer tools and VS Code run its commands"),)
GIT_CONFIG_ROLE = "git runs core.fsmonitor, core.sshCommand, aliases and filters it defines"
GIT_HOOKS_ROLE = "git runs these hooks"
GIT_INCLUDE_ROLE = "git reads it as part of its config"


def _sig(path: str):
    """The stat signature the exec fast path compares: None when the path is absent."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mode, st.st_ctime_ns)


def changed_since_seen(fast_file: str) -> bool:
    """True when a recorded path's stat differs from what exec last saw (a handful of lstat
    calls); False also when there is no table (no baseline yet)."""
    try:
        with open(fast_file, "rb") as fh:
            table = marshal.load(fh)
    except (OSError, ValueError, EOFError, TypeError):
        return False
    try:
        for path, sig in table:
            if _sig(path) != sig:
                return True
    except (TypeError, ValueError):
        return True
    return False


def after_command(fast_file: str, project_dir: str) -> None:
    """exec/shell, after the command returned: report each change not reported before."""
    if not changed_since_seen(fast_file):
        return
    try:
        lines = report_new(project_dir)
    except OSError:
        return
    import sys

    for line in lines:
        sys.stderr.write(f"mariner: tripwire: {line}\n")
    sys.stderr.flush()


# --- the slow side: snapshots, comparisons, records ------------------------------------------

class Entry:
    """One watched path as it is: kind (file, dir, link, other), stat signature, content hash."""

    __slots__ = ("kind", "sig", "digest", "role")

    def __init__(self, kind: str, sig: tuple, digest: str | None, role: str):
        self.kind, self.sig, self.digest, self.role = kind, sig, digest, role

    def to_json(self) -> list:
        return [self.kind, list(self.sig), self.digest, self.role]

    @classmethod
    def from_json(cls, data: list) -> "Entry":
        return cls(data[0], tuple(data[1]), data[2], data[3])

    @property
    def executable(self) -> bool:
        return self.kind == "file" and bool(self.sig[2] & 0o111)


def _hash_file(path: str) -> str | None:
    import hashlib

    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        read = 0
        while read < MAX_HASH_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            read += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return digest.hexdigest()


def _entry(path: str, role: str) -> Entry | None:
    import hashlib
    import stat

    try:
        st = os.lstat(path)
    except OSError:
        return None
    sig = (st.st_ino, st.st_size, st.st_mode, st.st_ctime_ns)
    if stat.S_ISREG(st.st_mode):
        return Entry("file", sig, _hash_file(path), role)
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir", sig, None, role)
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = ""
        return Entry("link", sig, hashlib.sha256(target.encode(errors="surrogateescape"))
                     .hexdigest() + ":" + target, role)
    return Entry("other", sig, None, role)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _git_config_refs(config_file: str) -> tuple[list[str], list[str]]:
    """(core.hooksPath values, include paths) in a git config file, as written."""
    hooks, includes = [], []
    try:
        with open(config_file, encoding="utf-8", errors="replace") as fh:
            text = fh.read(1 << 20)
    except OSError:
        return hooks, includes
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            end = line.find("]")
            section = line[1:end if end > 0 else len(line)].strip().lower()
            line = line[end + 1:].strip() if end > 0 else ""
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        key = key.strip().lower()
        value = value.split(" #")[0].split(" ;")[0].strip().strip('"')
        if section == "core" and key == "hookspath":
            hooks.append(value)
        elif (section == "include" or section.startswith("includeif")) and key == "path":
            includes.append(value)
    return hooks, includes


class _Walk:
    """Collects the watched paths of one project: entries that exist, probes that do not."""

    def __init__(self, root: str):
        self.root = root
        self.entries: dict[str, Entry] = {}
        self.probes: dict[str, str] = {}     # absent paths, watched in case they appear

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def add(self, path: str, role: str) -> Entry | None:
        rel = self.rel(path)
        if rel in self.entries or rel in self.probes:
            return self.entries.get(rel)
        entry = _entry(path, role)
        if entry is None:
            self.probes[rel] = role
        else:
            self.entries[rel] = entry
        return entry

    def tree(self, path: str, role: str, skip_samples: bool = False, depth: int = 3) -> None:
        entry = self.add(path, role)
        if entry is None or entry.kind != "dir" or depth <= 0:
            return
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return
        for name in names[:MAX_TREE_FILES]:
            if skip_samples and name.endswith(".sample"):
                continue
            self.tree(os.path.join(path, name), role, skip_samples, depth - 1)

    def git_dir(self, git_dir: str, depth: int = 0) -> None:
        config = os.path.join(git_dir, "config")
        self.add(config, GIT_CONFIG_ROLE)
        self.tree(os.path.join(git_dir, "hooks"), GIT_HOOKS_ROLE, skip_samples=True, depth=1)
        self.git_config(config, git_dir)
        modules = os.path.join(git_dir, "modules")
        if depth < 2 and self.add(modules, "git keeps its submodules' repositories here"):
            try:
                names = sorted(os.listdir(modules))[:MAX_TREE_FILES]
            except OSError:
                names = []
            for name in names:
                sub = os.path.join(modules, name)
                if os.path.isdir(sub) and not os.path.islink(sub):
                    self.git_dir(sub, depth + 1)

    def git_config(self, config: str, git_dir: str, depth: int = 0) -> None:
        hooks, includes = _git_config_refs(config)
        for value in hooks:
            path = os.path.expanduser(value)
            path = os.path.normpath(os.path.join(self.root, path))
            if _inside(path, self.root):
                self.tree(path, GIT_HOOKS_ROLE + " (core.hooksPath)", depth=1)
        for value in includes:
            path = os.path.expanduser(value)
            path = os.path.normpath(os.path.join(os.path.dirname(config), path))
            if _inside(path, self.root) and depth < 3:
                if self.add(path, GIT_INCLUDE_ROLE) is not None:
                    self.git_config(path, git_dir, depth + 1)


def snapshot(project_dir: str) -> _Walk:
    """The watched paths of the project as they are now."""
    root = os.path.realpath(project_dir)
    walk = _Walk(root)
    dot_git = os.path.join(root, ".git")
    entry = walk.add(dot_git, FILES[0][1])
    if entry is not None and entry.kind == "dir":
        walk.git_dir(dot_git)
    elif entry is not None and entry.kind == "file":
        try:
            with open(dot_git, encoding="utf-8", errors="replace") as fh:
                line = fh.readline().strip()
        except OSError:
            line = ""
        if line.startswith("gitdir:"):
            target = os.path.normpath(os.path.join(root, line[len("gitdir:"):].strip()))
            if _inside(target, root) and os.path.isdir(target):
                walk.git_dir(target)
    for rel, role in FILES[1:]:
        walk.add(os.path.join(root, rel), role)
    for rel, role in TREES:
        walk.tree(os.path.join(root, rel), role)
    return walk


class Change:
    """One difference between a recorded state and now."""

    def __init__(self, rel: str, what: str, role: str, path: str):
        self.rel, self.what, self.role, self.path = rel, what, role, path

    def line(self) -> str:
        return (f"{self.rel} {self.what} ({self.role}); review {self.path} before using those "
                f"tools here, then `mariner trust` acknowledges it")

    def to_json(self) -> dict:
        return {"path": self.rel, "change": self.what, "why": self.role}


def _describe(old: Entry | None, new: Entry | None) -> str | None:
    """What changed between two states of one path, in words; None when nothing that matters."""
    if old is None and new is None:
        return None
    # A directory that comes or goes matters by what is in it: each file is its own entry.
    if (old is None or old.kind == "dir") and (new is None or new.kind == "dir"):
        return None
    if old is None:
        if new.kind == "link":
            return f"is new: a symbolic link to {new.digest.split(':', 1)[1]}"
        return "is new" + (" and executable" if new.executable else
                           "" if new.kind == "file" else " (not a regular file)")
    if new is None:
        return "was removed"
    if old.kind != new.kind:
        return f"was replaced: it was a {old.kind}, now it is a {new.kind}"
    if new.kind == "link" and old.digest != new.digest:
        return f"now points to {new.digest.split(':', 1)[1]}"
    if new.kind != "file":
        return None
    content = old.digest != new.digest
    became_exec = new.executable and not old.executable
    if content and became_exec:
        return "was changed and made executable"
    if content:
        return "was changed"
    if became_exec:
        return "was made executable"
    if (old.sig[2] & 0o7777) != (new.sig[2] & 0o7777):
        return f"changed mode {oct(old.sig[2] & 0o7777)} -> {oct(new.sig[2] & 0o7777)}"
    return None


def compare(old: dict[str, Entry], walk: _Walk) -> list[Change]:
    out = []
    for rel in sorted(set(old) | set(walk.entries)):
        before, now = old.get(rel), walk.entries.get(rel)
        what = _describe(before, now)
        if what is not None:
            role = (now or before).role
            out.append(Change(rel, what, role, os.path.join(walk.root, rel)))
    return out


def _dir(project_dir: str) -> str:
    from .approval import state_dir

    return str(state_dir(project_dir))


def fast_file(project_dir: str) -> str:
    """The table exec checks (see changed_since_seen)."""
    return os.path.join(_dir(project_dir), FAST)


def _load(path: str) -> dict[str, Entry] | None:
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("version") != TRIPWIRE_VERSION:
            return None
        return {rel: Entry.from_json(item) for rel, item in data["entries"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


def _save(project_dir: str, walk: _Walk, *, baseline: bool) -> None:
    import json
    from pathlib import Path

    from . import paths
    from .fsutil import write_atomic

    directory = Path(_dir(project_dir))
    paths.ensure_private_dir(directory)
    text = json.dumps({"version": TRIPWIRE_VERSION, "project": walk.root,
                       "entries": {rel: e.to_json() for rel, e in sorted(walk.entries.items())}},
                      indent=1, sort_keys=True) + "\n"
    if baseline:
        write_atomic(directory / BASELINE, text, mode=0o600)
    write_atomic(directory / SEEN, text, mode=0o600)
    # The .git directory itself changes with every git command; what matters in it (config,
    # hooks/, modules/) has entries of its own.
    table = [(os.path.join(walk.root, rel), entry.sig) for rel, entry in walk.entries.items()
             if not (rel == ".git" and entry.kind == "dir")]
    table += [(os.path.join(walk.root, rel), None) for rel in walk.probes]
    write_atomic(directory / FAST, marshal.dumps(table), mode=0o600)


def has_baseline(project_dir: str) -> bool:
    return os.path.exists(os.path.join(_dir(project_dir), BASELINE))


def record_baseline(project_dir: str) -> None:
    """Record the watched paths as they are now, when nothing is recorded yet (the first
    `up`, before the VM boots). Never moves an existing baseline."""
    if not has_baseline(project_dir):
        _save(project_dir, snapshot(project_dir), baseline=True)


def pending(project_dir: str) -> tuple[_Walk, list[Change] | None]:
    """The paths as they are now and every change since the last acknowledgement (None when
    nothing was recorded yet). `acknowledge` records exactly this snapshot."""
    walk = snapshot(project_dir)
    baseline = _load(os.path.join(_dir(project_dir), BASELINE))
    return walk, (None if baseline is None else compare(baseline, walk))


def changes(project_dir: str) -> list[Change] | None:
    """Every change since the last acknowledgement; None when nothing was recorded yet."""
    return pending(project_dir)[1]


def acknowledge(project_dir: str, walk: _Walk) -> None:
    """`mariner trust`: the snapshot the developer reviewed becomes the baseline."""
    _save(project_dir, walk, baseline=True)


def report_new(project_dir: str) -> list[str]:
    """The changes since exec/shell last reported (each once), recorded as reported."""
    directory = _dir(project_dir)
    seen = _load(os.path.join(directory, SEEN))
    if seen is None:
        seen = _load(os.path.join(directory, BASELINE))
        if seen is None:
            return []
    walk = snapshot(project_dir)
    found = compare(seen, walk)
    # Recorded even when nothing that matters changed (a file touched): the stat table then
    # matches again and the next exec stays on the fast path.
    _save(project_dir, walk, baseline=False)
    return [change.line() for change in found]


def forget(project_dir: str) -> None:
    for name in (BASELINE, SEEN, FAST):
        try:
            os.unlink(os.path.join(_dir(project_dir), name))
        except FileNotFoundError:
            pass
