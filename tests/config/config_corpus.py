"""The invalid-config corpus in tests/fixtures/invalid/: each file carries its expectations.

Header comments of a corpus file:
    # expect: KEY LINE:COL "FRAGMENT"   one per error mariner must report (KEY "-": no key)
    # jsonschema: reject|accept|n/a     what jsonschema says of the parsed file (n/a: not TOML)
    # as: user-config                   the file is the per-user config, not mariner.toml
    # dir: NAME                         the project directory's name
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
INVALID_DIR = REPO / "tests" / "fixtures" / "invalid"
VALID_DIR = REPO / "tests" / "config" / "valid"

_EXPECT = re.compile(r'^# expect: (\S+) (\d+):(\d+) "(.*)"\s*$')
_DIRECTIVE = re.compile(r"^# (jsonschema|as|dir): (.+?)\s*$")


@dataclass(frozen=True)
class Expect:
    key: str
    line: int
    column: int
    fragment: str


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    expects: tuple[Expect, ...]
    jsonschema: str | None
    user_config: bool
    dir_name: str

    def __str__(self) -> str:
        return self.name


def parse_case(path: Path) -> Case:
    text = path.read_bytes().decode("utf-8", errors="replace")
    expects, directives = [], {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if m := _EXPECT.match(line):
            key = "" if m.group(1) == "-" else m.group(1)
            fragment = json.loads(f'"{m.group(4)}"')
            expects.append(Expect(key, int(m.group(2)), int(m.group(3)), fragment))
        elif m := _DIRECTIVE.match(line):
            directives[m.group(1)] = m.group(2)
    return Case(name=path.stem, path=path, expects=tuple(expects),
                jsonschema=directives.get("jsonschema"),
                user_config=directives.get("as") == "user-config",
                dir_name=directives.get("dir", "proj"))


def invalid_cases() -> list[Case]:
    return [parse_case(p) for p in sorted(INVALID_DIR.glob("*.toml"))]


MINIMAL_PROJECT = "[vm]\ncpus = 2\n"


def place(case: Case, root: Path) -> tuple[Path, Path]:
    """Put the case on disk under `root`: (project directory, the file the errors are in)."""
    project = root / "projects" / case.dir_name
    project.mkdir(parents=True)
    if case.user_config:
        (project / "mariner.toml").write_text(MINIMAL_PROJECT)
        user = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
        user.parent.mkdir(parents=True)
        user.write_bytes(case.path.read_bytes())
        return project, user
    (project / "mariner.toml").write_bytes(case.path.read_bytes())
    return project, project / "mariner.toml"


def snapshot(*roots: Path) -> dict:
    """Every path under the roots with its type, mode, size, mtime and content digest."""
    out = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = None
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames + [""]:
                path = Path(dirpath, name) if name else Path(dirpath)
                st = path.lstat()
                digest = None
                if stat.S_ISREG(st.st_mode):
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path)] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_size,
                                  st.st_mtime_ns, digest)
    return out


HOST_COMMANDS = ("microvm", "systemctl", "journalctl", "nix", "nix-build", "sudo", "ssh")


def fake_host_commands(bindir: Path, log: Path) -> None:
    """Executables named like the host commands that only record that they ran."""
    bindir.mkdir(parents=True)
    for name in HOST_COMMANDS:
        script = bindir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 1\n')
        script.chmod(0o755)


def dotted(path) -> str:
    """A key path the way mariner prints it: vm.cpus, shares[1].target, env."1X"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = str(part)
            if not re.match(r"^[A-Za-z0-9_-]+$", part):
                part = json.dumps(part, ensure_ascii=False)
            out += ("." if out else "") + part
    return out
