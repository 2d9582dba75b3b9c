"""The resolved, typed, immutable model of a project's mariner.toml (all defaults applied)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_USER = "vm"
DEFAULT_GID = 100  # NixOS's `users` group
DEFAULT_HYPERVISOR = "qemu"
# Every hypervisor microvm.nix knows (the schema's enum)...
HYPERVISORS = ("qemu", "cloud-hypervisor", "firecracker", "crosvm", "kvmtool", "stratovirt",
               "alioth", "vfkit")
# ...and the ones whose runner (microvm.nix lib/runners/<name>.nix at the pinned revision)
# takes nix-mariner's shares: the host's /nix/store over 9p and the workspace over virtiofs.
# tests/config/test_hypervisors.py holds the source lines this rests on.
BOOTABLE_HYPERVISORS = ("qemu", "crosvm")
UNBOOTABLE_HYPERVISORS = {
    "cloud-hypervisor": "its runner takes only virtiofs shares, and nix-mariner shares the "
                        "host's /nix/store over 9p",
    "firecracker": "its runner has no shares at all (neither 9p nor virtiofs)",
    "kvmtool": "its runner has no virtiofs shares, and the workspace is a virtiofs share",
    "stratovirt": "its runner has no 9p shares, and nix-mariner shares the host's /nix/store "
                  "over 9p",
    "alioth": "its runner has no 9p shares, and nix-mariner shares the host's /nix/store over 9p",
    "vfkit": "it runs only on macOS, and its runner has no 9p shares",
}
NETWORK_MODES = ("bridge", "user")
BRIDGE_GATEWAY = "10.0.0.1"
USER_NET_GUEST = "10.0.2.15"
USER_NET_GATEWAY = "10.0.2.2"
USER_NET_DNS = "10.0.2.3"


@dataclass(frozen=True)
class Share:
    """A host directory mounted into the guest over virtiofs."""

    source: Path
    target: str
    readonly: bool
    tag: str


@dataclass(frozen=True)
class PortForward:
    """Host 127.0.0.1:host -> guest 127.0.0.1:guest."""

    host: int
    guest: int

    def __str__(self) -> str:
        return str(self.host) if self.host == self.guest else f"{self.host}:{self.guest}"


@dataclass(frozen=True)
class VmSettings:
    name: str
    cpus: int
    memory_mib: int
    hypervisor: str
    user: str
    cid: int | None          # None: allocated at `up`
    uid: int
    gid: int


@dataclass(frozen=True)
class NetworkSettings:
    mode: str                # "bridge" | "user"
    ssh_port: int | None     # user mode: None means allocated at `up`
    interface: str | None = None  # host-side interface id; None: the default for the mode
    dns: str | None = None   # the guest's DNS server; None: bridge: resolved's FallbackDNS,
                             # user: QEMU's 10.0.2.3


@dataclass(frozen=True)
class NixSettings:
    packages: tuple[str, ...]
    modules: tuple[Path, ...]
    mariner: str             # flake reference of nix-mariner


@dataclass(frozen=True)
class StorageSettings:
    persist_mib: int
    nix_store_mib: int
    docker_mib: int


@dataclass(frozen=True)
class DotfilesSettings:
    files: tuple[Path, ...]
    allow: tuple[Path, ...]
    repository: str | None
    install: str | None
    target: str
    timeout: int = 600        # seconds for the repository's clone, and for its install


@dataclass(frozen=True)
class HooksSettings:
    post_create: str | None
    post_start: str | None


@dataclass(frozen=True)
class SshSettings:
    identity: Path | None    # None: mariner's generated key in MARINER_HOME
    forward_agent: bool


@dataclass(frozen=True)
class ProjectConfig:
    """Everything mariner knows about one project's VM, resolved."""

    project_dir: Path
    config_file: Path
    user_config_file: Path | None
    vm: VmSettings
    network: NetworkSettings
    workspace_mount: str
    shares: tuple[Share, ...]
    nix: NixSettings
    storage: StorageSettings
    docker_enable: bool
    env: tuple[tuple[str, str], ...]
    dotfiles: DotfilesSettings
    hooks: HooksSettings
    ports: tuple[PortForward, ...]
    ssh: SshSettings
    # Keys neither file sets, resolved to mariner's default (see drift.LEGACY_DEFAULTS).
    defaulted: tuple[str, ...] = ()
    backend: str = "microvm"   # the host backend that runs the VM: "microvm" | "runner"

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def guest_path(self, host_path: Path) -> str:
        """Map a host path inside the project to its guest path; else the workspace mount."""
        try:
            rel = Path(host_path).absolute().relative_to(self.project_dir)
        except ValueError:
            return self.workspace_mount
        if str(rel) == ".":
            return self.workspace_mount
        return self.workspace_mount.rstrip("/") + "/" + rel.as_posix()

    def to_json(self) -> dict:
        """The resolved config as plain JSON data (validate --json, drift detection)."""

        def plain(value):
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        data = plain(asdict(self))
        # the host's, not the project's: it changes what is rendered, never the config itself
        data.pop("backend")
        data["env"] = dict(self.env)
        data["ports"] = [{"host": p.host, "guest": p.guest} for p in self.ports]
        return data
