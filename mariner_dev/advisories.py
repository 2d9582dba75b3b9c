"""What `mariner validate` warns about without refusing the file.

Secrets in `[env]`: the guard. `[env]` is rendered into the VM's NixOS configuration, so every
value lands in the Nix store, which every user and process on the host (and in the guest) can
read, and stays there until garbage-collected. A repository that ships `GITHUB_TOKEN = "ghp_…"`
or a developer who pastes `DB_PASSWORD` there leaks it. The config stays valid (a name like
`TOKEN_URL` may be harmless), but validate says so and points to `exec -e` / `--env-file`,
which pass values at run time and write nothing. The shapes of secrets are secret_shapes.py's,
the table `[dotfiles]` refuses files by.

Resources beyond the host: more vCPUs than the host has cores, or more memory than its RAM,
still boot (QEMU overcommits) but contend with the host; a warning, not an error.
"""

from __future__ import annotations

import os
import re

from .errors import ConfigProblem
from .secret_shapes import find

# Name parts (split on "_") that mark a secret; "PWD" is the working directory, not one.
_SECRET_WORDS = {"TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PASSPHRASE",
                 "CREDENTIAL", "CREDENTIALS", "APIKEY", "PRIVATE"}
_SECRET_KEYS = re.compile(r"(^|_)(API|ACCESS|SECRET|PRIVATE|SIGNING|ENCRYPTION|MASTER)_KEY($|_)")


def secret_reason(name: str, value: str) -> str | None:
    """Why `name = value` in [env] looks like a secret, or None."""
    found = find(value.encode("utf-8", "surrogatepass"), value=True)
    if found is not None:
        return f"its value looks like {found[0].what}"
    if not value:
        return None
    upper = name.upper()
    if set(upper.split("_")) & _SECRET_WORDS or _SECRET_KEYS.search(upper):
        return "its name says it holds a secret"
    return None


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_memory_mib() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        return None


def config_warnings(cfg, *, cpus: int | None = None,
                    memory_mib: int | None = None) -> list[ConfigProblem]:
    """The warnings for a valid project config, each placed at its key in mariner.toml
    (`cpus`, `memory_mib`: the host's, measured when not given)."""
    from .tomlpos import Positions

    try:
        text = cfg.config_file.read_text(encoding="utf-8").removeprefix("\ufeff")
    except (OSError, UnicodeDecodeError):
        text = ""
    positions = Positions(text)
    file = str(cfg.config_file)
    out: list[ConfigProblem] = []

    def warn(path: tuple, message: str) -> None:
        line, column = positions.of_value(path)
        if line is None:  # set elsewhere (a default): no place in the file
            return
        out.append(ConfigProblem(file, line, column, ".".join(map(str, path)), message))

    for name, value in cfg.env:
        why = secret_reason(name, value)
        if why:
            warn(("env", name), f"{why}; [env] lands in the world-readable Nix store: pass it "
                                f"at run time with `mariner exec -e {name}` or `--env-file` "
                                f"instead")
    cpus = cpus or host_cpus()
    if cfg.vm.cpus > cpus:
        warn(("vm", "cpus"), f"{cfg.vm.cpus} is more than this host's {cpus} CPU"
                             f"{'s' if cpus != 1 else ''}; the VM boots, but contends with "
                             f"the host for them")
    memory_mib = memory_mib or host_memory_mib()
    if memory_mib and cfg.vm.memory_mib > memory_mib:
        warn(("vm", "memory"), f"{cfg.vm.memory_mib} MiB is more than this host's "
                               f"{memory_mib} MiB of RAM; the VM may not start or may be "
                               f"killed when it uses it")
    return sorted(out, key=lambda w: (w.line or 0, w.column or 0))
