"""The e2e host: the fake host of tests/fakehost, except that `microvm@<name>` boots a real VM.

tests/e2e/bin/{microvm,systemctl,journalctl} run the fake host's executables unchanged (same
strict argv parsing, same state in MARINER_MICROVMS_DIR/<name>/, same "build" that evaluates
the rendered flake's vm.nix with nix-instantiate), after replacing two functions of fakelib:
starting the unit and halting the guest. See fakelib's docstring for the state layout; this
module adds, in MARINER_MICROVMS_DIR/<name>/:

    disk.qcow2      the VM's persistent disk: a qcow2 overlay on the cached base image,
                    made on the first boot, kept across down/up, removed by destroy
    .e2e/config.json   what the guest is told through QEMU's fw_cfg (opt/mariner/config.json)

and per boot a short runtime directory under /tmp (QMP and virtiofs sockets; Unix socket
paths are limited to 108 bytes), recorded in the unit state with the pids.

Everything the VM gets comes from the flake mariner rendered, evaluated as a real build would
evaluate it: through nix-mariner's and microvm.nix's modules at the pinned revisions
(tests/support/upstream.py; the "build" stores the result as share/microvm/upstream.json in
the runner). Read from it: the guest user's name, uid, group and gid, its authorized keys,
the SSH forward (the microvm.forwardPorts entry to guest port 22), every microvm.shares entry,
networking.hostName, microvm.vcpu/mem and the interface's MAC. nix-mariner's 9p share of the
host's /nix/store (tag "ro-store") is left out: the Debian guest has its own root file system
and no Nix (SKIPPED_SHARES).

The unit's main process is a launcher (`realhost.py boot <name>`, started by `systemctl
start`): it starts one virtiofsd per share, then QEMU, and copies QEMU's serial console into
the unit's journal line by line (so `mariner logs` shows the boot). Unit states: activating
until QEMU runs, then active; failed when QEMU dies on its own with an error, inactive when
the guest powers itself off. Stopping is what microvm-shutdown does: QMP `qmp_capabilities`,
`system_powerdown`, then wait for QEMU to exit (repeated every POWERDOWN_REPEAT seconds, for a
guest still booting; QEMU is killed only after POWERDOWN_TIMEOUT).

Environment (inherited from the test through mariner):
    MARINER_E2E_IMAGE   the image directory (tests/e2e/image.py): rootfs.img, vmlinuz, initrd.img
    MARINER_E2E_ACCEL   tcg (default) or kvm; scripts/e2e sets kvm only after a probe boot
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

E2E = Path(__file__).resolve().parent
FAKEHOST = E2E.parent / "fakehost"
sys.path.insert(0, str(FAKEHOST))
sys.path.insert(0, str(E2E.parent))

import fakelib  # noqa: E402
from fakelib import Refused  # noqa: E402
from support import upstream  # noqa: E402

QEMU = "qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
DISK = "disk.qcow2"
CONFIG_DIR = ".e2e"
FW_CFG_NAME = "opt/mariner/config.json"
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1 net.ifnames=0"
POWERDOWN_TIMEOUT = 90.0  # a guest under TCG powers off in a few seconds; this is generous
POWERDOWN_REPEAT = 5.0  # seconds between presses of the power button
ACCELERATORS = {"tcg": "tcg,thread=multi", "kvm": "kvm"}
DEFAULT_GROUP, DEFAULT_GID = "users", 100  # NixOS's `users` group (Debian's has gid 100 too)
UPSTREAM_JSON = "upstream.json"
# Shares of the real VM that this Debian guest does without, by tag, and why.
SKIPPED_SHARES = {"ro-store": "nix-mariner's 9p share of the host's /nix/store: the Debian "
                              "guest has its own root file system and no Nix"}


# -- what the VM gets, from the rendered flake ----------------------------------------------

@dataclass
class Share:
    tag: str
    source: str
    mount_point: str
    read_only: bool


@dataclass
class GuestSpec:
    """One VM as its evaluated vm.nix describes it."""

    hostname: str
    user: str
    uid: int
    group: str
    gid: int
    authorized_key: str
    ssh_port: int
    cpus: int
    memory_mib: int
    mac: str | None
    shares: list[Share] = field(default_factory=list)

    def guest_config(self) -> dict:
        """The JSON the guest's mariner-guest-config reads from fw_cfg."""
        return {"hostname": self.hostname,
                "user": {"name": self.user, "uid": self.uid, "group": self.group,
                         "gid": self.gid, "authorized_key": self.authorized_key},
                "shares": [{"tag": s.tag, "mountPoint": s.mount_point, "readOnly": s.read_only}
                           for s in self.shares]}


def guest_spec(name: str, e: dict) -> GuestSpec:
    """Read the VM's settings from its evaluation through the real modules; refuse what a
    real VM could not do."""
    user = e["user"]
    group = user["group"]
    gid = e["groups"].get(group)
    if gid is None:
        if group != DEFAULT_GROUP:
            raise Refused(f"e2e host: users.users.{user['name']}.group = {group!r} but the "
                          f"flake defines no users.groups.{group}.gid")
        gid = DEFAULT_GID
    if not isinstance(user["uid"], int) or not isinstance(gid, int):
        raise Refused(f"e2e host: the guest user's uid/gid are not integers: "
                      f"{user['uid']!r}/{gid!r}")
    if not user["keys"]:
        raise Refused(f"e2e host: users.users.{user['name']} has no authorized key")
    forwards = [f for f in e["forwardPorts"] if f["guest"]["port"] == 22]
    if len(forwards) != 1:
        raise Refused(f"e2e host: only user networking is emulated: the flake forwards "
                      f"{forwards or 'nothing'} to guest port 22")
    address, port = forwards[0]["host"]["address"], forwards[0]["host"]["port"]
    if address != "127.0.0.1" or not isinstance(port, int):
        raise Refused(f"e2e host: the SSH forward binds {address!r}:{port!r}; mariner must "
                      f"bind 127.0.0.1 and a port")
    shares = []
    for entry in e["shares"]:
        if entry["tag"] in SKIPPED_SHARES and entry["proto"] == "9p":
            continue
        if entry["proto"] != "virtiofs":
            raise Refused(f"e2e host: share {entry['tag']!r} uses proto {entry['proto']!r}; "
                          f"only virtiofs is emulated")
        if not Path(entry["source"]).is_dir():
            raise Refused(f"e2e host: share {entry['tag']!r}: source {entry['source']} "
                          f"is not a directory")
        shares.append(Share(entry["tag"], entry["source"], entry["mountPoint"],
                            bool(entry["readOnly"])))
    return GuestSpec(hostname=e["hostName"], user=user["name"], uid=user["uid"], group=group,
                     gid=gid, authorized_key="\n".join(user["keys"]), ssh_port=port,
                     cpus=int(e["vcpu"]), memory_mib=int(e["mem"]),
                     mac=e["interfaces"][0]["mac"] if e["interfaces"] else None, shares=shares)


def build(name: str, flakeref: str, store: Path) -> Path:
    """The fake host's build, plus the flake evaluated through the real modules (once per
    runner): what the VM is configured from."""
    runner = _fake_build(name, flakeref, store)
    target = runner / "share" / "microvm" / UPSTREAM_JSON
    if not target.exists():
        try:
            evaluation = upstream.evaluate_one(fakelib.flake_dir_from_ref(flakeref),
                                               src=upstream.locate_src())
        except (upstream.SourcesMissing, upstream.EvaluationFailed) as exc:
            raise Refused(f"e2e host: {exc}") from None
        fakelib.write_json_atomic(target, evaluation)
    return runner


def evaluated_config(runner: Path) -> dict:
    return json.loads((runner / "share" / "microvm" / UPSTREAM_JSON).read_text())


_fake_build = fakelib.build


# -- the image and the VM's disk -------------------------------------------------------------

def image_dir() -> Path:
    value = os.environ.get("MARINER_E2E_IMAGE")
    if not value:
        raise Refused("e2e host: MARINER_E2E_IMAGE is not set (scripts/e2e builds the guest "
                      "image and sets it)")
    directory = Path(value)
    for name in ("rootfs.img", "vmlinuz", "initrd.img"):
        if not (directory / name).is_file():
            raise Refused(f"e2e host: the guest image {directory} has no {name}")
    return directory


def ensure_disk(directory: Path, image: Path) -> Path:
    """The VM's persistent disk: a qcow2 overlay on the base image, made once."""
    disk = directory / DISK
    if disk.exists():
        return disk
    tmp = directory / f".{DISK}.new"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                    "-b", str(image / "rootfs.img"), str(tmp)],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, disk)
    return disk


def accelerator() -> str:
    accel = os.environ.get("MARINER_E2E_ACCEL") or "tcg"
    if accel not in ACCELERATORS:
        raise Refused(f"e2e host: MARINER_E2E_ACCEL={accel!r}; use tcg or kvm")
    return accel


def qemu_argv(name: str, spec: GuestSpec, image: Path, disk: Path, config: Path,
              runtime: Path, accel: str, *, qmp: str | None = None,
              sockets: list[str] | None = None) -> list[str]:
    """QEMU's command line; `qmp` and `sockets` (one per share) default to files in `runtime`
    (the runner backend's runner uses microvm.nix's paths, relative to its state directory)."""
    qmp = qmp or str(runtime / "qmp.sock")
    sockets = sockets or [str(runtime / f"fs{index}.sock") for index in range(len(spec.shares))]
    cpus = max(1, min(spec.cpus, os.cpu_count() or 1))
    mem = spec.memory_mib
    nic = "virtio-net-pci,netdev=net0,romfile="
    if spec.mac:
        nic += f",mac={spec.mac}"
    argv = [QEMU, "-name", name, "-M", "q35", "-accel", ACCELERATORS[accel],
            "-smp", str(cpus), "-m", f"{mem}M",
            # vhost-user-fs needs guest memory QEMU can share with virtiofsd
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot",
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
            "-append", KERNEL_CMDLINE,
            "-drive", f"file={disk},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
            "-device", nic,
            "-fw_cfg", f"name={FW_CFG_NAME},file={config}",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    for index, share in enumerate(spec.shares):
        argv += ["-chardev", f"socket,id=fs{index},path={sockets[index]}",
                 "-device", f"vhost-user-fs-pci,chardev=fs{index},tag={share.tag}"]
    return argv


def serve_as(name: str) -> tuple[int, int] | None:
    """With MARINER_E2E_VIRTIOFSD=developer: the developer's uid and gid, as the rendered flake's
    virtiofsd.nix drops to them (mariner's virtiofsd-run). None: virtiofsd runs as root.

    Debian's C virtiofsd cannot squash guest ids (it has no --translate-uid and insists on
    root), so as the developer it runs in a user namespace that maps only root to the
    developer: guest root's files become the developer's, but the guest user (another id) can
    create nothing. Hence a knob for the VM that tests this, not the default."""
    if os.environ.get("MARINER_E2E_VIRTIOFSD") != "developer":
        return None
    data = json.loads((fakelib.vm_dir(name) / "booted" / "share" / "microvm" / "guest.json")
                      .read_text())
    module = fakelib.flake_dir_from_ref(data["flakeref"]) / "virtiofsd.nix"
    if not module.is_file():
        raise Refused(f"e2e host: MARINER_E2E_VIRTIOFSD=developer but the flake has no "
                      f"{module.name} (mariner renders it when the developer is not root)")
    match = re.search(r"--reuid=(\d+) --regid=(\d+)", module.read_text())
    if match is None:
        raise Refused(f"e2e host: {module} does not drop to a uid and gid with setpriv")
    return int(match.group(1)), int(match.group(2))


def start_virtiofsd(share: Share, sock: Path, log: Path,
                    as_developer: tuple[int, int] | None = None) -> subprocess.Popen:
    """Debian's C virtiofsd for one share; returns once its socket exists. `as_developer`:
    run it as that uid/gid, root only inside a user namespace (see serve_as)."""
    argv = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={share.source}",
            "-o", "cache=auto"]
    if as_developer is not None:
        uid, gid = as_developer
        # its lock file goes to /run/virtiofsd: a private /run of the developer's
        private_run = sock.with_name(sock.name + ".run")
        private_run.mkdir()
        os.chown(private_run, uid, gid)
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                "unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                'mount --bind "$0" /run && exec "$@"', str(private_run), *argv]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None:
            raise Refused(f"virtiofsd for share {share.tag!r} exited with status "
                          f"{proc.returncode}: {log.read_text(errors='replace')[-500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise Refused(f"virtiofsd for share {share.tag!r} made no socket in 10 s")
        time.sleep(0.02)
    return proc


# -- the unit ------------------------------------------------------------------------------

def start_unit(name: str) -> None:
    """`systemctl start microvm@<name>`: spawn the launcher; the unit is activating."""
    directory = fakelib.vm_dir(name)
    unit = f"microvm@{name}.service"
    if not directory.is_dir():
        raise Refused(f"Failed to start {unit}: Unit {unit} not found.", 5)
    if not (directory / "current" / "bin" / "microvm-run").exists():
        raise Refused(f"e2e host: {unit}: ConditionPathExists={directory}/current/bin/"
                      f"microvm-run failed (systemd would skip the unit and exit 0)")
    with fakelib.unit_lock(directory):
        state = fakelib.read_unit(name)
        if state.get("state") in ("active", "activating"):
            return
        booted = directory / "booted"
        with contextlib.suppress(FileNotFoundError):
            booted.unlink()
        booted.symlink_to(os.readlink(directory / "current"))
        fakelib.journal(name, "systemd", f"Starting {unit} - MicroVM '{name}'...")
        launcher = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "boot", name],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        fakelib.write_unit(name, state="activating", substate="start", result="success",
                           boot_pid=launcher.pid, qemu_pid=None, virtiofsd_pids=[],
                           runtime=None, enter_monotonic_us=0)


def _ours(name: str) -> bool:
    state = fakelib.read_unit(name)
    return state.get("boot_pid") == os.getpid() and state.get("state") in ("activating", "active")


def _cleanup(procs: list[subprocess.Popen], runtime: Path | None) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if runtime is not None:
        shutil.rmtree(runtime, ignore_errors=True)


def boot(name: str) -> int:
    """The unit's main process: virtiofsd per share, QEMU, its console into the journal."""
    directory = fakelib.vm_dir(name)
    ident = f"microvm@{name}"
    children: list[subprocess.Popen] = []
    runtime = None
    try:
        with fakelib.unit_lock(directory):
            if not _ours(name):
                return 0  # stopped before we got here
        spec = guest_spec(name, evaluated_config(directory / "booted"))
        image = image_dir()
        accel = accelerator()
        disk = ensure_disk(directory, image)
        (directory / CONFIG_DIR).mkdir(exist_ok=True)
        config = directory / CONFIG_DIR / "config.json"
        fakelib.write_json_atomic(config, spec.guest_config())
        runtime = Path(tempfile.mkdtemp(prefix=f"mre2e-{name[:20]}-", dir="/tmp"))
        as_developer = serve_as(name)
        if as_developer is not None:
            os.chown(runtime, *as_developer)   # the developer's virtiofsd makes its socket here
        for index, share in enumerate(spec.shares):
            children.append(start_virtiofsd(share, runtime / f"fs{index}.sock",
                                            directory / CONFIG_DIR / f"virtiofsd-{share.tag}.log",
                                            as_developer))
        argv = qemu_argv(name, spec, image, disk, config, runtime, accel)
        fakelib.journal(name, ident, f"e2e host: {' '.join(argv)}")
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    except (Refused, OSError, KeyError, TypeError, ValueError,
            subprocess.CalledProcessError) as exc:
        _cleanup(children, runtime)
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        with fakelib.unit_lock(directory):
            if _ours(name):
                fakelib._fail_boot(name, f"e2e host: the VM failed to start: {detail}")
        return 0
    children.append(qemu)
    with fakelib.unit_lock(directory):
        if not _ours(name):  # stopped while we were starting: nothing was written yet
            qemu.kill()
            _cleanup(children, runtime)
            return 0
        fakelib.journal(name, "systemd", f"Started microvm@{name}.service - MicroVM '{name}'.")
        fakelib.write_unit(name, state="active", substate="running", qemu_pid=qemu.pid,
                           virtiofsd_pids=[p.pid for p in children[:-1]], runtime=str(runtime),
                           accel=accel, **fakelib._now_fields())
    for raw in qemu.stdout:
        fakelib.journal(name, ident, raw.decode(errors="replace").rstrip("\r\n").replace("\r", ""))
    status = qemu.wait()
    _cleanup(children[:-1], runtime)
    _settle(name, status)
    return 0


def _settle(name: str, status: int) -> None:
    """QEMU has exited. If nobody is stopping the unit, record what systemd would."""
    directory = fakelib.vm_dir(name)
    try:
        fd = os.open(directory / fakelib.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return  # destroyed: there is no unit left to record anything for
    try:
        while True:
            if fakelib.read_unit(name).get("state") == "deactivating":
                return  # stop_unit holds the lock and finishes the job
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        if not _ours(name):
            return
        unit = f"microvm@{name}.service"
        with contextlib.suppress(FileNotFoundError):
            (directory / "booted").unlink()
        if status == 0:  # the guest powered itself off
            fakelib.journal(name, "systemd", f"{unit}: Deactivated successfully.")
            fakelib.write_unit(name, state="inactive", substate="dead", result="success",
                               boot_pid=None, qemu_pid=None, enter_monotonic_us=0)
        else:
            fakelib._fail_boot(name, f"qemu-system-x86_64 exited with status {status}")
            fakelib.write_unit(name, qemu_pid=None)
    finally:
        os.close(fd)


def _qmp_powerdown(path: str) -> None:
    """QMP: qmp_capabilities, then system_powerdown (the ACPI power button)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        stream = sock.makefile("rwb")

        def command(name: str) -> None:
            stream.write(json.dumps({"execute": name}).encode() + b"\n")
            stream.flush()
            while True:
                line = stream.readline()
                if not line:
                    raise OSError(f"QMP closed the connection after {name}")
                reply = json.loads(line)
                if "error" in reply:
                    raise OSError(f"QMP {name}: {reply['error']}")
                if "return" in reply:
                    return

        stream.readline()  # the greeting
        command("qmp_capabilities")
        command("system_powerdown")


def pid_alive(pid: int | None) -> bool:
    """True while the process exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(pid: int | None, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def halt_guest(name: str, state: dict) -> None:
    """Replaces fakelib._halt_guest (called by stop_unit, under the unit lock, deactivating)."""
    ident = f"microvm@{name}"
    qemu, launcher = state.get("qemu_pid"), state.get("boot_pid")
    if not qemu:
        # stopped before QEMU was recorded: nothing on the disk is worth a clean shutdown
        if pid_alive(launcher):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(launcher, signal.SIGKILL)
    elif pid_alive(qemu):
        sock = os.path.join(state.get("runtime") or "", "qmp.sock")
        deadline = time.monotonic() + POWERDOWN_TIMEOUT
        failures = 0
        # A guest still booting has nothing listening to the power button yet (logind):
        # press it again every few seconds, as someone at the machine would.
        while pid_alive(qemu) and time.monotonic() < deadline:
            try:
                _qmp_powerdown(sock)
            except (OSError, ValueError) as exc:
                if not failures and pid_alive(qemu):
                    fakelib.journal(name, ident, f"e2e host: QMP system_powerdown failed: {exc}")
                failures += 1
            _wait_gone(qemu, min(POWERDOWN_REPEAT, max(0.0, deadline - time.monotonic())))
        if pid_alive(qemu):
            fakelib.journal(name, ident, f"e2e host: the guest did not power off within "
                            f"{POWERDOWN_TIMEOUT:g} s after system_powerdown: killing QEMU "
                            f"(its last writes may be lost)")
            _signal(qemu, signal.SIGTERM)
            if not _wait_gone(qemu, 10):
                _signal(qemu, signal.SIGKILL)
                _wait_gone(qemu, 10)
    if not _wait_gone(launcher, 10):  # it exits once QEMU's console closes
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(launcher, signal.SIGKILL)
    for pid in state.get("virtiofsd_pids") or []:
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, 5):
            _signal(pid, signal.SIGKILL)
    if state.get("runtime"):
        shutil.rmtree(state["runtime"], ignore_errors=True)
    fakelib.write_unit(name, qemu_pid=None, virtiofsd_pids=[], runtime=None)


# -- the executables -----------------------------------------------------------------------

def run_fake(prog: str) -> None:
    """Run tests/fakehost/bin/<prog> with this module's start and halt in place."""
    fakelib.start_unit = start_unit
    fakelib._halt_guest = halt_guest
    fakelib.build = build
    argv = sys.argv[1:]
    if prog == "systemctl" and "stop" in argv and "--no-block" in argv:
        # the fake backgrounds `fakelib.py stop`, which knows nothing of QEMU: background
        # ourselves instead
        fakelib.record_invocation(prog)
        subprocess.Popen([sys.executable, sys.argv[0], *[a for a in argv if a != "--no-block"]],
                         env=dict(os.environ, MARINER_FAKEHOST_LOG=""), start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        sys.exit(0)
    runpy.run_path(str(FAKEHOST / "bin" / prog), run_name="__main__")


# -- accelerator probe ---------------------------------------------------------------------

def probe_kvm(image: Path, timeout: float = 20.0) -> tuple[bool, str]:
    """Boot the image's kernel under KVM until it runs the initramfs; (works, why not)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not usable"
    argv = [QEMU, "-M", "q35", "-accel", "kvm", "-m", "512M", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
            "-append", "console=ttyS0 panic=-1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            chunk = proc.stdout.read() or b""
            seen += chunk
            if re.search(rb"Run /init as init process|Freeing unused kernel", seen):
                return True, ""
            time.sleep(0.1)
        seen += proc.stdout.read() or b""
        last = seen.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        return False, f"a KVM guest did not reach its init within {timeout:g} s; last: {last[0]}"
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "boot":
        return boot(argv[1])
    if len(argv) == 2 and argv[0] == "stop":
        fakelib.start_unit = start_unit
        fakelib._halt_guest = halt_guest
        fakelib.stop_unit(argv[1])
        return 0
    if len(argv) == 2 and argv[0] == "probe-kvm":
        works, why = probe_kvm(Path(argv[1]))
        print("kvm" if works else "tcg")
        if not works:
            print(f"e2e: KVM not used: {why}", file=sys.stderr)
        return 0
    print("usage: realhost.py boot|stop <name> | probe-kvm <image dir>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
