"""Rendering a project's VM flake directory (flake.nix, vm.nix, copied modules) from its config.

Rendering only computes file contents; `write_flake` puts them on disk atomically. Every value
that comes from the user goes through `nix_string`, so it evaluates to exactly the original.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import model as m
from .config import USER_MODE_IFACE
from .errors import MarinerError

WORKSPACE_TAG = "workspace"
# Volume images and QEMU's sockets only for the microvm user and the kvm group; images made
# before this (0644) lose other users' access at the next start.
VOLUME_PRIVACY = ("umask 0007\n"
                  "for image in ./*.img; do\n"
                  "  if [ -f \"$image\" ]; then chmod o-rwx -- \"$image\" || true; fi\n"
                  "done\n")
METADATA_FILE = "mariner.json"
# Written by Nix (`microvm -c`) into the flake directory: it pins nix-mariner's revision and
# hash. Not rendered, not part of the drift hash, and kept by every render: dropping it would
# make the next build lock again (network, and maybe another pin than the VM was built with).
LOCK_FILE = "flake.lock"


@dataclass(frozen=True)
class RenderedFlake:
    """The files of a flake directory (relative path -> bytes) and their content hash."""

    name: str
    files: dict[str, bytes]
    hash: str
    metadata: dict
    modes: dict[str, int] = field(default_factory=dict)  # permission bits; default 0o644


def nix_string(value: str) -> str:
    """A Nix double-quoted string literal that evaluates to exactly `value`."""
    if "\0" in value:
        raise MarinerError(f"{value!r}: Nix strings cannot hold a NUL character")
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
               .replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def nix_value(value, indent: str = "  ") -> str:
    """Nix source for JSON-like data (str, int, bool, list, dict), user strings escaped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return nix_string(value)
    if isinstance(value, (list, tuple)):
        if not value:
            return "[ ]"
        if all(isinstance(v, (str, int)) for v in value):
            return "[ " + " ".join(nix_value(v) for v in value) + " ]"
        inner = indent + "  "
        return "[\n" + "".join(f"{inner}{nix_value(v, inner)}\n" for v in value) + indent + "]"
    if isinstance(value, dict):
        if not value:
            return "{ }"
        inner = indent + "  "
        body = "".join(f"{inner}{nix_attr(k)} = {nix_value(v, inner)};\n" for k, v in value.items())
        return "{\n" + body + indent + "}"
    raise TypeError(f"cannot render {type(value).__name__} as Nix")


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*$")
_NIX_KEYWORDS = {"if", "then", "else", "assert", "with", "let", "in", "rec", "inherit", "or"}


def nix_attr(name: str) -> str:
    """An attribute name: bare when it is a plain identifier, else a quoted string."""
    return name if _IDENT.match(name) and name not in _NIX_KEYWORDS else nix_string(name)


def mac_for_cid(cid: int) -> str:
    """nix-mariner's MAC for a cid: 02:00:00:00:00:<cid in two lower-case hex digits>."""
    return f"02:00:00:00:00:{cid:02x}"


def nix_system() -> str:
    machine = platform.machine()
    return {"x86_64": "x86_64-linux", "amd64": "x86_64-linux", "aarch64": "aarch64-linux",
            "arm64": "aarch64-linux"}.get(machine, f"{machine}-linux")


def _module_file_name(index: int, path: Path) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", path.name).strip("-") or "module"
    return f"{index}-{safe}"


def _vm_module(cfg: m.ProjectConfig, cid: int, ssh_port: int | None, public_key: str,
               share_sources: tuple[str, ...], socket_dir: str | None = None) -> str:
    vm = cfg.vm
    user = nix_attr(vm.user)
    settings: list[tuple[str, str]] = [
        ("networking.hostName", nix_string(vm.name)),
        ("mariner.cid", str(cid)),
        ("mariner.username", nix_string(vm.user)),
        ("mariner.ssh.authorizedKey", nix_string(public_key)),
        # nix-mariner defines the user's uid as a plain value: only mkForce overrides it.
        (f"users.users.{user}.uid", f"lib.mkForce {vm.uid}"),
    ]
    if vm.gid != m.DEFAULT_GID:
        settings += [
            (f"users.groups.{user}.gid", str(vm.gid)),
            (f"users.users.{user}.group", f"lib.mkForce {nix_string(vm.user)}"),
        ]
    settings += [
        # `microvm -c` makes the state dir readable by everyone (chmod -R a+rX) and the runner
        # creates volume images with the unit's umask (0644): any local user could read the
        # VM's disks (its host key, its home, the synced dotfiles). The runner's preStart
        # runs as the microvm user just before the images are created and QEMU starts.
        ("microvm.preStart", f"lib.mkBefore {nix_string(VOLUME_PRIVACY)}"),
        ("microvm.vcpu", str(vm.cpus)),
        ("microvm.mem", str(vm.memory_mib)),
        ("microvm.hypervisor", nix_string(vm.hypervisor)),
        # sshd answers on vsock too (systemd's ssh-generator), so the first host-key pin can be
        # taken over AF_VSOCK, which nothing on the bridge can spoof (remote/trust.py). A
        # render without a vsock cid must turn this off with it.
        ("microvm.vsock.ssh.enable", "lib.mkDefault true"),
    ]
    def socket(index: int, tag: str) -> str:
        # With mariner's virtiofsd-run: in the developer's socket directory, short names.
        return f"{socket_dir}/{index}.sock" if socket_dir else f"virtiofs-{tag}.sock"

    shares = [{"proto": "virtiofs", "tag": WORKSPACE_TAG, "source": str(cfg.project_dir),
               "mountPoint": cfg.workspace_mount, "socket": socket(0, WORKSPACE_TAG),
               "readOnly": False}]
    shares += [{"proto": "virtiofs", "tag": s.tag, "source": source,
                "mountPoint": s.target, "socket": socket(i, s.tag),
                "readOnly": s.readonly}
               for i, (s, source) in enumerate(zip(cfg.shares, share_sources), start=1)]
    if cfg.backend == "runner":
        runner = _runner_settings(shares)
        # A runner-mode setting replaces the default one for the same option (Nix refuses an
        # attribute defined twice in one module).
        overridden = {option for option, _ in runner}
        settings = [entry for entry in settings if entry[0] not in overridden] + runner
    else:
        settings.append(("microvm.shares", nix_value(shares)))
    settings += [
        ("mariner.storage.persistSizeMiB", str(cfg.storage.persist_mib)),
        ("mariner.storage.nixStoreSizeMiB", str(cfg.storage.nix_store_mib)),
        ("mariner.storage.dockerSizeMiB", str(cfg.storage.docker_mib)),
        ("mariner.docker.enable", nix_value(cfg.docker_enable)),
    ]
    mac = mac_for_cid(cid)
    if cfg.network.mode == "user":
        iface = cfg.network.interface or USER_MODE_IFACE
        settings += [
            # nix-mariner's guest network matches its interface by this MAC.
            ("microvm.interfaces", nix_value([{"type": "user", "id": iface, "mac": mac}])),
            # An empty host address would bind every interface: SSH stays on loopback.
            ("microvm.forwardPorts", nix_value([{
                "from": "host", "proto": "tcp",
                "host": {"address": "127.0.0.1", "port": ssh_port},
                "guest": {"port": 22}}])),
            ("mariner.network.address", nix_string(f"{m.USER_NET_GUEST}/24")),
            ("mariner.network.gateway", nix_string(m.USER_NET_GATEWAY)),
            ("mariner.network.dns", nix_string(cfg.network.dns or m.USER_NET_DNS)),
        ]
    else:
        if cfg.network.interface:
            settings.append(("microvm.interfaces", nix_value(
                [{"type": "tap", "id": cfg.network.interface, "mac": mac}])))
        if cfg.network.dns:
            # nix-mariner leaves it null (the guest's resolved uses its FallbackDNS)
            settings.append(("mariner.network.dns", nix_string(cfg.network.dns)))
    packages = list(cfg.nix.packages)
    if cfg.dotfiles.repository and "git" not in packages:
        packages.append("git")  # the dotfiles repository is cloned in the guest
    if packages:
        paths = [p.split(".") for p in packages]
        settings.append(("environment.systemPackages",
                         f"map (attrPath: lib.getAttrFromPath attrPath pkgs) {nix_value(paths)}"))
    if cfg.env:
        settings.append(("environment.variables", nix_value(dict(cfg.env))))
    body = "".join(f"  {key} = {value};\n" for key, value in settings)
    return ("# Generated by mariner from mariner.toml; do not edit: change mariner.toml and run\n"
            "# `mariner up` (or `mariner render`).\n"
            "{ lib, pkgs, ... }:\n{\n" + body + "}\n")


# nix-mariner's storage.nix defines this share in a plain list (the host's store, 9p).
NIX_MARINER_STORE_SHARE = {"tag": "ro-store", "source": "/nix/store",
                           "mountPoint": "/nix/.ro-store"}


def _runner_settings(shares: list[dict]) -> list[tuple[str, str]]:
    """What the runner backend (the VM runs as the user, no host module) needs of the guest.

    On a single-user Nix install the user owns /nix/store, so a guest root that could write
    the store share could change the host's programs: the share must be read-only. nix-mariner
    defines it without a priority, and a second `ro-store` entry fails microvm.nix's
    duplicate-tag assertion, so the whole list is restated under mkForce. virtiofsd's sockets
    get no group (the default `kvm` group needs root to hand out). vsock needs
    /dev/vhost-vsock usable by the user; nix-mariner copies mariner.cid to microvm.vsock.cid
    without a priority, so turning it off takes mkForce (SSH goes over the forwarded port).
    """
    from .host.choice import vhost_vsock_usable

    store = dict(NIX_MARINER_STORE_SHARE, readOnly=True)
    settings = [("microvm.shares", f"lib.mkForce {nix_value([store, *shares])}"),
                ("microvm.virtiofsd.group", "null")]
    if not vhost_vsock_usable():
        settings += [("microvm.vsock.cid", "lib.mkForce null"),
                     # sshd on vsock asserts a cid
                     ("microvm.vsock.ssh.enable", "lib.mkForce false")]
    return settings


# Where a VM's virtiofsd sockets live on the microvm backend: a directory of the developer's
# (group kvm, so QEMU, user microvm in group kvm, can connect) under a root-owned parent. The
# VM's state directory will not do: the developer cannot write it, and QEMU can, so root must
# not create anything in it. Short, for the 108-byte socket path limit.
VIRTIOFS_SOCKET_ROOT = "/run/mariner-virtiofs"
VIRTIOFSD_MODULE = "virtiofsd.nix"
QEMU_GROUP = "kvm"   # the host module runs QEMU as user microvm, group kvm


@dataclass(frozen=True)
class ShareIdentity:
    """Whom virtiofsd acts as on the host (the developer) and whom they are in the guest."""

    uid: int
    gid: int
    guest_uid: int
    guest_gid: int


def virtiofs_socket_dir(name: str) -> str:
    return f"{VIRTIOFS_SOCKET_ROOT}/{name}"


def _virtiofsd_module(socket_dir: str, ids: ShareIdentity) -> str:
    """A module replacing microvm.nix's `virtiofsd-run` so that the shares are served as the
    developer, never as root.

    Upstream's script runs supervisord as root and always passes `--posix-acl --xattr`, which
    virtiofsd refuses together with `--translate-uid/--translate-gid`. This one (run as root by
    the host module's Type=notify unit) makes the socket directory, drops to the developer's
    ids (keeping only the socket group, for `--socket-group`), starts one virtiofsd per share
    without a sandbox that would need root, squashes every guest uid/gid onto the developer's
    (so guest root creates files as the developer and cannot chown or chmod what the developer
    does not own), shows the developer's ids as the guest user's, and tells systemd it is ready
    once every socket exists (what upstream's supervisord event handler did).
    """
    u, g, gu, gg = ids.uid, ids.gid, ids.guest_uid, ids.guest_gid
    socket_dir_nix = nix_string(socket_dir)
    return f"""# Generated by mariner; do not edit. virtiofsd serves this VM's shares as the developer
# (uid {u}, gid {g}), never as root: see README "Security model".
{{ config, lib, pkgs, ... }}:
let
  shares = builtins.filter (s: s.proto == "virtiofs") config.microvm.shares;
  socketDir = {socket_dir_nix};
  group = if config.microvm.virtiofsd.group != null then config.microvm.virtiofsd.group else {nix_string(QEMU_GROUP)};
  exe = "${{config.microvm.virtiofsd.package}}/bin/virtiofsd";
  arg = lib.escapeShellArg;
  start = s: ''
    rm -f ${{arg s.socket}}
    "''${{drop[@]}}" ${{exe}} \\
      --socket-path=${{arg s.socket}} \\
      ${{lib.optionalString (config.microvm.virtiofsd.group != null) "--socket-group=${{arg group}}"}} \\
      --shared-dir=${{arg s.source}} \\
      --sandbox=none \\
      --thread-pool-size ${{toString config.microvm.virtiofsd.threadPoolSize}} \\
      --xattr \\
      --cache=${{arg s.cache}} \\
      ${{lib.optionalString (config.microvm.virtiofsd.inodeFileHandles != null)
        "--inode-file-handles=${{arg config.microvm.virtiofsd.inodeFileHandles}}"}} \\
      ${{lib.optionalString (config.microvm.hypervisor == "crosvm") "--tag=${{arg s.tag}}"}} \\
      ${{lib.optionalString s.readOnly "--readonly"}} \\
      --translate-uid=squash-guest:0:{u}:4294967295 \\
      --translate-gid=squash-guest:0:{g}:4294967295 \\
      --translate-uid=host:{u}:{gu}:1 \\
      --translate-gid=host:{g}:{gg}:1 \\
      ${{lib.concatMapStringsSep " " arg config.microvm.virtiofsd.extraArgs}} &
    pids+=("$!")
    sockets+=(${{arg s.socket}})
  '';
in
{{
  config = lib.mkIf (shares != [ ] && config.microvm.hypervisor != "vfkit") {{
    assertions = map (s: {{
      assertion = lib.hasPrefix (socketDir + "/") s.socket;
      message = "mariner: the virtiofs share ${{s.tag}} must have its socket under ${{socketDir}}, where virtiofsd can create it as the developer";
    }}) shares;
    microvm.binScripts.virtiofsd-run = lib.mkForce ''
      # mariner: virtiofsd as the developer (uid {u}, gid {g}), never as root.
      set -euo pipefail
      socket_dir=${{arg socketDir}}
      if [ "$(${{pkgs.coreutils}}/bin/id -u)" = 0 ]; then
        # The host module's unit runs this as root: a socket directory of the developer's,
        # that QEMU (group ${{group}}) can enter, under a parent only root writes.
        ${{pkgs.coreutils}}/bin/install -d -m 0755 -o root -g root "$(${{pkgs.coreutils}}/bin/dirname "$socket_dir")"
        ${{pkgs.coreutils}}/bin/install -d -m 0750 -o {u} -g ${{arg group}} "$socket_dir"
        drop=(${{pkgs.util-linux}}/bin/setpriv --reuid={u} --regid={g} --groups=${{arg group}} --inh-caps=-all --no-new-privs --)
      else
        # Already unprivileged (run by the developer): nothing to drop.
        ${{pkgs.coreutils}}/bin/mkdir -p "$socket_dir"
        drop=()
      fi
      umask 007
      pids=()
      sockets=()
      stop() {{ kill "''${{pids[@]}}" 2>/dev/null || true; wait || true; }}
      trap 'stop; exit 0' TERM INT
      ${{lib.concatMapStrings start shares}}
      # Ready once every socket exists (the unit is Type=notify, NotifyAccess=all).
      for socket in "''${{sockets[@]}}"; do
        until [ -S "$socket" ]; do
          for pid in "''${{pids[@]}}"; do
            kill -0 "$pid" 2>/dev/null || {{ echo "a virtiofsd exited before $socket appeared" >&2; stop; exit 1; }}
          done
          ${{pkgs.coreutils}}/bin/sleep 0.1
        done
      done
      if [ -n "''${{NOTIFY_SOCKET:-}}" ]; then
        ${{pkgs.systemd}}/bin/systemd-notify --ready
      fi
      # One daemon gone takes the others down: the unit restarts them together.
      status=0
      wait -n || status=$?
      echo "a virtiofsd exited (status $status): stopping the others" >&2
      stop
      exit 1
    '';
  }};
}}
"""


def _flake_nix(cfg: m.ProjectConfig, module_names: list[str],
               extra_modules: tuple[str, ...] = ()) -> str:
    modules = ["mariner.nixosModules.default", "./vm.nix", *extra_modules]
    modules += [f"./modules/{name}" for name in module_names]
    module_lines = "".join(f"          {mod}\n" for mod in modules)
    return (
        "# Generated by mariner from mariner.toml; do not edit.\n"
        "{\n"
        f"  description = {nix_string('mariner VM ' + cfg.name)};\n"
        "\n"
        f"  inputs.mariner.url = {nix_string(cfg.nix.mariner)};\n"
        "\n"
        "  outputs = { self, mariner, ... }:\n"
        "    let\n"
        "      nixpkgs = mariner.inputs.nixpkgs;\n"
        "    in\n"
        "    {\n"
        f"      nixosConfigurations.{nix_attr(cfg.name)} = nixpkgs.lib.nixosSystem {{\n"
        f"        system = {nix_string(nix_system())};\n"
        "        modules = [\n"
        f"{module_lines}"
        "        ];\n"
        "      };\n"
        "    };\n"
        "}\n"
    )


@dataclass(frozen=True)
class HostInputs:
    """What a render reads from the host's disk, read once: the `[nix] modules` files (flake
    path -> bytes) and each share's source with symlinks resolved. The trust gate approves
    exactly these, and the flake is rendered from them (no second read to swap files under)."""

    module_names: tuple[str, ...]
    module_files: dict[str, bytes]
    share_sources: tuple[str, ...]
    module_modes: dict[str, int] = field(default_factory=dict)   # permission bits of each file


def read_host_inputs(cfg: m.ProjectConfig) -> HostInputs:
    """Read the module files and resolve the share sources of `cfg`."""
    names, files, modes = _module_files(cfg)
    # The real path: a share directory that the VM replaced by a symlink shows as a new path.
    shares = tuple(os.path.realpath(s.source) for s in cfg.shares)
    return HostInputs(module_names=tuple(names), module_files=files, share_sources=shares,
                      module_modes=modes)


def _module_files(cfg: m.ProjectConfig) -> tuple[list[str], dict[str, bytes], dict[str, int]]:
    from .modulefiles import ModuleFileError, read

    names: list[str] = []
    files: dict[str, bytes] = {}
    modes: dict[str, int] = {}
    for index, path in enumerate(cfg.nix.modules):
        name = _module_file_name(index, path)
        names.append(name)
        try:
            contents = read(path)
        except ModuleFileError as exc:
            raise MarinerError(f"nix.modules[{index}]: {exc}", exit_code=2) from None
        for rel, data, mode in contents:
            target = f"modules/{name}/{rel}" if rel else f"modules/{name}"
            files[target] = data
            modes[target] = mode
    return names, files, modes


def render_flake(cfg: m.ProjectConfig, *, cid: int, ssh_port: int | None,
                 public_key: str, inputs: HostInputs | None = None,
                 share_identity: ShareIdentity | None = None,
                 socket_dir: str | None = None) -> RenderedFlake:
    """Compute the flake directory for a VM with this cid (and user-mode SSH port), from
    `inputs` when the caller has read them already (see HostInputs).

    `share_identity`: the developer whose ids virtiofsd serves the shares with; None (or root)
    keeps microvm.nix's own virtiofsd-run. `socket_dir`: where its sockets go (default
    VIRTIOFS_SOCKET_ROOT/<name>; a relative one is relative to the runner's directory)."""
    if cfg.network.mode == "user" and ssh_port is None:
        raise MarinerError("user-mode networking needs an SSH port; none was allocated")
    inputs = inputs or read_host_inputs(cfg)
    files = dict(inputs.module_files)
    modes = dict(inputs.module_modes)
    extra: tuple[str, ...] = ()
    sockets = None
    if share_identity is not None and share_identity.uid != 0:
        sockets = socket_dir or virtiofs_socket_dir(cfg.name)
        files[VIRTIOFSD_MODULE] = _virtiofsd_module(sockets, share_identity).encode()
        extra = (f"./{VIRTIOFSD_MODULE}",)
    files["flake.nix"] = _flake_nix(cfg, list(inputs.module_names), extra).encode()
    files["vm.nix"] = _vm_module(cfg, cid, ssh_port, public_key, inputs.share_sources,
                                 sockets).encode()
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
        if modes.get(rel, 0) & 0o100:  # Nix keeps a file's executable bit, nothing else
            digest.update(b"\0x")
    flake_hash = digest.hexdigest()
    metadata = {"name": cfg.name, "hash": flake_hash, "cid": cid, "ssh_port": ssh_port,
                "config": cfg.to_json()}
    files[METADATA_FILE] = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
    return RenderedFlake(name=cfg.name, files=files, hash=flake_hash, metadata=metadata,
                         modes=modes)


def write_flake(rendered: RenderedFlake, directory: Path, *,
                may_replace: Callable[[Path], str | None] | None = None) -> Path:
    """Write the flake directory so that it is always either the old or the new one.

    An existing directory is moved aside before it is removed; with `may_replace`, the moved
    directory is passed to it first and, when it returns a reason, put back untouched and
    the write refused (exit 2) with that reason."""
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise MarinerError(f"cannot write the flake to {directory}: it is not a directory",
                           exit_code=2)
    try:
        return _write_flake(rendered, directory, may_replace)
    except OSError as exc:
        where = exc.filename or directory
        raise MarinerError(f"cannot write the flake to {directory}: {where}: "
                           f"{exc.strerror or exc}") from None


def _write_flake(rendered: RenderedFlake, directory: Path,
                 may_replace: Callable[[Path], str | None] | None) -> Path:
    if directory.is_dir() and _same_content(directory, rendered):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Our own names (this pid), so that whatever an interruption leaves half-made, even inside
    # mkdtemp between its mkdir and its return, is found and undone below.
    new_prefix = f".{directory.name}.new-{os.getpid()}-"
    old_prefix = f".{directory.name}.old-{os.getpid()}-"
    try:
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=new_prefix))
        for rel, data in rendered.files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            os.chmod(target, rendered.modes.get(rel, 0o644))
        _keep_lock(directory, staging)
        os.chmod(staging, 0o755)
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=old_prefix))
            os.rmdir(old)
            os.rename(directory, old)
            refused = may_replace(old) if may_replace is not None else None
            if refused is not None:
                os.rename(old, directory)
                raise MarinerError(refused, exit_code=2)
        os.rename(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        _undo_partial_write(directory, new_prefix, old_prefix)
        raise
    return directory


def _undo_partial_write(directory: Path, new_prefix: str, old_prefix: str) -> None:
    """After an interrupted or failed write: the previous flake back in place if it was moved
    aside and not replaced, and no staging or old copy of ours left behind."""
    for old in sorted(directory.parent.glob(old_prefix + "*")):
        if not os.path.lexists(directory):
            try:
                os.rename(old, directory)
                continue
            except OSError:
                pass
        shutil.rmtree(old, ignore_errors=True)
    for staging in directory.parent.glob(new_prefix + "*"):
        shutil.rmtree(staging, ignore_errors=True)


def _keep_lock(directory: Path, staging: Path) -> None:
    """Carry the old directory's flake.lock (a regular file only) into the new one."""
    lock = directory / LOCK_FILE
    if not lock.is_file() or lock.is_symlink():
        return
    try:
        os.link(lock, staging / LOCK_FILE)  # Nix wrote it as root under sudo: keep its owner
    except OSError:  # e.g. fs.protected_hardlinks for a file another user owns
        shutil.copyfile(lock, staging / LOCK_FILE)


def _same_content(directory: Path, rendered: RenderedFlake) -> bool:
    files = rendered.files
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*")
               if p.is_file()} - {LOCK_FILE}
    if present != set(files):
        return False
    return all((directory / rel).read_bytes() == data
               and (directory / rel).stat().st_mode & 0o777 == rendered.modes.get(rel, 0o644)
               for rel, data in files.items())


def read_metadata(directory: Path) -> dict | None:
    """The metadata a rendered flake directory records (hash, cid, config), if any."""
    try:
        return json.loads((Path(directory) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
