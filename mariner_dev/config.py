"""Reading mariner.toml (and the per-user config) into a validated, resolved ProjectConfig.

The fast path parses with the standard library's tomllib; only when a file is invalid does
tomlkit re-read it, for its precise syntax-error positions. Every problem of every file is
collected and reported at once, each naming file:line:col, the key path and what is expected.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import model as m
from .errors import ConfigError, ConfigProblem
from .schema import describe, load_schema, validate
from .tomlpos import Positions

CONFIG_NAME = "mariner.toml"
MARINER_REV = "a34eea014f697d640cf1fc51df94db8ae164028d"
DEFAULT_MARINER_FLAKE = f"github:mksafavi/nix-mariner/{MARINER_REV}"

# Keys a per-user config may set: personal settings that do not belong in a committed file.
USER_KEYS = {"dotfiles": None, "ssh": None, "host": None, "vm": {"uid", "gid"}}
# Tables only the per-user config may hold: which of the developer's files and credentials
# reach the VM, and how the host runs it, are the developer's decision, never a repository's
# (a cloned mariner.toml, or one the VM rewrote through the shared project directory).
PER_USER_ONLY = ("dotfiles", "ssh", "host")

DEFAULT_CPUS = 2
DEFAULT_MEMORY_MIB = 4096   # nix-mariner's own default (modules/vm.nix)
# microvm.nix's QEMU runner warns "QEMU hangs if memory is exactly 2GB" (lib/runners/qemu.nix,
# microvm.nix issue 171): mariner never renders it for QEMU.
QEMU_HANGING_MEMORY_MIB = 2048
# Defaults a built VM keeps while mariner.toml leaves them unset (drift.settle).
TRACKED_DEFAULTS = (("vm", "memory"),)
MIN_MEMORY_MIB = 256
DEFAULT_PERSIST_MIB = 8192
DEFAULT_NIX_STORE_MIB = 32768
DEFAULT_DOCKER_MIB = 32768
RESERVED_TAGS = {"ro-store", "workspace"}
RESERVED_USERS = {"root", "nobody", "sshd", "messagebus", "nixbld"}
MAX_TAG = 36          # virtiofs tags are at most 36 bytes
MAX_IFNAME = 15       # Linux interface names
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
USER_MODE_IFACE = "mariner-user"

# The same sizes as the schema's pattern: a unit is K/M/G/T, then an optional "i" and "B"
# (all upper- or all lower-case); "B" alone is not a unit.
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGT])i?B?|([kmgt])i?b?)?\s*$")
MAX_SIZE_MIB = 64 * 1024 * 1024   # 64 TiB: beyond any VM, and far inside Nix's 64-bit integers
_UNIT = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def parse_size_mib(value: int | str) -> int | None:
    """MiB from 8192, "8GiB", "8G", "512MiB", "1.5GiB"; None when it is not a size.

    Units are binary (G = GiB), as memory sizes are meant; a bare number means MiB.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    if not match:
        return None
    number, unit = float(match.group(1)), (match.group(2) or match.group(3) or "m").lower()
    mib = number * _UNIT[unit]
    if mib != int(mib):
        return None
    return int(mib)


def safe_vm_name(raw: str) -> str:
    """A name fit for a systemd unit and a hostname: [a-z0-9-], at most 63, stable.

    A name with letters beyond ASCII keeps what transliterates ("café" -> "cafe") and gets a
    digest of the original, so that distinct directories ("数据", "日志", "cafe", "café")
    never share a VM name."""
    import unicodedata

    ascii_form = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9]+", "-", ascii_form.lower()).strip("-")
    if not raw.isascii() and any(c.isalnum() for c in raw):
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        return f"{name[:54].rstrip('-') or 'project'}-{digest}"
    if len(name) > 63:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = name[:54].rstrip("-") + "-" + digest
    return name


def _not_a_file(path: Path) -> str | None:
    """Why `path`, which exists in some form, cannot be read as a config file; None if it can."""
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return f"{path} is a directory, not a file"
    return f"{path} is not a regular file"


def find_config(start: Path) -> Path:
    """The mariner.toml in `start` or its nearest parent."""
    start = Path(start).absolute()
    for directory in (start, *start.parents):
        candidate = directory / CONFIG_NAME
        if candidate.is_file():
            return candidate
        if candidate.exists() or candidate.is_symlink():
            raise ConfigError(f"{_not_a_file(candidate)}; mariner reads its configuration from "
                              f"a {CONFIG_NAME} file")
    raise ConfigError(
        f"no {CONFIG_NAME} in {start} or any parent directory; "
        f"run `mariner init` to create one, or pass -C DIR")


@dataclass
class _Source:
    """One parsed file and its positions, for locating problems."""

    file: Path
    text: str
    data: dict
    _positions: Positions | None = None

    @property
    def positions(self) -> Positions:
        if self._positions is None:
            self._positions = Positions(self.text)
        return self._positions


@dataclass
class _Problems:
    items: list[ConfigProblem] = field(default_factory=list)

    def add(self, source: _Source, path: tuple, message: str, about_key: bool = False) -> None:
        line, col = (source.positions.of_key(path) if about_key
                     else source.positions.of_value(path))
        if line is None:
            # Nothing in the file to point at (e.g. a default that cannot be used): the
            # problem concerns the file as a whole.
            line, col = 1, 1
        self.items.append(ConfigProblem(str(source.file), line, col, _dotted(path), message))


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _dotted(path: tuple) -> str:
    """A key path as TOML spells it: vm.cpus, shares[1].target, env."NOT VALID"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = str(part)
            if not _BARE_KEY.match(part):
                part = json.dumps(part, ensure_ascii=False)
            out += ("." if out else "") + part
    return out


def _read(file: Path, problems: _Problems) -> _Source | None:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        problems.items.append(ConfigProblem(str(file), None, None, "", f"cannot read: {exc.strerror}"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[:exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        problems.items.append(ConfigProblem(str(file), line, col, "",
                                            f"not UTF-8 text (byte {exc.start})"))
        return None
    # A UTF-8 byte order mark (some Windows editors write one) is not TOML's business.
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.items.append(_syntax_problem(file, text, exc))
        return None
    return _Source(file, text, data)


def _syntax_problem(file: Path, text: str, exc: Exception) -> ConfigProblem:
    """A TOML syntax error with tomlkit's line and column (1-based) and message."""
    import tomlkit
    from tomlkit.exceptions import ParseError

    try:
        tomlkit.parse(text)
    except ParseError as err:
        message = str(err)
        message = re.sub(r"\s+at line \d+ col \d+$", "", message)
        lines = text.split("\n")
        at_end_of_line = (0 < err.line <= len(lines) and err.col >= len(lines[err.line - 1]))
        if message.startswith("Control characters") and at_end_of_line:
            # tomlkit's words for a string left open at the end of its line
            message = "the string is not closed before the end of the line"
        return ConfigProblem(str(file), err.line, err.col + 1, "", f"invalid TOML: {message}")
    except Exception as err:  # noqa: BLE001 - fall back to tomllib's own position below
        # tomlkit names a duplicated key (KeyAlreadyPresent) but gives no position.
        tomlkit_message = str(err).rstrip(".") if err.__class__.__name__ == "KeyAlreadyPresent" else None
    else:
        tomlkit_message = None
    match = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
    line, col = (int(match.group(1)), int(match.group(2))) if match else (None, None)
    if match is None and str(exc).endswith("(at end of document)"):
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
    message = tomlkit_message or re.sub(r"\s*\(at (line|end of document).*\)$", "", str(exc))
    return ConfigProblem(str(file), line, col, "", f"invalid TOML: {message}")


def _check_user_keys(source: _Source, problems: _Problems) -> None:
    for table, value in source.data.items():
        if table not in USER_KEYS:
            problems.add(source, (table,), f"`{table}` belongs in the project's {CONFIG_NAME}; "
                         f"the per-user config may hold only [dotfiles], [ssh], [host] and [vm] uid/gid",
                         True)
            continue
        allowed = USER_KEYS[table]
        if allowed is not None and isinstance(value, dict):
            for key in value:
                if key not in allowed:
                    problems.add(source, (table, key),
                                 f"`{table}.{key}` belongs in the project's {CONFIG_NAME}; the "
                                 f"per-user config may set only vm.uid and vm.gid", True)


def _check_per_user_only(source: _Source, user_file: Path, problems: _Problems) -> None:
    """A project file's [dotfiles], [ssh] and [host] are errors, and are then ignored."""
    for table in PER_USER_ONLY:
        if table in source.data:
            problems.add(source, (table,), f"[{table}] is accepted only in your per-user config "
                         f"{user_file}: a project's {CONFIG_NAME} (which a cloned repository or "
                         f"the VM itself can write) must not decide "
                         f"{_PER_USER_WHY[table]}; move the table there", True)
            del source.data[table]


_PER_USER_WHY = {
    "dotfiles": "which of your files are copied into the VM",
    "ssh": "which key logs in or whether your ssh-agent is reachable from the VM",
    "host": "how the host runs VMs",
}


def load_project(start: Path | None = None, *, project_dir: Path | None = None,
                 config_file: Path | None = None) -> m.ProjectConfig:
    """Find, read and validate a project's config (plus the per-user one) into a ProjectConfig.

    `project_dir` (-C) names the directory holding mariner.toml; otherwise it is looked up from
    `start` (default: the current directory) upwards.
    """
    from . import paths

    if config_file is None:
        if project_dir is not None:
            # -C DIR finds the project exactly as running from DIR does: DIR or a parent.
            directory = Path(project_dir).absolute()
            if not directory.is_dir():
                raise ConfigError(f"{directory} is not a directory (given with -C/--project)")
            config_file = find_config(directory)
        else:
            config_file = find_config(start or Path.cwd())
    config_file = Path(config_file).absolute()
    problems = _Problems()
    project = _read(config_file, problems)
    user_file = paths.user_config_file()
    # A directory or a broken link in its place is reported, not silently ignored.
    user = _read(user_file, problems) if user_file.exists() or user_file.is_symlink() else None
    if project is not None:
        _check_per_user_only(project, user_file, problems)
    schema = load_schema()
    poisoned: set[tuple] = set()

    def report(source: _Source, path: tuple, message: str, about_key: bool) -> None:
        problems.add(source, path, message, about_key)
        # The resolver treats a value the schema rejected as absent, so that it can still
        # report the file's other problems in the same run. Inside an array only the bad
        # element is dropped (a share, a port), so the other elements are still checked.
        cut = next((i + 1 for i, part in enumerate(path) if isinstance(part, int)), len(path))
        poisoned.add((source.file, path[:cut]))

    for source in (project, user):
        if source is not None:
            validate(source.data, schema, (),
                     lambda path, msg, about_key, s=source: report(s, path, msg, about_key))
            for path in _nul_strings(source.data, ()):
                report(source, path, "contains a NUL character, which no path, name or Nix "
                       "string can hold", False)
    if user is not None:
        _check_user_keys(user, problems)
    if project is None:
        raise ConfigError(problems.items)
    cfg = _Resolver(project, user, problems, poisoned).resolve()
    if problems.items:
        raise ConfigError(sorted(problems.items, key=_problem_order))
    return cfg


def _nul_strings(value: Any, path: tuple) -> list[tuple]:
    """Key paths of the strings (keys included) that contain a NUL character."""
    if isinstance(value, str):
        return [path] if "\0" in value else []
    if isinstance(value, dict):
        return [p for key, item in value.items()
                for p in ([path + (key,)] if "\0" in key else _nul_strings(item, path + (key,)))]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in _nul_strings(item, path + (index,))]
    return []


def _problem_order(problem: ConfigProblem) -> tuple:
    return (problem.file, problem.line or 0, problem.column or 0)


class _Resolver:
    """Applies defaults, resolves paths and checks what the schema cannot express."""

    def __init__(self, project: _Source, user: _Source | None, problems: _Problems,
                 poisoned: set[tuple] = frozenset()):
        self.poisoned = poisoned
        self.project = project
        self.user = user
        self.problems = problems
        self.project_dir = project.file.parent
        self.home = Path.home()

    # -- looking values up, remembering which file they came from --------------------------
    def get(self, *path: str, default: Any = None) -> Any:
        return self._lookup(path, default)[1]

    def _lookup(self, path: tuple, default: Any) -> tuple[_Source | None, Any]:
        for source in (self.project, self.user):
            if source is None:
                continue
            if any((source.file, path[:i]) in self.poisoned for i in range(1, len(path) + 1)):
                return None, default
            node: Any = source.data
            for part in path:
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return source, node
        return None, default

    def rejected(self, *path: str) -> bool:
        """True when a file sets `path` but the schema rejected the value."""
        return any((source.file, path[:i]) in self.poisoned
                   for source in (self.project, self.user) if source is not None
                   for i in range(1, len(path) + 1))

    def elements(self, *path: str) -> list[tuple[int, Any]]:
        """(index, element) of the array at `path`, without the elements the schema rejected."""
        source, items = self._lookup(path, None)
        if source is None or not isinstance(items, list):
            return []
        return [(index, item) for index, item in enumerate(items)
                if (source.file, path + (index,)) not in self.poisoned]

    def source_of(self, *path: Any) -> _Source:
        top = [p for p in path if isinstance(p, str)][:2]
        node: Any = self.project.data
        for part in top:
            if not isinstance(node, dict) or part not in node:
                return self.user if self.user is not None and self._has(self.user, top) else self.project
            node = node[part]
        return self.project

    @staticmethod
    def _has(source: _Source, path: list[str]) -> bool:
        node: Any = source.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def error(self, path: tuple, message: str, about_key: bool = False) -> None:
        self.problems.add(self.source_of(*path), path, message, about_key)

    def path_value(self, raw: str, key: tuple, base: Path | None = None) -> Path:
        """Resolve `~` and relative paths (relative to the file the value came from)."""
        expanded = os.path.expanduser(raw)
        path = Path(expanded)
        if not path.is_absolute():
            path = (base or self.source_of(*key).file.parent) / path
        return Path(os.path.normpath(path))

    def share_refusal(self, directory: Path) -> str | None:
        """Why `directory` may not be shared with the VM (share_policy), or None."""
        from .developer import developer
        from .share_policy import refusal

        dev = developer(self.project_dir)
        return refusal(directory, dev.uid, [self.home, dev.home])

    # -- sections ---------------------------------------------------------------------------
    def resolve(self) -> m.ProjectConfig:
        why = self.share_refusal(self.project_dir)
        if why is not None:
            # The project directory is always shared read-write: the same allowlist applies.
            self.problems.items.append(ConfigProblem(
                str(self.project.file), None, None, "",
                f"the project directory {self.project_dir} cannot be shared with the VM: {why}; "
                f"keep the project in a directory of its own"))
        vm = self.vm()
        backend = self.backend()
        network = self.network(vm, backend)
        workspace = self.get("workspace", "mount") or f"/workspaces/{vm.name}"
        workspace = _norm_guest(workspace)
        if workspace == "/":
            self.error(("workspace", "mount"), "cannot mount the project over the guest's root "
                       "directory; choose a directory such as /workspaces/<name>")
        elif _overlaps(workspace, "/nix"):
            self.error(("workspace", "mount"), f"{workspace} overlaps /nix, which nix-mariner mounts")
        shares = self.shares(workspace)
        ports = self.ports(network)
        return m.ProjectConfig(
            project_dir=self.project_dir,
            config_file=self.project.file,
            user_config_file=self.user.file if self.user else None,
            vm=vm,
            network=network,
            workspace_mount=workspace,
            shares=shares,
            nix=self.nix(),
            storage=m.StorageSettings(
                persist_mib=self.size(("storage", "persist"), DEFAULT_PERSIST_MIB, 1),
                nix_store_mib=self.size(("storage", "nix_store"), DEFAULT_NIX_STORE_MIB, 1),
                docker_mib=self.size(("storage", "docker"), DEFAULT_DOCKER_MIB, 1),
            ),
            docker_enable=bool(self.get("docker", "enable", default=False)),
            env=tuple(sorted((self.get("env") or {}).items())),
            dotfiles=self.dotfiles(),
            hooks=m.HooksSettings(self.get("hooks", "post_create"), self.get("hooks", "post_start")),
            ports=ports,
            ssh=self.ssh(),
            defaulted=tuple(".".join(key) for key in TRACKED_DEFAULTS if self.get(*key) is None),
            backend=backend,
        )

    def size(self, key: tuple, default: int, minimum: int) -> int:
        raw = self.get(*key)
        if raw is None:
            return default
        mib = parse_size_mib(raw)
        if mib is None:
            self.error(key, f'{describe(raw)} is not a whole number of MiB (try "8GiB" or 8192)')
            return default
        if mib < minimum:
            self.error(key, f"{describe(raw)} is less than the minimum {minimum} MiB")
        elif mib > MAX_SIZE_MIB:
            self.error(key, f"{describe(raw)} is more than the maximum {MAX_SIZE_MIB} MiB (64 TiB)")
        return mib

    def vm(self) -> m.VmSettings:
        name = self.get("vm", "name")
        if name is None:
            name = safe_vm_name(self.project_dir.name)
            if not NAME_RE.match(name):
                self.error(("vm",), f"cannot make a VM name from the directory name "
                           f"{describe(self.project_dir.name)}; set [vm] name "
                           f'(lower-case letters, digits and "-")', True)
                name = "invalid"
        memory = self.size(("vm", "memory"), DEFAULT_MEMORY_MIB, MIN_MEMORY_MIB)
        hypervisor = self.get("vm", "hypervisor", default=m.DEFAULT_HYPERVISOR)
        if hypervisor in m.UNBOOTABLE_HYPERVISORS:
            self.error(("vm", "hypervisor"), f"{describe(hypervisor)} cannot boot a nix-mariner "
                       f"VM: {m.UNBOOTABLE_HYPERVISORS[hypervisor]} (microvm.nix "
                       f"lib/runners/{hypervisor}.nix); use \"qemu\" (or \"crosvm\" in bridge "
                       f"mode)")
        if memory == QEMU_HANGING_MEMORY_MIB and hypervisor == "qemu":
            self.error(("vm", "memory"), f"{describe(self.get('vm', 'memory'))} is exactly "
                       f"{QEMU_HANGING_MEMORY_MIB} MiB, with which QEMU hangs at boot (microvm.nix "
                       f"issue 171, lib/runners/qemu.nix); use a nearby size such as 2040 or "
                       f"\"2.5GiB\"")
        user = self.get("vm", "user", default=m.DEFAULT_USER)
        if user in RESERVED_USERS:
            self.error(("vm", "user"), f"{describe(user)} is a system account in the guest; "
                       f"choose another name (default \"{m.DEFAULT_USER}\")")
        from .developer import developer

        dev = developer(self.project_dir)
        return m.VmSettings(
            name=name,
            cpus=self.get("vm", "cpus", default=DEFAULT_CPUS),
            memory_mib=memory,
            hypervisor=hypervisor,
            user=user,
            cid=self.get("vm", "cid"),
            uid=self.get("vm", "uid", default=dev.guest_uid),
            gid=self.get("vm", "gid", default=dev.guest_gid),
        )

    def backend(self) -> str:
        """The host backend (`microvm` | `runner`) from MARINER_BACKEND or the per-user
        [host] backend (a project file's [host] is refused by _check_per_user_only)."""
        from .host.choice import choose

        setting = None
        if self.user is not None and not self.rejected("host", "backend"):
            setting = (self.user.data.get("host") or {}).get("backend")
        return choose(setting, strict=False).name

    def network(self, vm: m.VmSettings, backend: str = "microvm") -> m.NetworkSettings:
        mode = self.get("network", "mode", default="user" if backend == "runner" else "bridge")
        if mode == "bridge" and backend == "runner" and not self.rejected("network", "mode"):
            self.error(("network", "mode"), '"bridge" needs a tap device on br-microvm, which '
                       'only root can create; the runner backend (VMs run as you) has user '
                       'networking only: remove network.mode or set it to "user" (or use the '
                       'microvm backend: MARINER_BACKEND=microvm)')
        ssh_port = self.get("network", "ssh_port")
        iface = self.get("network", "interface")
        dns = self.get("network", "dns")
        if dns is not None:
            try:
                dns = str(ipaddress.ip_address(dns.strip()))
            except ValueError:
                self.error(("network", "dns"), f"{describe(dns)} is not an IP address (e.g. "
                           f"\"{m.BRIDGE_GATEWAY}\", the host's bridge address, when the host "
                           f"module sets mariner.host.network.exposeDNS)")
                dns = None
        if (mode == "user" and vm.hypervisor != "qemu"
                and vm.hypervisor not in m.UNBOOTABLE_HYPERVISORS):
            key = ("vm", "hypervisor") if self.get("vm", "hypervisor") is not None else ("network", "mode")
            self.error(key, f'user-mode networking works only with hypervisor "qemu" '
                       f'(microvm.nix forwards the SSH port through qemu); '
                       f'use network.mode = "bridge" or hypervisor = "qemu"')
        if ssh_port is not None and mode != "user" and not self.rejected("network", "mode"):
            self.error(("network", "ssh_port"), 'only used with network.mode = "user"; '
                       'in bridge mode SSH listens on 10.0.0.<cid>:22')
        if iface is not None:
            if len(iface) > MAX_IFNAME:
                self.error(("network", "interface"),
                           f"{describe(iface)} is {len(iface)} characters; Linux interface "
                           f"names are at most {MAX_IFNAME}")
            elif mode == "bridge" and not iface.startswith("microvm-"):
                self.error(("network", "interface"),
                           f"{describe(iface)} must start with \"microvm-\" in bridge mode: "
                           f"the host bridges only microvm-* interfaces into br-microvm")
        return m.NetworkSettings(mode=mode, ssh_port=ssh_port, interface=iface, dns=dns)

    def shares(self, workspace: str) -> tuple[m.Share, ...]:
        out: list[m.Share] = []
        targets: dict[str, int] = {}
        tags: dict[str, int] = {"workspace": -1, "ro-store": -1}
        for index, entry in self.elements("shares"):
            key = ("shares", index)
            source = self.path_value(entry["source"], key + ("source",))
            if not source.exists():
                self.error(key + ("source",), f"{source} does not exist")
            elif not source.is_dir():
                self.error(key + ("source",), f"{source} is not a directory")
            elif (why := self.share_refusal(source)) is not None:
                self.error(key + ("source",), f"{source} cannot be shared with the VM: {why}")
            target = _norm_guest(entry["target"])
            if target == "/":
                self.error(key + ("target",), "cannot mount over the guest's root directory")
            elif target in targets:
                self.error(key + ("target",),
                           f"{target} is already the target of shares[{targets[target]}]")
            elif _overlaps(target, workspace):
                self.error(key + ("target",),
                           f"{target} overlaps the workspace mount {workspace}; "
                           f"choose a target outside it (or change workspace.mount)")
            elif _overlaps(target, "/nix"):
                self.error(key + ("target",), f"{target} overlaps /nix, which nix-mariner mounts")
            targets.setdefault(target, index)
            tag = entry.get("tag")
            if tag is not None:
                if tag in RESERVED_TAGS:
                    self.error(key + ("tag",), f"{describe(tag)} is reserved "
                               f"(nix-mariner and mariner use {', '.join(sorted(RESERVED_TAGS))})")
                elif tag in tags:
                    self.error(key + ("tag",), f"share tag {describe(tag)} is already used by "
                               f"shares[{tags[tag]}]; microvm.nix requires unique tags")
            else:
                tag = _derive_tag(target, set(tags))
            tags.setdefault(tag, index)
            out.append(m.Share(source=source, target=target,
                               readonly=bool(entry.get("readonly", True)), tag=tag))
        return tuple(out)

    def nix(self) -> m.NixSettings:
        modules = []
        for index, raw in self.elements("nix", "modules"):
            key = ("nix", "modules", index)
            path = self.path_value(raw, key)
            if not path.exists():
                self.error(key, f"{path} does not exist")
            elif path.is_dir() and not (path / "default.nix").is_file():
                self.error(key, f"{path} is a directory without default.nix")
            elif path.is_file() and path.suffix != ".nix":
                self.error(key, f"{path} is not a .nix file")
            else:
                self.check_module_files(path, key)
            modules.append(path)
        return m.NixSettings(
            packages=tuple(item for _, item in self.elements("nix", "packages")),
            modules=tuple(modules),
            mariner=self.get("nix", "mariner") or DEFAULT_MARINER_FLAKE,
        )

    def check_module_files(self, path: Path, key: tuple) -> None:
        """Devices, FIFOs, sockets, escaping symlinks and oversized entries (modulefiles.py)."""
        from .modulefiles import ModuleFileError, scan

        try:
            scan(path)
        except ModuleFileError as exc:
            self.error(key, str(exc))

    def ports(self, network: m.NetworkSettings) -> tuple[m.PortForward, ...]:
        out: list[m.PortForward] = []
        seen: dict[int, int] = {}
        for index, raw in self.elements("ports", "forward"):
            key = ("ports", "forward", index)
            if isinstance(raw, int):
                host = guest = raw
            else:
                host, guest = (int(p) for p in raw.split(":"))
                bad = [p for p in (host, guest) if not 1 <= p <= 65535]
                if bad:
                    self.error(key, f"{describe(raw)}: port {bad[0]} is out of range 1-65535")
                    continue
            if host in seen:
                self.error(key, f"host port {host} is already forwarded by ports.forward[{seen[host]}]")
                continue
            if network.ssh_port is not None and host == network.ssh_port:
                self.error(key, f"host port {host} is network.ssh_port")
                continue
            seen[host] = index
            out.append(m.PortForward(host=host, guest=guest))
        return tuple(out)

    def dotfiles(self) -> m.DotfilesSettings:
        def home_paths(name: str) -> tuple[Path, ...]:
            out = []
            for index, raw in self.elements("dotfiles", name):
                key = ("dotfiles", name, index)
                path = self.path_value(raw, key, base=self.home)
                if path == self.home:
                    self.error(key, f"{describe(raw)} is your whole home directory; list the "
                               f"files and directories under it to copy (e.g. \"~/.gitconfig\")")
                elif not _inside(path, self.home):
                    self.error(key, f"{path} is not under your home directory {self.home}; "
                               f"dotfiles keep their place under ~ in the guest")
                out.append(path)
            return tuple(out)

        target = self.get("dotfiles", "target", default="~/dotfiles")
        if target.startswith("/") or ".." in PurePosixPath(target).parts:
            self.error(("dotfiles", "target"), f"{describe(target)} must be a path under the "
                       f"guest user's home (e.g. \"~/dotfiles\")")
        return m.DotfilesSettings(
            files=home_paths("files"),
            allow=home_paths("allow"),
            repository=self.get("dotfiles", "repository"),
            install=self.get("dotfiles", "install"),
            target=target,
            timeout=self.get("dotfiles", "timeout", default=600),
        )

    def ssh(self) -> m.SshSettings:
        identity = None
        raw = self.get("ssh", "identity")
        if raw is not None:
            identity = self.path_value(raw, ("ssh", "identity"), base=self.home)
            if not identity.is_file():
                self.error(("ssh", "identity"), f"{identity} does not exist; point it at a "
                           f"private key whose .pub sits beside it, or remove the key to use "
                           f"mariner's own")
            elif not identity.with_name(identity.name + ".pub").is_file():
                self.error(("ssh", "identity"), f"{identity}.pub does not exist; mariner "
                           f"authorizes the public half in the guest "
                           f"(create it with `ssh-keygen -y -f {identity} > {identity}.pub`)")
        return m.SshSettings(identity=identity, forward_agent=self.forward_agent())

    def forward_agent(self) -> bool:
        """Whether this project's VM may use the developer's ssh-agent: only when the per-user
        [ssh] forward_agent lists this project's directory (never every VM at once)."""
        raw = self.get("ssh", "forward_agent", default=[])
        if raw is True:
            self.error(("ssh", "forward_agent"), "true would hand your ssh-agent to every VM; "
                       "list the projects whose VM may use it instead "
                       f'(e.g. ["{_tilde(self.project_dir, self.home)}"])')
            return False
        if raw is False:
            return False
        here = os.path.realpath(self.project_dir)
        allowed = False
        for index, item in self.elements("ssh", "forward_agent"):
            path = self.path_value(item, ("ssh", "forward_agent", index), base=self.home)
            if os.path.realpath(path) == here:
                allowed = True
        return allowed


def _tilde(path: Path, home: Path) -> str:
    """`path` spelled with ~ when it is under `home` (for suggestions)."""
    try:
        return "~/" + path.relative_to(home).as_posix()
    except ValueError:
        return str(path)


def _norm_guest(path: str) -> str:
    return str(PurePosixPath(os.path.normpath(path))) if path.startswith("/") else path


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return path != root


def _derive_tag(target: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", target.strip("/")).strip("-") or "share"
    base = base[:MAX_TAG]
    tag, n = base, 2
    while tag in taken or tag in RESERVED_TAGS:
        suffix = f"-{n}"
        tag = base[:MAX_TAG - len(suffix)] + suffix
        n += 1
    return tag
