"""The approval gate: what a project's mariner.toml may make the host do (`mariner trust`).

The attack it stops. The VM writes the project directory, so it writes `mariner.toml` and the
files it names. Without this gate, code in the VM (or a repository someone cloned) adds
`[nix] modules = ["x.nix"]` whose `microvm.binScripts` microvm.nix's host units run as root
(tap-up, virtiofsd-run, ...), or a `[[shares]]` entry with `source = "/"`, or binds host ports
that host programs then trust, and the next `mariner up` builds and starts it: root on the host.

So the part of the config that acts on the host (the "host surface", `host_surface` below) is
approved by the developer, per project directory, and recorded in MARINER_HOME (which no VM
can reach): a digest, plus a copy of the approved module files, so that a later change is shown
as a diff. `up` computes the surface from the very bytes it renders (nixrender.HostInputs, read
once: nothing can be swapped between the check and the build) and refuses, or asks on a
terminal, when it differs from the approval. Gated:

- `[nix] modules`: the paths, and the content of every file they name (directories whole);
- `[nix] mariner`: the flake that is built and evaluated;
- `[[shares]]`: each source by its real path (a directory the VM replaced by a symlink is a
  new path) and whether it is writable;
- `[ports] forward` (host ports bound), `[network] mode`, `interface` and `ssh_port` (host
  interfaces and the loopback port QEMU binds), `[vm] hypervisor` and `cid` (the host-side
  process and the vsock address), and `[vm] name` (the host's systemd unit and state dir).

Not gated, because they act only inside the VM: cpus, memory, packages, env, hooks, the
workspace mount point, the guest user, uid and gid, storage sizes and docker. Day-to-day edits
stay friction-free.

`render` never needs approval, but an unapproved render is not written where the host builds the
VM from (`microvm -u` by hand must not pick it up): see `render_target`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import MarinerError, EXIT_USAGE

if TYPE_CHECKING:
    from .model import ProjectConfig
    from .nixrender import HostInputs

APPROVAL_VERSION = 1
MAX_DIFF_LINES = 200


def project_key(project_dir: Path | str) -> str:
    """The project's real directory: approvals and the tripwire are kept per directory."""
    return os.path.realpath(project_dir)


def state_dir(project_dir: Path | str) -> Path:
    """MARINER_HOME/projects/<hash of the real project directory>: approval and tripwire."""
    from . import paths

    digest = hashlib.sha256(project_key(project_dir).encode()).hexdigest()[:24]
    return paths.mariner_home() / "projects" / digest


def _approval_dir(project_dir: Path | str) -> Path:
    return state_dir(project_dir) / "approval"


def _display_path(path: str, project: str) -> str:
    if path == project or path.startswith(project.rstrip("/") + "/"):
        return os.path.relpath(path, project)
    return path


def host_surface(cfg: "ProjectConfig", inputs: "HostInputs") -> dict:
    """The settings of `cfg` that act on the host, as plain data (see the module docstring)."""
    project = str(cfg.project_dir)
    return {
        "vm.name": cfg.vm.name,
        "vm.hypervisor": cfg.vm.hypervisor,
        "vm.cid": cfg.vm.cid,
        "network.mode": cfg.network.mode,
        "network.interface": cfg.network.interface,
        "network.ssh_port": cfg.network.ssh_port,
        "nix.mariner": cfg.nix.mariner,
        "nix.modules": [_display_path(str(p), project) for p in cfg.nix.modules],
        "shares": [f"{source} ({'read-only' if share.readonly else 'read-write'})"
                   for share, source in zip(cfg.shares, inputs.share_sources)],
        "ports.forward": [_forward_label(p) for p in cfg.ports],
    }


def _forward_label(port) -> str:
    return f"127.0.0.1:{port.host} -> guest {port.guest}"


def approved_forwards(cfg: "ProjectConfig") -> list[tuple[int, int]]:
    """The `[ports] forward` entries the agent may bind on the host: those of the current
    config that were approved. A forward the VM added waits for `mariner trust`; one the
    developer removed goes at once."""
    approved = load(cfg.project_dir)
    allowed = set(approved.items.get("ports.forward") or []) if approved else set()
    return [(p.host, p.guest) for p in cfg.ports if _forward_label(p) in allowed]


def _file_digests(files: dict[str, bytes]) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(files.items())}


def digest_of(items: dict, modules: dict[str, str]) -> str:
    payload = json.dumps({"items": items, "modules": modules}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Approval:
    """What the developer last approved for a project directory."""

    project: str
    digest: str
    items: dict
    modules: dict[str, str]          # flake path -> sha256 of the approved bytes
    directory: Path

    def module_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.directory / "files" / rel).read_bytes()
        except OSError:
            return None


def load(project_dir: Path | str) -> Approval | None:
    """The recorded approval, or None when there is none (or it cannot be read)."""
    directory = _approval_dir(project_dir)
    try:
        data = json.loads((directory / "approval.json").read_text())
        if data.get("version") != APPROVAL_VERSION:
            return None
        return Approval(project=data["project"], digest=data["digest"], items=data["items"],
                        modules=data["modules"], directory=directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass
class KeyChange:
    key: str
    old: object
    new: object
    first: bool = False

    def line(self) -> str:
        if self.first:
            return f"  {self.key} = {_show(self.new)}"
        return f"  {self.key}: {_show(self.old)} -> {_show(self.new)}"


@dataclass
class FileChange:
    rel: str            # the path in the flake (modules/<n>-<name>[/...])
    change: str         # new | changed | removed
    diff: list[str] = field(default_factory=list)


def _show(value) -> str:
    if value is None:
        return "(default)"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "(none)"
    return str(value)


@dataclass
class Review:
    """How the host surface of a project differs from what was approved."""

    project: str
    config_file: str
    first: bool                       # nothing approved yet for this directory
    keys: list[KeyChange]
    files: list[FileChange]
    digest: str
    items: dict
    module_files: dict[str, bytes]

    @property
    def approved(self) -> bool:
        return not self.first and not self.keys and not self.files

    def changed_names(self) -> list[str]:
        """The keys and module files that differ, for one line."""
        return [k.key for k in self.keys] + [f"{f.rel} ({f.change})" for f in self.files]

    def summary(self) -> str:
        if self.first:
            return (f"{self.config_file}: the settings that act on the host are not approved "
                    f"yet for {self.project}")
        return (f"{self.config_file} changed what acts on the host since you approved it: "
                f"{', '.join(self.changed_names())}")

    def lines(self) -> list[str]:
        """The full review: the keys, then a diff of each module file, for people."""
        if self.approved:
            return ["Host settings: unchanged since your approval."]
        out = [self.summary() + ":"] if not self.first else [
            f"Settings of {self.config_file} that act on the host (not approved yet):"]
        out += [k.line() for k in self.keys]
        for change in self.files:
            out.append(f"  {change.rel}: {change.change}")
            out += ["    " + line for line in change.diff]
        return out

    def to_json(self) -> dict:
        return {"first": self.first, "keys": [k.key for k in self.keys],
                "files": [{"path": f.rel, "change": f.change} for f in self.files]}


def _diff(old: bytes | None, new: bytes | None, rel: str) -> list[str]:
    import difflib

    def text(data: bytes | None) -> list[str] | None:
        if data is None:
            return []
        try:
            return data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            return None

    a, b = text(old), text(new)
    if a is None or b is None:
        return [f"(binary: {len(old or b'')} -> {len(new or b'')} bytes)"]
    lines = list(difflib.unified_diff(a, b, f"approved/{rel}", f"now/{rel}", lineterm="", n=2))
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES] + [f"... {len(lines) - MAX_DIFF_LINES} more lines"]
    return lines


def review(cfg: "ProjectConfig", inputs: "HostInputs") -> Review:
    """Compare the host surface of `cfg` (with the bytes in `inputs`) to the approval."""
    items = host_surface(cfg, inputs)
    modules = _file_digests(inputs.module_files)
    digest = digest_of(items, modules)
    approved = load(cfg.project_dir)
    first = approved is None
    keys: list[KeyChange] = []
    files: list[FileChange] = []
    if approved is None or approved.digest != digest:
        old_items = approved.items if approved else {}
        old_modules = approved.modules if approved else {}
        for key, value in items.items():
            if first:
                keys.append(KeyChange(key, None, value, first=True))
            elif old_items.get(key) != value:
                keys.append(KeyChange(key, old_items.get(key), value))
        for rel in sorted(set(modules) | set(old_modules)):
            if modules.get(rel) == old_modules.get(rel):
                continue
            old = approved.module_bytes(rel) if approved and rel in old_modules else None
            new = inputs.module_files.get(rel)
            change = "new" if rel not in old_modules else "removed" if new is None else "changed"
            files.append(FileChange(rel, change, _diff(old, new, rel)))
    return Review(project=project_key(cfg.project_dir), config_file=str(cfg.config_file),
                  first=first, keys=keys, files=files, digest=digest, items=items,
                  module_files=dict(inputs.module_files))


def record(cfg: "ProjectConfig", result: Review) -> None:
    """Approve what `result` was computed from: its digest and exactly its module bytes."""
    from . import paths

    target = _approval_dir(cfg.project_dir)
    paths.ensure_private_dir(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".approval.new-"))
    try:
        for rel, data in result.module_files.items():
            path = staging / "files" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (staging / "approval.json").write_text(json.dumps({
            "version": APPROVAL_VERSION, "project": result.project,
            "config_file": result.config_file, "digest": result.digest,
            "items": result.items, "modules": _file_digests(result.module_files)},
            indent=2, sort_keys=True) + "\n")
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, target: Path) -> None:
    """Replace directory `target` by `staging` so that it is always the old or the new one."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=".approval.old-"))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def revoke(project_dir: Path | str) -> bool:
    """Remove the project's approval; False when there was none."""
    target = _approval_dir(project_dir)
    if not target.exists():
        return False
    shutil.rmtree(target)
    return True


class NotApproved(MarinerError):
    """The host surface differs from the approval, and nobody at a terminal approved it."""

    exit_code = EXIT_USAGE

    def __init__(self, result: Review, declined: bool = False):
        verb = "not approved" if declined else "refusing to act on it"
        super().__init__(f"{result.summary()}; {verb}",
                         hint="review it with `mariner trust` (it shows the keys and a diff of "
                              "the module files) and approve it there, then run `mariner up` "
                              "again")
        self.review = result

    def json_fields(self) -> dict:
        return {"approval": self.review.to_json()}


Confirm = Callable[[Review], bool]


def gate(cfg: "ProjectConfig", inputs: "HostInputs", confirm: Confirm | None = None) -> Review:
    """Pass when the host surface is approved; else ask `confirm` (a person at a terminal)
    and record the approval, or raise NotApproved (exit 2)."""
    result = review(cfg, inputs)
    if result.approved:
        return result
    if confirm is None:
        raise NotApproved(result)
    if not confirm(result):
        raise NotApproved(result, declined=True)
    record(cfg, result)
    return result


def is_approved(cfg: "ProjectConfig", inputs: "HostInputs") -> bool:
    return review(cfg, inputs).approved


def approve_written(cfg: "ProjectConfig", written: dict[Path, bytes]) -> bool:
    """`init`'s approval: only module files whose bytes are exactly what init wrote (`written`,
    path -> bytes) are approved; a module file that was already there stays unapproved, so the
    first `up` asks about it. Returns True when everything the config names was approved."""
    from .nixrender import read_host_inputs

    inputs = read_host_inputs(cfg)
    files = {}
    complete = True
    for index, path in enumerate(cfg.nix.modules):
        name = inputs.module_names[index]
        prefix = f"modules/{name}"
        entries = {rel: data for rel, data in inputs.module_files.items()
                   if rel == prefix or rel.startswith(prefix + "/")}
        ok = bool(entries)
        for rel, data in entries.items():
            source = path if rel == prefix else path / rel[len(prefix) + 1:]
            if written.get(Path(source)) != data:
                ok = False
        if ok:
            files.update(entries)
        else:
            complete = False
    result = review(cfg, inputs)
    result.module_files = files
    result.digest = digest_of(result.items, _file_digests(files))
    record(cfg, result)
    return complete


@dataclass
class TrustReview:
    """`mariner trust`: the host settings and the tripwire, reviewed apart, each recorded from
    exactly what was shown (the bytes read once, the snapshot taken once)."""

    cfg: "ProjectConfig"
    config: Review
    files_snapshot: object
    file_changes: list | None          # None: the project files were never recorded

    @classmethod
    def of(cls, cfg: "ProjectConfig") -> "TrustReview":
        """The review of the project as it is now; a first tripwire record is taken here."""
        from . import tripwire
        from .nixrender import read_host_inputs

        walk, changes = tripwire.pending(str(cfg.project_dir))
        if changes is None:
            tripwire.acknowledge(str(cfg.project_dir), walk)
        return cls(cfg=cfg, config=review(cfg, read_host_inputs(cfg)), files_snapshot=walk,
                   file_changes=changes)

    @property
    def tripwire_pending(self) -> bool:
        """Changes to acknowledge. A first record is not one: `up` would take it anyway."""
        return bool(self.file_changes)

    @property
    def nothing_to_do(self) -> bool:
        return self.config.approved and not self.tripwire_pending

    def config_lines(self) -> list[str]:
        return self.config.lines()

    def tripwire_lines(self) -> list[str]:
        if self.file_changes is None:
            return ["Project files the host runs (git hooks, .envrc, editor tasks): recorded "
                    "now, as they are; changes from here on are reported."]
        if not self.file_changes:
            return ["Project files the host runs: unchanged since you acknowledged them."]
        return (["Project files the host runs, changed since you acknowledged them:"]
                + [f"  {c.rel} {c.what} ({c.role})" for c in self.file_changes])

    def approve_config(self) -> None:
        record(self.cfg, self.config)

    def acknowledge_files(self) -> None:
        from . import tripwire

        tripwire.acknowledge(str(self.cfg.project_dir), self.files_snapshot)
