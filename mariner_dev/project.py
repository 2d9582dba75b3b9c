"""Creating a project's mariner.toml (`mariner init`) and rendering its flake (`mariner render`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from .config import CONFIG_NAME, safe_vm_name
from .errors import MarinerError, UsageError
from .fsutil import write_atomic

if TYPE_CHECKING:
    from .nixrender import RenderedFlake
    from .state import VmRecord

SCHEMA_URL = "https://raw.githubusercontent.com/mariner-dev/mariner/main/schema/mariner.schema.json"

DEFAULT_TEMPLATE = """\
#:schema {schema_url}
# mariner.toml: this project's microVM. Every key is optional; commented lines show defaults.
# Reference: {schema_url}

[vm]
name = "{name}"             # systemd unit microvm@{name} and the guest's hostname
# cpus = 2
# memory = "4GiB"           # integer MiB or a string with a unit (not exactly 2GiB: QEMU hangs)
# hypervisor = "qemu"
# user = "vm"               # the guest account
# cid = 7                   # default: allocated, unique on this host (3-254)

[network]
# mode = "bridge"           # bridge: guest at 10.0.0.<cid>; user: SSH on a loopback port, no bridge
# dns = "10.0.0.1"          # bridge: the host's DNS, if its host module sets exposeDNS
# ssh_port = 2222           # user mode only (default: allocated)

[workspace]
# mount = "/workspaces/{name}"   # where this directory appears in the guest

# [[shares]]                # more host directories, over virtiofs
# source = "~/datasets"
# target = "/data"
# readonly = true

[nix]
packages = ["git"]          # nixpkgs attribute paths, e.g. "python312Packages.pip"
# modules = ["nix/extra.nix"]

# [storage]
# persist = "8GiB"
# nix_store = "32GiB"
# docker = "32GiB"

# [docker]
# enable = false

[env]                       # lands in the world-readable Nix store: secrets go through `exec -e`
# DATABASE_URL = "postgres://localhost/app"

[hooks]
# post_create = "make deps"     # once, after the first successful boot
# post_start = "make migrate"   # after every start

[ports]
# forward = [8000, "15432:5432"]

# Your dotfiles and SSH settings ([dotfiles], [ssh]) go in your per-user config,
# ~/.config/mariner/config.toml, never here: a repository must not choose what leaves your account.
"""


def examples_dir() -> Path:
    """The starter projects: shipped inside the package, or the repository's examples/."""
    packaged = Path(__file__).with_name("examples")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "examples"


def templates() -> list[str]:
    root = examples_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())


def init_text(directory: Path, template: str | None = None) -> str:
    """The text of a new mariner.toml for `directory`."""
    name = safe_vm_name(directory.name) or "project"
    if template is None:
        return DEFAULT_TEMPLATE.format(name=name, schema_url=SCHEMA_URL)
    available = templates()
    if template not in available:
        raise UsageError(f"no template named {template!r}; choose one of: {', '.join(available)}")
    import tomlkit

    doc = tomlkit.parse((examples_dir() / template / CONFIG_NAME).read_text())
    vm = doc.get("vm")
    if vm is not None and "name" in vm:
        vm["name"] = name
    text = tomlkit.dumps(doc)
    if not text.startswith("#:schema"):
        text = f"#:schema {SCHEMA_URL}\n" + text
    return text


@dataclass(frozen=True)
class InitResult:
    path: Path
    template: str | None
    created: tuple[Path, ...] = ()   # files and directories copied from the template
    approved: bool = False           # the host settings it wrote are approved (approval.py)


def _template_support(template: str) -> list[str]:
    """The files a template comes with besides its mariner.toml (modules, share directories,
    the Makefile its hooks run, ...), as paths relative to the template, files only: a new
    project gets everything the template's config and hooks refer to."""
    root = examples_dir() / template
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")
                  if path.is_file() and not path.is_symlink() and path.name != CONFIG_NAME
                  and "__pycache__" not in path.parts)


def _copy_support(template: str, directory: Path,
                  written: dict[Path, bytes] | None = None) -> tuple[Path, ...]:
    """Copy what the template refers to into `directory`, never overwriting anything; the
    bytes of each file copied go into `written` (path -> bytes)."""
    import shutil

    root = examples_dir() / template
    created = []
    for ref in _template_support(template):
        source, target = root / ref, directory / ref
        if target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        if written is not None:
            written[target] = source.read_bytes()
        created.append(target)
    return tuple(created)


def _approve_init(directory: Path, written: dict[Path, bytes]) -> bool:
    """Approve the host settings of the mariner.toml just written, with exactly the module
    bytes init wrote (approval.approve_written). False when the project does not load."""
    from .approval import approve_written
    from .config import load_project
    from .errors import ConfigError

    from .tripwire import record_baseline

    # Before any VM exists: what the host runs from the project is recorded as it was cloned.
    record_baseline(str(directory))
    try:
        cfg = load_project(project_dir=directory)
    except ConfigError:
        return False
    return approve_written(cfg, written)


def init_project(directory: Path, template: str | None = None, force: bool = False) -> InitResult:
    """Write a commented mariner.toml in `directory`; refuse to overwrite unless forced.

    With a template, the files its config refers to (extra modules, share directories) are
    copied too when missing, so the new project validates at once.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    target = directory / CONFIG_NAME
    text = init_text(directory, template)   # an unknown template is bad usage (2) first
    if target.exists() and not force:
        raise MarinerError(f"{target} already exists; use --force to overwrite it")
    written: dict[Path, bytes] = {}
    try:
        created = _copy_support(template, directory, written) if template else ()
        write_atomic(target, text)
    except OSError as exc:
        from .paths import describe_os_error

        raise MarinerError(f"cannot write a project into {directory}: "
                           f"{describe_os_error(exc)}",
                           hint="run `mariner init` in a directory of yours") from None
    approved = _approve_init(directory, written)
    return InitResult(path=target, template=template, created=created, approved=approved)


@dataclass(frozen=True)
class RenderResult:
    directory: Path
    flake: "RenderedFlake"
    record: "VmRecord"
    approved: bool = True    # False: written beside the VM's flake directory, not into it


def render_for(cfg, record, inputs=None, *, built: bool = True) -> "RenderedFlake":
    """The flake this project's VM would be built from now (computed, nothing written), from
    `inputs` (nixrender.HostInputs) when they were read already.

    For a VM that exists (`built`), what cannot apply to it is kept as it was built
    (drift.settle): such changes are not drift."""
    from .developer import developer
    from .drift import settle
    from .keys import public_key_for
    from .nixrender import ShareIdentity, render_flake

    if built:
        cfg = settle(cfg, record.built_config).cfg
    # virtiofsd serves the shares as the developer; the guest user has the [vm] uid/gid. On the
    # runner backend virtiofsd already runs as the user (no root to drop), so upstream's
    # virtiofsd-run stays.
    ids = None
    if cfg.backend != "runner":
        dev = developer(cfg.project_dir)
        ids = ShareIdentity(uid=dev.uid, gid=dev.gid, guest_uid=cfg.vm.uid,
                            guest_gid=cfg.vm.gid)
    return render_flake(cfg, cid=record.cid, ssh_port=record.ssh_port,
                        public_key=public_key_for(cfg), inputs=inputs, share_identity=ids)


def render_project(cfg, out: Path | None = None) -> RenderResult:
    """Reserve the VM's cid/port, render its flake and write it (default place or `out`)."""
    from . import paths
    from .allocation import reserve
    from .approval import is_approved
    from .nixrender import read_host_inputs, write_flake

    if out is not None:
        out = Path(out).absolute()
        expected = _out_dir_identity(out)   # refused before anything is reserved or written
    inputs = read_host_inputs(cfg)
    record = reserve(cfg)
    flake = render_for(cfg, record, inputs)
    if out is not None:
        from .state import record_rendered_dir

        directory = write_flake(flake, out,
                                may_replace=lambda moved: _still_replaceable(out, moved, expected))
        record_rendered_dir(directory)
        return RenderResult(directory=directory, flake=flake, record=record)
    if not is_approved(cfg, inputs):
        # The default directory is what the host builds the VM from (`microvm -u` by hand
        # too): a change nobody approved goes beside it.
        directory = write_flake(flake, paths.unapproved_flake_dir(cfg.name))
        return RenderResult(directory=directory, flake=flake, record=record, approved=False)
    from .lifecycle import VmLock

    # The default directory is the one the VM is built from: not while up/down/destroy work.
    with VmLock(cfg.name, wait=True):
        directory = write_flake(flake, paths.default_flake_dir(cfg.name))
    return RenderResult(directory=directory, flake=flake, record=record)


def _out_dir_identity(out: Path) -> tuple[int, int] | None:
    """Whether `render --out` may write at `out`: a new path, an empty directory, or one that
    `render --out` created (recorded in MARINER_HOME by path and inode); the identity of what
    is there now, for the check after it is moved aside. Anything else is refused, exit 2.

    Today's danger: `mariner render --out .` in a project replaced the project directory."""
    import os
    import stat

    from .state import rendered_dir_identity

    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MarinerError(f"cannot write the flake to {out}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{out} is a symlink; `render --out` writes only to a directory it "
                         f"names directly (give the real path)")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot write the flake to {out}: it is not a directory")
    if os.path.lexists(out / CONFIG_NAME):
        raise UsageError(f"{out} holds a {CONFIG_NAME}: `render --out` never replaces a "
                         f"project directory; choose a new directory (nothing was changed)")
    identity = (st.st_dev, st.st_ino)
    try:
        empty = not any(os.scandir(out))
    except OSError as exc:
        raise UsageError(f"cannot write the flake to {out}: {exc.strerror}") from None
    if not empty and rendered_dir_identity(out) != identity:
        raise UsageError(f"{out} exists, is not empty and was not created by `mariner render`; "
                         f"nothing was changed: choose a new or empty directory")
    return identity


def _still_replaceable(out: Path, moved: Path, expected: tuple[int, int] | None) -> str | None:
    """After the directory at `out` was moved aside to `moved`: is it still the one that was
    checked (not swapped for another meanwhile)? None if so, else why not."""
    import os

    st = os.lstat(moved)
    if expected is None or (st.st_dev, st.st_ino) != expected:
        return f"{out} changed while the flake was being written; nothing was changed: try again"
    if os.path.lexists(moved / CONFIG_NAME):
        return (f"{out} holds a {CONFIG_NAME}: `render --out` never replaces a project "
                f"directory; choose a new directory (nothing was changed)")
    return None
