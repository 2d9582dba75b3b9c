"""`mariner doctor`: can this host run mariner's VMs, and what can a VM reach on it?

Each check reports ok / warn / fail with a detail and a fix. A required check that fails makes
doctor exit 1; advisory checks (what the guest can reach on the host) only warn. No check may
crash: on a machine without any of the host setup, doctor reports, it does not raise.
"""

from __future__ import annotations

import fcntl
import getpass
import grp
import ipaddress
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import paths
from .errors import HostError

OK, WARN, FAIL = "ok", "warn", "fail"
BRIDGE = "br-microvm"
BRIDGE_ADDRESS = "10.0.0.1"
BRIDGE_PREFIX = 24
KVM_GET_API_VERSION = 0xAE00
SYS_CLASS_NET = Path("/sys/class/net")

HOST_MODULE_FIX = ("import the microvm.nix host module in the host's NixOS configuration "
                   "(nix-mariner's `nixosModules.host` includes it) and `nixos-rebuild switch`")
BRIDGE_FIX = (f"set `mariner.host.network.enable = true;` (nix-mariner's host module), or "
              f"declare the bridge as nix-mariner's host setup shows: a systemd-networkd netdev "
              f"`{BRIDGE}` (Kind = bridge) with Address {BRIDGE_ADDRESS}/{BRIDGE_PREFIX}; or use "
              f'`[network] mode = "user"`, which needs no host network')
FIREWALL_FIX = (f'remove "{BRIDGE}" from networking.firewall.trustedInterfaces (older '
                f"nix-mariner docs put it there; the pinned host module does not) and allow "
                f"only DNS from the VMs: mariner.host.network.exposeDNS = true; opens just that, "
                f'or by hand networking.firewall.interfaces."{BRIDGE}" = '
                f"{{ allowedUDPPorts = [ 53 ]; allowedTCPPorts = [ 53 ]; }}; (SSH from the host "
                f"into the VMs keeps working: replies to it are established traffic)")
FIREWALL_OFF_FIX = ("networking.firewall.enable = true; (NixOS's default) in the host "
                    "configuration: nix-mariner's host module relies on it and opens only DNS "
                    "on the bridge (with exposeDNS)")
DNS_PORT = 53
LOOPBACK_FIX = ("QEMU's user network has no switch that hides only the host's loopback: "
                "`restrict=on` cuts the guest off from every network (only forwarded ports keep "
                "working) and microvm.nix does not offer it. Stop the services you do not need "
                "while untrusted code runs, make the rest require authentication, or use bridge "
                "mode with a firewall rule that allows only DNS from the bridge")


@dataclass(frozen=True)
class Check:
    """One finding of `mariner doctor`."""

    name: str
    status: str           # "ok" | "warn" | "fail"
    detail: str
    fix: str | None
    required: bool

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix, "required": self.required}


@dataclass(frozen=True)
class DoctorReport:
    checks: list[Check]
    backend: str | None = None

    @property
    def ok(self) -> bool:
        """False when a required check failed."""
        return not any(c.required and c.status == FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict:
        return {"ok": self.ok, "backend": self.backend,
                "checks": [c.to_json() for c in self.checks]}


def _verdict(name: str, required: bool, passed: bool, detail: str, fix: str | None) -> Check:
    """A passed check is ok; otherwise fail when required, warn when advisory."""
    status = OK if passed else (FAIL if required else WARN)
    return Check(name, status, detail, fix, required)


def _run(name: str, args: list[str], timeout: float = 15.0):
    """A host command through the one host-command wrapper; None when the program is not installed."""
    from .host import commands

    try:
        return commands.run(name, args, ok_codes=None, timeout=timeout)
    except HostError as exc:
        if exc.returncode is None and not exc.stderr_tail and "not found on PATH" in str(exc):
            return None
        raise


def _last_line(*texts: str) -> str:
    for text in texts:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


# -- required: can the host run microVMs at all --------------------------------------------

def check_kvm(required: bool = True) -> Check:
    path = Path("/dev/kvm")
    fix = ("enable hardware virtualisation (VT-x/AMD-V) in the firmware and load kvm-intel or "
           "kvm-amd; inside a VM, enable nested virtualisation")
    try:
        st = path.stat()
    except FileNotFoundError:
        return _verdict("kvm", required, False, "/dev/kvm does not exist", fix)
    if not stat.S_ISCHR(st.st_mode):
        return _verdict("kvm", required, False, "/dev/kvm is not a character device", fix)
    try:
        return _kvm_answers(path, required, fix, "/dev/kvm opens")
    except PermissionError:
        group = _group_name(st.st_gid)
        if group == "kvm" and st.st_mode & 0o060 == 0o060:
            return _verdict("kvm", required, True,
                            "/dev/kvm is read-write for the kvm group, which the microvm@ "
                            f"units run as ({getpass.getuser()} itself cannot open it)", None)
        return _verdict("kvm", required, False,
                        f"/dev/kvm is not usable: mode {stat.filemode(st.st_mode)}, group "
                        f"{group}", "give the kvm group read-write access to /dev/kvm")


def _kvm_answers(path: Path, required: bool, fix: str, opens: str) -> Check:
    """Open `path` read-write and ask KVM its API version: "`opens` (KVM API version N)" when
    it answers, else why not, with `fix`. PermissionError (this user may not open it) is the
    caller's to explain: each backend gets at /dev/kvm its own way."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise
    except OSError as exc:
        return _verdict("kvm", required, False, f"cannot open /dev/kvm: {exc.strerror}", fix)
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return _verdict("kvm", required, False, f"/dev/kvm does not answer: {exc.strerror}", fix)
    finally:
        os.close(fd)
    return _verdict("kvm", required, True, f"{opens} (KVM API version {version})", None)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


OS_RELEASE = Path("/etc/os-release")


def check_host_os(required: bool = True, os_release: Path = OS_RELEASE) -> Check:
    """NixOS or not: the microvm.nix host module exists only in a NixOS configuration."""
    fields: dict[str, str] = {}
    try:
        for line in os_release.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip().strip('"\'')
    except OSError as exc:
        return _verdict("host-os", required, False, f"cannot read {os_release}: {exc.strerror}",
                        None)
    name = fields.get("PRETTY_NAME") or fields.get("NAME") or "an unknown Linux"
    if fields.get("ID") == "nixos":
        return _verdict("host-os", required, True, f"{name}", None)
    return _verdict("host-os", required, False,
                    f"this host runs {name}, not NixOS: the microvm backend needs a NixOS host "
                    f"with the microvm.nix host module",
                    "run mariner on a NixOS host whose configuration imports the microvm.nix "
                    "host module")


def check_systemd(required: bool = True) -> Check:
    """A running systemd that knows the microvm@ unit (each VM runs as microvm@NAME)."""
    if shutil.which("systemctl") is None:
        return _verdict("systemd", required, False, "this host has no systemd (no `systemctl` "
                        "on PATH)", "the microvm backend needs a host booted with systemd")
    from .host.microvm import MicrovmHost

    result = _run("systemctl", ["show", "--property=LoadState", MicrovmHost._PROBE_UNIT])
    if result is None or result.returncode != 0:
        why = _last_line(result.stderr, result.stdout) if result is not None else "no systemctl"
        return _verdict("systemd", required, False, f"systemd is not running on this host "
                        f"({why})", "the microvm backend needs a host booted with systemd "
                        "(in a container, systemd is usually not PID 1)")
    if "LoadState=loaded" not in result.stdout:
        return _verdict("systemd", required, False, "systemd runs, but it has no microvm@ unit",
                        HOST_MODULE_FIX)
    return _verdict("systemd", required, True, "systemd runs and has the microvm@ unit", None)


def check_mariner_home(required: bool = True) -> Check:
    """MARINER_HOME (registry, key, known_hosts, flakes): an absolute directory mariner can
    write, or one it can create."""
    from .errors import MarinerError

    try:
        home = paths.mariner_home()
    except MarinerError as exc:
        return _verdict("mariner-home", required, False, exc.message,
                        "set MARINER_HOME to an absolute path, or unset it")
    return _writable_dir("mariner-home", home, required,
                         "point MARINER_HOME (or XDG_STATE_HOME) at a directory you can write, "
                         "or unset it")


def check_runtime_dir(required: bool = True) -> Check:
    """Where the agents' sockets live: $XDG_RUNTIME_DIR/mariner or /tmp/mariner-<uid>."""
    return _writable_dir("runtime-dir", paths.runtime_dir(), required,
                         "point XDG_RUNTIME_DIR at your runtime directory (it must be absolute), "
                         "or remove what is in the way")


def _writable_dir(name: str, directory: Path, required: bool, fix: str) -> Check:
    if directory.is_symlink() and not directory.exists():
        return _verdict(name, required, False, f"{directory} is a dangling symlink", fix)
    if directory.exists():
        if not directory.is_dir():
            return _verdict(name, required, False, f"{directory} is not a directory", fix)
        if not os.access(directory, os.W_OK | os.X_OK):
            return _verdict(name, required, False, f"{directory} is not writable", fix)
        return _verdict(name, required, True, f"{directory}", None)
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return _verdict(name, required, False, f"{directory} cannot be created ({parent} is "
                        f"{'not a directory' if not parent.is_dir() else 'not writable'})", fix)
    return _verdict(name, required, True, f"{directory} (created when first needed)", None)


def mariner_checks() -> list[Check]:
    """The checks of mariner's own directories, whatever the backend."""
    return [_guarded("mariner-home", True, check_mariner_home),
            _guarded("runtime-dir", True, check_runtime_dir)]


def check_microvm(required: bool = True) -> Check:
    found = shutil.which("microvm")
    if found:
        return _verdict("microvm", required, True, f"microvm is {found}", None)
    return _verdict("microvm", required, False, "microvm is not on PATH", HOST_MODULE_FIX)


def _nix_features(result) -> set[str] | None:
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "experimental-features":
            return set(value.split())
    return None


def check_nix(required: bool = True) -> Check:
    fix = ('enable them in the host configuration: nix.settings.experimental-features = '
           '[ "nix-command" "flakes" ];')
    version = _run("nix", ["--version"])
    if version is None:
        return _verdict("nix", required, False, "nix is not on PATH",
                        "install Nix (NixOS has it) with the nix-command and flakes features")
    name = _last_line(version.stdout) or "nix"
    result = _run("nix", ["config", "show"])
    if result is not None and "not a recognised command" in result.stderr:
        result = _run("nix", ["show-config"])  # Nix before 2.19
    features = _nix_features(result) if result is not None else None
    if features is None:
        why = _last_line(result.stderr) if result is not None else "no output"
        if "nix-command" in why and "disabled" in why:
            return _verdict("nix", required, False, f"{name} without the experimental feature "
                            f"nix-command (so flakes cannot be checked either)", fix)
        return _verdict("nix", required, False, f"{name}: cannot read its configuration ({why})",
                        fix)
    missing = [f for f in ("nix-command", "flakes") if f not in features]
    if missing:
        return _verdict("nix", required, False,
                        f"{name} without the experimental features {', '.join(missing)}", fix)
    return _verdict("nix", required, True, f"{name} with nix-command and flakes", None)


VHOST_VSOCK_MODULE = Path("/sys/module/vhost_vsock")
VHOST_VSOCK_DEVICE = Path("/dev/vhost-vsock")
PROC_MODULES = Path("/proc/modules")


def check_vhost_vsock(required: bool = True) -> Check:
    """nix-mariner gives every VM a vsock cid (also in user mode): QEMU opens /dev/vhost-vsock,
    which the vhost_vsock module provides (nix-mariner's host module loads it at boot)."""
    fix = ('mariner.nixosModules.host loads it (boot.kernelModules = [ "vhost_vsock" ]); '
           '`modprobe vhost_vsock` loads it now')
    loaded = VHOST_VSOCK_MODULE.exists()
    if not loaded:
        try:
            loaded = any(line.split()[:1] == ["vhost_vsock"]
                         for line in PROC_MODULES.read_text().splitlines())
        except OSError:
            pass
    try:
        device = stat.S_ISCHR(VHOST_VSOCK_DEVICE.stat().st_mode)
    except OSError:
        device = False
    if device:
        how = "the vhost_vsock module is loaded" if loaded else "vhost_vsock is built in"
        return _verdict("vhost-vsock", required, True, f"{how} and {VHOST_VSOCK_DEVICE} exists",
                        None)
    if loaded:
        return _verdict("vhost-vsock", required, False, "the vhost_vsock module is loaded, but "
                        "/dev/vhost-vsock is missing or not a character device",
                        "check udev, or reload the module: `modprobe -r vhost_vsock && "
                        "modprobe vhost_vsock`")
    return _verdict("vhost-vsock", required, False, "the vhost_vsock kernel module is not "
                    "loaded and there is no /dev/vhost-vsock (every VM's vsock cid needs them)",
                    fix)


def _bridge_addresses() -> tuple[list[str] | None, str]:
    """The bridge's IPv4 addresses as "a.b.c.d/n" (None if unknown) and why not."""
    result = _run("ip", ["-j", "addr", "show", "dev", BRIDGE], timeout=5)
    if result is None:
        return None, "iproute2's `ip` is not installed"
    if result.returncode != 0:
        return None, _last_line(result.stderr) or f"ip exited with {result.returncode}"
    try:
        links = json.loads(result.stdout or "[]")
    except ValueError:
        return None, "`ip -j` printed no JSON"
    return [f"{a.get('local')}/{a.get('prefixlen')}" for link in links
            for a in link.get("addr_info", []) if a.get("family") == "inet"], ""


def bridge_exists() -> bool:
    return (SYS_CLASS_NET / BRIDGE).exists()


def check_bridge(required: bool = True) -> Check:
    if not bridge_exists():
        return _verdict("bridge", required, False, f"there is no {BRIDGE} interface", BRIDGE_FIX)
    if not (SYS_CLASS_NET / BRIDGE / "bridge").is_dir():
        return _verdict("bridge", required, False, f"{BRIDGE} exists but is not a bridge",
                        BRIDGE_FIX)
    addresses, why = _bridge_addresses()
    if addresses is None:
        return _verdict("bridge", required, False, f"{BRIDGE} exists, but its addresses cannot "
                        f"be read: {why}", BRIDGE_FIX)
    wanted = f"{BRIDGE_ADDRESS}/{BRIDGE_PREFIX}"
    if wanted in addresses:
        return _verdict("bridge", required, True, f"{BRIDGE} has {wanted}", None)
    return _verdict("bridge", required, False,
                    f"{BRIDGE} has {', '.join(addresses) or 'no IPv4 address'}, not {wanted} "
                    f"(the guests use 10.0.0.1 as their gateway)", BRIDGE_FIX)


def check_networkd(required: bool = True) -> Check:
    fix = "systemd.network.enable = true; in the host configuration (microvm.nix needs it)"
    result = _run("systemctl", ["is-active", "systemd-networkd.service"], timeout=10)
    if result is None:
        return _verdict("systemd-networkd", required, False, "systemctl is not on PATH", fix)
    state = _last_line(result.stdout)
    if result.returncode == 0 and state == "active":
        return _verdict("systemd-networkd", required, True, "systemd-networkd is active", None)
    why = _last_line(result.stderr)
    detail = (f"systemd-networkd is {state}" if state else "systemd cannot tell whether "
              "systemd-networkd runs") + (f" ({why})" if why else "")
    return _verdict("systemd-networkd", required, False, detail, fix)


def check_sudo(required: bool = True) -> Check:
    from .host import commands

    if os.geteuid() == 0:
        return _verdict("sudo", required, True, "running as root: no sudo needed", None)
    try:
        prefix = commands.sudo_prefix()
    except HostError as exc:
        return _verdict("sudo", required, False, str(exc), "fix MARINER_SUDO")
    if not prefix:
        return Check("sudo", WARN, "MARINER_SUDO is empty: microvm and systemctl run as "
                     f"{getpass.getuser()}, which works only if that account may manage the "
                     "VMs (polkit, group rights)", "unset MARINER_SUDO to use `sudo -n`",
                     required)
    fix = (f"allow {getpass.getuser()} to run microvm, systemctl and rm without a password "
           "(security.sudo.extraRules with NOPASSWD), run as root, or set MARINER_SUDO to "
           "another prefix")
    shown = " ".join(prefix)
    if shutil.which(prefix[0]) is None:
        return _verdict("sudo", required, False, f"{prefix[0]} is not installed", fix)
    import subprocess

    try:
        proc = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=15,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _verdict("sudo", required, False, f"`{shown} true` did not run: {exc}", fix)
    if proc.returncode == 0:
        return _verdict("sudo", required, True, f"`{shown} true` works without a prompt", None)
    return _verdict("sudo", required, False,
                    f"`{shown} true` failed: {_last_line(proc.stderr, proc.stdout)} (a rule "
                    f"that allows only microvm and systemctl is not visible to this check)", fix)


def check_state_dir(required: bool = True) -> Check:
    directory = paths.microvms_dir()
    if directory.is_dir():
        return _verdict("state-dir", required, True, f"{directory} exists", None)
    return _verdict("state-dir", required, False, f"{directory} does not exist",
                    "the microvm.nix host module creates it on activation (microvm.stateDir); "
                    "or point MARINER_MICROVMS_DIR at the state directory")


# -- advisory: what a guest can reach on the host ------------------------------------------

def _firewall_rules() -> tuple[str | None, str]:
    """The ruleset text (nft, else iptables) or None, and where it came from / why not. ""
    when the tools answered but list no rules at all (no firewall)."""
    reasons, empty = [], []
    for name, args in (("nft", ["list", "ruleset"]), ("iptables", ["-S"])):
        try:
            result = _run(name, args, timeout=10)
        except HostError as exc:
            reasons.append(str(exc))
            continue
        if result is None:
            reasons.append(f"{name} is not installed")
        elif result.returncode != 0:
            reasons.append(f"`{name} {' '.join(args)}`: {_last_line(result.stderr) or 'failed'}")
        elif result.stdout.strip():
            return result.stdout, f"{name} {' '.join(args)}"
        else:
            empty.append(f"`{name} {' '.join(args)}`")
    if empty:
        return "", " and ".join(empty)
    return None, "; ".join(reasons)


def firewall_filters_input(rules: str) -> bool:
    """Whether the rules filter what arrives for the host at all: an nft chain on the input
    hook that drops or rejects, or iptables' INPUT with a DROP policy or a jump to a chain
    (NixOS's `-A INPUT -j nixos-fw`)."""
    if "hook input" in rules:
        return re.search(r"\b(policy drop|drop|reject)\b", rules) is not None
    if re.search(r"^-P INPUT (?:DROP|REJECT)\b", rules, re.M):
        return True
    return re.search(r"^-A INPUT\b.*-j (?!ACCEPT\b)\S+", rules, re.M) is not None


def blanket_bridge_accepts(rules: str) -> list[str]:
    """Rules that accept every packet arriving on the bridge, not just some ports or replies
    (nft: `iifname "br-microvm" accept`; iptables: `-i br-microvm -j ACCEPT|nixos-fw-accept`)."""
    found = []
    for line in rules.splitlines():
        text = line.strip()
        if BRIDGE not in text or re.search(r"dport|sport|ct state|--state", text):
            continue
        nft = re.search(r"\biif(?:name)?\b", text) and re.search(r"\baccept\b", text)
        ipt = re.search(rf"-i {re.escape(BRIDGE)}\b", text) and re.search(
            r"-j (?:ACCEPT|nixos-fw-accept)\b", text)
        if nft or ipt:
            found.append(text)
    return found


def check_bridge_firewall() -> Check:
    name = "bridge-firewall"
    if not bridge_exists():
        return Check(name, OK, f"no {BRIDGE} bridge, so no VM sits on it yet. When you set it "
                     f"up, keep the firewall on and do not trust {BRIDGE} (older nix-mariner "
                     f"docs did, which lets every VM reach every service on this host; the "
                     f"pinned host module opens only DNS, with exposeDNS)", FIREWALL_FIX, False)
    rules, source = _firewall_rules()
    if rules is None:
        return Check(name, WARN, f"cannot read the firewall rules ({source}). Older "
                     f"nix-mariner docs trusted {BRIDGE}: if your host does, or has no firewall, "
                     f"every VM reaches every service on this host", FIREWALL_FIX, False)
    accepts = blanket_bridge_accepts(rules)
    if accepts:
        return Check(name, WARN, f"the firewall accepts everything from {BRIDGE} "
                     f"({accepts[0]}): every VM reaches every service on this host",
                     FIREWALL_FIX, False)
    if not rules or not firewall_filters_input(rules):
        what = f"{source} list no rules" if not rules else f"no rule in `{source}` filters input"
        return Check(name, WARN, f"no firewall is active ({what}): every VM on {BRIDGE} "
                     f"reaches every service on this host", FIREWALL_OFF_FIX, False)
    return Check(name, OK, f"no rule in `{source}` accepts all traffic from {BRIDGE}",
                 FIREWALL_FIX, False)


def _decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6 prints four 32-bit words, each in host (little-endian) byte order
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening_tcp(proc_files: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket, from /proc/net/tcp{,6}."""
    found = set()
    for file in proc_files:
        try:
            lines = Path(file).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A: TCP_LISTEN
                continue
            address, _, port = fields[1].partition(":")
            found.add((str(_decode_address(address)), int(port, 16)))
    return sorted(found, key=lambda item: (item[1], item[0]))


def loopback_reachable(listeners: list[tuple[str, int]]) -> list[str]:
    """The listeners a user-mode guest reaches through 10.0.2.2 (the host's 127.0.0.1)."""
    out = []
    for address, port in listeners:
        ip = ipaddress.ip_address(address)
        mapped = getattr(ip, "ipv4_mapped", None)
        if ip.is_unspecified:
            out.append(f"*:{port}")
        elif ip.is_loopback or (mapped is not None and mapped.is_loopback):
            out.append(f"{address}:{port}" if ip.version == 4 else f"[{address}]:{port}")
    return list(dict.fromkeys(out))


def check_user_net_loopback() -> Check:
    name = "user-net-loopback"
    if not any(os.access(f, os.R_OK) for f in ("/proc/net/tcp", "/proc/net/tcp6")):
        return Check(name, WARN, "cannot read /proc/net/tcp: in user mode a guest reaches the "
                     "host's loopback services through 10.0.2.2", LOOPBACK_FIX, False)
    reachable = loopback_reachable(listening_tcp())
    if not reachable:
        return Check(name, OK, "no TCP service listens on the host's loopback or on all "
                     "addresses, so 10.0.2.2 leads nowhere", LOOPBACK_FIX, False)
    shown = ", ".join(reachable[:15]) + (f" and {len(reachable) - 15} more" if len(reachable) > 15 else "")
    return Check(name, WARN, f"in user mode a guest reaches these host services through "
                 f"10.0.2.2: {shown} (* = all addresses)", LOOPBACK_FIX, False)


def dns_on_bridge(listeners: list[tuple[str, int]]) -> bool:
    """Whether a host DNS server listens where the guests' gateway is (10.0.0.1:53, or every
    address): what mariner.host.network.exposeDNS sets up (resolved's DNSStubListenerExtra)."""
    return any(port == DNS_PORT and address in (BRIDGE_ADDRESS, "0.0.0.0", "::")
               for address, port in listeners)


def check_bridge_dns(network_mode: str | None = None, dns: str | None = None) -> Check:
    """Advice on `[network] dns` for a bridge-mode project: nix-mariner leaves the guest's DNS
    unset (resolved's FallbackDNS, on the internet) unless the project names one."""
    name = "bridge-dns"
    exposed = bridge_exists() and dns_on_bridge(listening_tcp())
    fix = (f'add `dns = "{BRIDGE_ADDRESS}"` under [network] in mariner.toml')
    if network_mode != "bridge":
        return Check(name, OK, "not a bridge-mode project: its guest uses QEMU's DNS"
                     if network_mode == "user" else "no project here to check", None, False)
    if exposed and dns is None:
        return Check(name, WARN, f"the host answers DNS on {BRIDGE_ADDRESS}:53 "
                     f"(mariner.host.network.exposeDNS), but this project's guest is not told "
                     f"and uses systemd-resolved's FallbackDNS servers instead", fix, False)
    if dns == BRIDGE_ADDRESS and not exposed:
        return Check(name, WARN, f"[network] dns = \"{BRIDGE_ADDRESS}\", but nothing on this "
                     f"host listens on {BRIDGE_ADDRESS}:53: the guest cannot resolve names",
                     "set mariner.host.network.exposeDNS = true; in the host configuration "
                     "(it needs systemd-resolved), or remove [network] dns", False)
    where = f"the guest asks {dns}" if dns else "the guest uses systemd-resolved's FallbackDNS"
    return Check(name, OK, f"{where}; the host "
                 f"{'answers' if exposed else 'does not answer'} DNS on {BRIDGE_ADDRESS}",
                 None, False)


# -- putting it together --------------------------------------------------------------------

def _guarded(name: str, required: bool, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:  # a check that breaks is a finding, not a crash of doctor
        return Check(name, FAIL if required else WARN,
                     f"could not run this check: {exc.__class__.__name__}: {exc}", None, required)


def microvm_host_checks(network_mode: str | None = None) -> list[Check]:
    """The checks for a NixOS host with the microvm.nix host module. The bridge is required
    unless the project uses user-mode networking (`network_mode="user"`)."""
    bridge = network_mode != "user"
    plan: list[tuple[str, bool, Callable[[], Check]]] = [
        ("host-os", True, check_host_os),
        ("kvm", True, check_kvm),
        ("microvm", True, check_microvm),
        ("systemd", True, check_systemd),
        ("nix", True, check_nix),
        ("vhost-vsock", True, check_vhost_vsock),
        ("bridge", bridge, lambda: check_bridge(bridge)),
        ("systemd-networkd", bridge, lambda: check_networkd(bridge)),
        ("sudo", True, check_sudo),
        ("state-dir", True, check_state_dir),
        ("bridge-firewall", False, check_bridge_firewall),
        ("user-net-loopback", False, check_user_net_loopback),
    ]
    return [_guarded(name, required, check) for name, required, check in plan]


# -- the runner backend: any Linux with Nix and KVM, as the user ------------------------------

KVM_GROUP_FIX = ("add yourself to the kvm group: `sudo usermod -aG kvm $USER`, then log out and "
                 "in again (Debian, Ubuntu, Fedora, Arch alike; on NixOS: "
                 "users.users.<you>.extraGroups = [ \"kvm\" ];)")
VSOCK_FIX = ("load the module: `sudo modprobe vhost_vsock` (at every boot: `echo vhost_vsock | sudo "
             "tee /etc/modules-load.d/vhost_vsock.conf`; NixOS: boot.kernelModules = "
             "[ \"vhost_vsock\" ];), and let the kvm group use it: a udev rule "
             "KERNEL==\"vhost-vsock\", GROUP=\"kvm\", MODE=\"0660\"")
UIDMAP_FIX = ("install newuidmap/newgidmap (Debian, Ubuntu: `sudo apt install uidmap`; Fedora: "
              "`sudo dnf install shadow-utils`; Arch: `sudo pacman -S shadow`) and give yourself "
              "subordinate ids: `sudo usermod --add-subuids 100000-165535 --add-subgids "
              "100000-165535 $USER`")
APPARMOR_FIX = ("Ubuntu 23.10 and later restrict unprivileged user namespaces through AppArmor, "
                "so virtiofsd's sandbox cannot set itself up. Allow it for virtiofsd only: an "
                "AppArmor profile for the virtiofsd binary with the `userns,` rule (see "
                "/etc/apparmor.d/unprivileged_userns for the form), loaded with `sudo "
                "apparmor_parser -r`; or, for every program, `sudo sysctl -w "
                "kernel.apparmor_restrict_unprivileged_userns=0`. mariner does not fall back to a "
                "weaker sandbox")
MIN_FREE_BYTES = 4 * 1024 ** 3


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def check_kvm_user() -> Check:
    """/dev/kvm opened read-write by this user (the runner backend has no kvm-group service)."""
    path = Path("/dev/kvm")
    fix = ("enable hardware virtualisation (VT-x/AMD-V) in the firmware and load kvm-intel or "
           "kvm-amd (`sudo modprobe kvm_intel` or `kvm_amd`); inside a VM, enable nested "
           "virtualisation")
    if not path.exists():
        return _verdict("kvm", True, False, "/dev/kvm does not exist", fix)
    try:
        return _kvm_answers(path, True, fix, "/dev/kvm opens read-write")
    except PermissionError:
        st = path.stat()
        return _verdict("kvm", True, False, f"{getpass.getuser()} cannot open /dev/kvm "
                        f"read-write (mode {stat.filemode(st.st_mode)}, group "
                        f"{_group_name(st.st_gid)})", KVM_GROUP_FIX)


def check_nix_runner() -> Check:
    """Nix that can build flakes when asked (mariner passes the experimental features)."""
    fix = ("install Nix: https://nixos.org/download (the multi-user installer), or Debian/"
           "Ubuntu `sudo apt install nix-bin`, Fedora `sudo dnf install nix`, Arch `sudo pacman "
           "-S nix`; mariner passes --extra-experimental-features 'nix-command flakes' itself")
    version = _run("nix", ["--version"])
    if version is None:
        return _verdict("nix", True, False, "nix is not on PATH", fix)
    name = _last_line(version.stdout) or "nix"
    result = _run("nix", ["--extra-experimental-features", "nix-command flakes", "config",
                          "show"])
    if result is not None and "not a recognised command" in result.stderr:
        result = _run("nix", ["--extra-experimental-features", "nix-command flakes",
                              "show-config"])
    features = _nix_features(result) if result is not None and result.returncode == 0 else None
    if features is None or "flakes" not in features:
        why = _last_line(result.stderr) if result is not None else "no output"
        return _verdict("nix", True, False, f"{name} cannot enable flakes ({why})",
                        "install Nix 2.4 or later; " + fix)
    return _verdict("nix", True, True, f"{name}; flakes enabled per command", None)


def check_vhost_vsock_user() -> Check:
    """Advisory: without /dev/vhost-vsock the VM has no vsock device (SSH uses the forwarded
    port); mariner renders microvm.vsock.cid = null then."""
    path = "/dev/vhost-vsock"
    if os.access(path, os.R_OK | os.W_OK):
        return Check("vhost-vsock", OK, f"{path} is usable: VMs get a vsock device", None, False)
    why = "does not exist" if not os.path.exists(path) else f"is not read-write for {getpass.getuser()}"
    return Check("vhost-vsock", WARN, f"{path} {why}: VMs run without vsock (SSH goes over the "
                 f"forwarded loopback port)", VSOCK_FIX, False)


def check_userns(sysctl: str = "/proc/sys") -> Check:
    """User namespaces for virtiofsd's sandbox, and what blocks them (`sysctl`: where the
    kernel's settings are read, /proc/sys)."""
    name = "user-namespaces"
    if _read_int(f"{sysctl}/kernel/apparmor_restrict_unprivileged_userns") == 1:
        return _verdict(name, True, False, "kernel.apparmor_restrict_unprivileged_userns = 1: "
                        "AppArmor denies unprivileged user namespaces", APPARMOR_FIX)
    if _read_int(f"{sysctl}/kernel/unprivileged_userns_clone") == 0:
        return _verdict(name, True, False, "kernel.unprivileged_userns_clone = 0: unprivileged "
                        "user namespaces are off",
                        "`sudo sysctl -w kernel.unprivileged_userns_clone=1` (persist it in "
                        "/etc/sysctl.d/)")
    limit = _read_int(f"{sysctl}/user/max_user_namespaces")
    if limit == 0:
        return _verdict(name, True, False, "user.max_user_namespaces = 0",
                        "`sudo sysctl -w user.max_user_namespaces=15000` (persist it in "
                        "/etc/sysctl.d/)")
    return _verdict(name, True, True, "unprivileged user namespaces are allowed", None)


def _subid_entry(file: str, user: str, uid: int) -> str | None:
    try:
        for line in Path(file).read_text().splitlines():
            owner = line.split(":", 1)[0]
            if owner in (user, str(uid)):
                return line.strip()
    except OSError:
        return None
    return None


def check_uidmap(subid_files: tuple[str, str] = ("/etc/subuid", "/etc/subgid")) -> Check:
    """newuidmap/newgidmap and subordinate ids, which virtiofsd's namespace sandbox maps."""
    name = "newuidmap"
    if os.geteuid() == 0:
        return _verdict(name, True, True, "running as root: virtiofsd maps ids itself", None)
    missing = [p for p in ("newuidmap", "newgidmap") if shutil.which(p) is None]
    if missing:
        return _verdict(name, True, False, f"{' and '.join(missing)} not on PATH", UIDMAP_FIX)
    user = getpass.getuser()
    for file in subid_files:
        if _subid_entry(file, user, os.getuid()) is None:
            return _verdict(name, True, False, f"{file} has no range for {user}", UIDMAP_FIX)
    return _verdict(name, True, True, f"newuidmap, newgidmap and subordinate ids for {user}",
                    None)


def check_runner_state(root: Path) -> Check:
    """The VMs' state directory: creatable by the user, with room for volumes."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return _verdict("state-dir", True, False, f"{existing} is not writable by "
                        f"{getpass.getuser()}, so {root} cannot be created",
                        "set XDG_DATA_HOME to a directory of yours")
    usage = shutil.disk_usage(existing)
    free = usage.free / 1024 ** 3
    detail = f"{root} ({free:.1f} GiB free on its file system)"
    if usage.free < MIN_FREE_BYTES:
        return _verdict("state-dir", True, False, f"{detail}: the volumes (persist.img, "
                        f"nix-store.img) grow into it", "free some space, or set XDG_DATA_HOME "
                        "to a larger file system")
    return _verdict("state-dir", True, True, detail, None)


def runner_host_checks(root: Path) -> list[Check]:
    """The checks for the runner backend: VMs run as this user with Nix and KVM, no root."""
    plan: list[tuple[str, bool, Callable[[], Check]]] = [
        ("kvm", True, check_kvm_user),
        ("nix", True, check_nix_runner),
        ("vhost-vsock", False, check_vhost_vsock_user),
        ("user-namespaces", True, check_userns),
        ("newuidmap", True, check_uidmap),
        ("state-dir", True, lambda: check_runner_state(root)),
        ("user-net-loopback", False, check_user_net_loopback),
    ]
    return [_guarded(name, required, check) for name, required, check in plan]


def check_backend() -> tuple[Check, object]:
    """Which backend serves this user (MARINER_BACKEND, [host] backend, auto) and the backend."""
    from .host import choice

    try:
        chosen = choice.choose(choice.user_setting(), strict=True)
        return Check("backend", OK, f"{chosen.name} ({chosen.reason})", None, True), \
            choice.make(chosen.name)
    except HostError as exc:  # auto found neither: the runner's checks say what to install
        chosen = choice.choose(choice.user_setting(), strict=False)
        return Check("backend", FAIL, str(exc), "fix what the checks below report, or set "
                     "MARINER_BACKEND", True), choice.make(chosen.name)


def run_doctor(backend=None, network_mode: str | None = None,
               dns: str | None = None) -> DoctorReport:
    """Say which backend serves this user, run its checks, then the project's (`network_mode`
    and `dns` of its [network], when there is one)."""
    checks = []
    if backend is None:
        found, backend = check_backend()
        checks.append(found)
    checks += backend.doctor_checks(network_mode)
    if backend.name == "microvm":  # the runner backend has no bridge
        checks.append(_guarded("bridge-dns", False, lambda: check_bridge_dns(network_mode, dns)))
    return DoctorReport(checks + mariner_checks(), backend=backend.name)
