"""The fake `nix build` of a VM's declared runner, and the runner it produces, for the runner
backend's tests (the microvm backend's fakes are fakelib.py and bin/microvm, bin/systemctl).

`nix build … -o OUT path:/FLAKE#nixosConfigurations.<name>.config.microvm.declaredRunner`
checks and evaluates the flake like the fake `microvm -c` does (fakelib.build: the real
nix-instantiate against stub inputs, microvm.nix's assertions), then writes into
$MARINER_FAKE_NIX_STORE/<hash>-microvm-qemu-<name>/ what a real runner has:

    bin/microvm-run        "QEMU": runs in the foreground with the VM's state directory as its
                           working directory; connects to every virtiofs share's socket first
                           (fails like QEMU when one is missing, so start order is tested);
                           refuses a vsock device when /dev/vhost-vsock is not there (as QEMU
                           does); creates the volume images; listens for QMP on <hostName>.sock;
                           boots the guest: the real sshd of support/guest_sshd.py on the
                           forwarded loopback port, shares emulated as symlinks (fakelib);
                           Ctrl-Alt-Del over QMP (microvm-shutdown's power button) or SIGTERM
                           stops the guest and exits 0
    bin/microvm-shutdown   upstream's protocol: does nothing when <hostName>.sock is missing,
                           else qmp_capabilities + Ctrl-Alt-Del key events, then waits until
                           QEMU closes the socket
    bin/virtiofsd-run      "supervisord + one virtiofsd per share": refuses to run as a non-root
                           user without `-u <that user>` (upstream's config says user = root),
                           creates each share's socket, and each "virtiofsd" exits when QEMU
                           disconnects while supervisord stays (so it must be restarted
                           before the next start); SIGTERM ends it
    share/microvm/         hypervisor, vsock-cid (unless nulled), virtiofs/<tag>/{socket,source},
                           guest.json (what the build evaluated)

and points OUT at it (a symlink, replaced atomically, as Nix does). Every program logs its
invocation to $MARINER_FAKEHOST_LOG (prog, argv, cwd), like the other fakes.

Knobs: MARINER_FAKE_BUILD_FAIL / _BUILD_DELAY (the build, as for microvm), _BOOT_DELAY (sshd
starts this much later), _BOOT_FAIL=1 (the kernel panics: QEMU exits 1),
MARINER_FAKE_IGNORE_POWER_BUTTON=1 (a guest that ignores Ctrl-Alt-Del: only SIGTERM stops it),
MARINER_FAKE_NIX_FEATURES (the experimental features of the fake's "nix.conf", default none).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fakelib
from fakelib import Refused

FAKEHOST = Path(__file__).resolve().parent
NIX_VERSION = "nix (Nix) 2.24.9"
INSTALLABLE_SUFFIX = ".config.microvm.declaredRunner"


# -- nix ------------------------------------------------------------------------------------

def nix_main(argv: list[str]) -> int:
    features = set((os.environ.get("MARINER_FAKE_NIX_FEATURES") or "").split())
    args = list(argv)
    rest = []
    while args:
        arg = args.pop(0)
        if arg == "--extra-experimental-features":
            if not args:
                raise Refused("error: flag '--extra-experimental-features' requires an argument")
            features |= set(args.pop(0).split())
        elif arg == "--version":
            print(NIX_VERSION)
            return 0
        else:
            rest.append(arg)
    if not rest:
        raise Refused("error: no subcommand specified", 1)
    command, args = rest[0], rest[1:]
    if "nix-command" not in features:
        raise Refused(f"error: experimental Nix feature 'nix-command' is disabled; add "
                      f"'--extra-experimental-features nix-command' to enable it")
    if command == "config" and args == ["show"]:
        print(f"experimental-features = {' '.join(sorted(features))}")
        return 0
    if command == "build":
        return _build(args, features)
    raise Refused(f"fakehost: nix {command} is not emulated")


def _build(args: list[str], features: set[str]) -> int:
    out = installable = None
    while args:
        arg = args.pop(0)
        if arg in ("-o", "--out-link") and args:
            out = args.pop(0)
        elif not arg.startswith("-") and installable is None:
            installable = arg
        else:
            raise Refused(f"fakehost: nix build: unexpected argument {arg!r}")
    if installable is None or out is None:
        raise Refused("fakehost: nix build needs -o OUT and one installable")
    flakeref, _, attr = installable.partition("#")
    if "flakes" not in features:
        raise Refused("error: experimental Nix feature 'flakes' is disabled; add "
                      "'--extra-experimental-features flakes' to enable it")
    prefix = "nixosConfigurations."
    if not (attr.startswith(prefix) and attr.endswith(INSTALLABLE_SUFFIX)):
        raise Refused(f"fakehost: only <flake>#nixosConfigurations.<name>{INSTALLABLE_SUFFIX} "
                      f"is emulated, got {installable!r}")
    name = attr[len(prefix):-len(INSTALLABLE_SUFFIX)]
    store = os.environ.get("MARINER_FAKE_NIX_STORE")
    if not store:
        raise Refused("fakehost: MARINER_FAKE_NIX_STORE is not set")
    if not os.path.isabs(out):
        raise Refused(f"fakehost: mariner passes an absolute out-link, not {out!r}")
    runner = fakelib.build(name, flakeref, Path(store))
    complete_runner(runner, name)
    _out_link(Path(out), runner)
    return 0


def _out_link(out: Path, target) -> None:
    """Make `out` a symlink to `target` atomically, as Nix makes out-links and roots; a file
    that is not a symlink is in the way."""
    if out.exists() and not out.is_symlink():
        raise Refused(f"error: cannot create symlink '{out}'; already exists")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.symlink_to(target)
    os.replace(tmp, out)


def nix_store_main(argv: list[str]) -> int:
    """`nix-store --realise PATH --add-root LINK [--indirect]`, what mariner runs to keep the
    runner a VM booted from: strict about its arguments, PATH must be a valid path of the fake
    store and LINK absolute; LINK is (re)made atomically, as Nix does, and recorded as a root
    in the store's `.gcroots`."""
    args = list(argv)
    path = link = None
    while args:
        arg = args.pop(0)
        if arg in ("-r", "--realise") and args and path is None:
            path = args.pop(0)
        elif arg == "--add-root" and args and link is None:
            link = args.pop(0)
        elif arg == "--indirect":
            continue
        else:
            raise Refused(f"fakehost: nix-store: unexpected argument {arg!r}")
    if path is None or link is None:
        raise Refused("fakehost: nix-store needs --realise PATH --add-root LINK")
    store = os.environ.get("MARINER_FAKE_NIX_STORE")
    if not store:
        raise Refused("fakehost: MARINER_FAKE_NIX_STORE is not set")
    if os.path.dirname(path) != store.rstrip("/"):
        raise Refused(f"error: path '{path}' is not in the Nix store")
    if not os.path.isdir(path):
        raise Refused(f"error: path '{path}' is not valid")
    if not os.path.isabs(link):
        raise Refused(f"fakehost: mariner passes an absolute root, not {link!r}")
    _out_link(Path(link), path)
    with open(Path(store) / ".gcroots", "a") as fh:     # the root, and its link's inode
        fh.write(f"{link} {os.lstat(link).st_ino}\n")
    print(link)
    return 0


# The module whose functions the runner's programs call, and the directory it lives in: the
# e2e tier (tests/e2e/realrunner.py) puts its own here, so that its runner boots real QEMU.
PROGRAMS = ("fakerunner", FAKEHOST)


def _program(runner: Path, name: str, function: str) -> None:
    module, directory = PROGRAMS
    path = runner / "bin" / name
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path[:0] = [{str(FAKEHOST)!r}, "
                    f"{str(directory)!r}]\nimport fakelib, {module}\n"
                    f"fakelib.main_wrapper({name!r}, lambda argv: {module}.{function}("
                    f"{str(runner)!r}, argv))\n")
    path.chmod(0o755)


def complete_runner(runner: Path, name: str) -> None:
    """Turn fakelib.build's stub into a runnable runner (once per store path)."""
    if (runner / "share" / "microvm" / "hypervisor").exists():
        return
    vm = fakelib.guest_config(runner)
    share = runner / "share" / "microvm"
    _program(runner, "microvm-run", "run_vm")
    _program(runner, "microvm-shutdown", "shutdown_vm")
    virtiofs = [s for s in fakelib.effective_shares(vm) if s.get("proto") == "virtiofs"]
    if virtiofs:
        _program(runner, "virtiofsd-run", "run_virtiofsd")
    for entry in virtiofs:
        tag = share / "virtiofs" / entry["tag"]
        tag.mkdir(parents=True)
        (tag / "socket").write_text(f"{entry.get('socket') or name + '-virtiofs-' + entry['tag'] + '.sock'}\n")
        (tag / "source").write_text(f"{entry['source']}\n")
    cid = fakelib.vsock_cid_of(vm)
    if cid is not None:
        (share / "vsock-cid").write_text(f"{cid}\n")
    (share / "hypervisor").write_text(f"{fakelib._get(vm, 'microvm.hypervisor', 'qemu')}\n")


# -- the runner's programs ------------------------------------------------------------------

def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _host_name(runner: Path) -> str:
    data = json.loads((runner / "share" / "microvm" / "guest.json").read_text())
    return fakelib._get(data["vm"], "networking.hostName", data["name"])


class _Stop(Exception):
    pass


def _on_term(signum, frame):
    raise _Stop(signum)


def run_vm(runner: str, argv: list[str]) -> int:
    runner = Path(runner)
    if argv:
        raise Refused(f"fakehost: microvm-run takes no arguments, got {argv}")
    if os.path.samestat(os.fstat(0), os.stat("/dev/null")) is False:
        raise Refused("fakehost: microvm-run's stdin must be /dev/null (QEMU's console reads it)")
    vm = fakelib.guest_config(runner)
    name = _host_name(runner)
    cwd = Path.cwd()
    held: list[socket.socket] = []
    for entry in fakelib.effective_shares(vm):
        if entry.get("proto") != "virtiofs":
            continue
        path = entry.get("socket") or f"{name}-virtiofs-{entry['tag']}.sock"
        conn = socket.socket(socket.AF_UNIX)
        try:
            conn.connect(path)
        except OSError as exc:
            raise Refused(f"qemu-system-x86_64: -chardev socket,id=fs{len(held)},path={path}: "
                          f"Failed to connect to '{path}': {exc.strerror}")
        held.append(conn)
    cid = fakelib.vsock_cid_of(vm)
    vsock = _claim_vsock_cid(cid) if cid is not None else None
    for image in ("persist.img", "nix-store.img"):  # microvm.nix's createVolumesScript
        if not os.path.exists(image):
            with open(image, "wb") as fh:
                fh.truncate(64 * 1024)
    qmp = socket.socket(socket.AF_UNIX)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{name}.sock")
    qmp.bind(f"{name}.sock")
    qmp.listen(4)
    signal.signal(signal.SIGTERM, _on_term)
    guest = Guest(runner, vm, cwd)
    try:
        _say(f"[    0.000000] Linux version 6.6.0 (nixbld@localhost) #1-NixOS SMP")
        _say(f"[    0.210000] virtio-fs: {len(held)} share(s) connected")
        time.sleep(fakelib.knob_seconds("MARINER_FAKE_BOOT_DELAY"))
        if os.environ.get("MARINER_FAKE_BOOT_FAIL") == "1":
            _say("[    1.500000] Kernel panic - not syncing: VFS: Unable to mount root fs on "
                 "unknown-block(0,0)")
            return 1
        guest.boot()
        _say(f"<<< Welcome to NixOS (fakehost runner) - {name} >>>")
        _say(f"{name} login: ")
        _serve_qmp(qmp)
        _say("reboot: Power down")
        return 0
    except _Stop as stop:
        _say(f"qemu-system-x86_64: terminating on signal {stop.args[0]}")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        guest.halt()
        qmp.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{name}.sock")
        for conn in held:
            conn.close()
        if vsock:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(vsock)


def _claim_vsock_cid(cid: int) -> str:
    """What the kernel's vhost-vsock does: one VM per cid on the whole host. The device is
    MARINER_VHOST_VSOCK (default /dev/vhost-vsock); the host's table of cids in use is
    MARINER_FAKE_VSOCK_DIR/<cid>, each holding the pid of the "QEMU" that has it."""
    device = os.environ.get("MARINER_VHOST_VSOCK") or "/dev/vhost-vsock"
    where = f"-device vhost-vsock-pci,guest-cid={cid}: vhost-vsock"
    if not os.access(device, os.R_OK | os.W_OK):
        raise Refused(f"qemu-system-x86_64: {where}: failed to open vhost device: No such file "
                      f"or directory")
    table = os.environ.get("MARINER_FAKE_VSOCK_DIR")
    if not table:
        raise Refused("fakehost: MARINER_FAKE_VSOCK_DIR is not set (the host's vsock cid table)")
    path = os.path.join(table, str(cid))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                os.kill(int(Path(path).read_text()), 0)
                held = True
            except PermissionError:   # alive, another user's (as a VM holding a cid often is)
                held = True
            except (OSError, ValueError):
                held = False
            if held:
                raise Refused(f"qemu-system-x86_64: {where}: unable to set guest cid: Address "
                              f"already in use")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # its QEMU is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return path
    raise Refused(f"qemu-system-x86_64: {where}: unable to set guest cid: Address already in use")


def _serve_qmp(qmp: socket.socket) -> None:
    """Answer QMP until the power button (Ctrl-Alt-Del key events) is pressed."""
    clients: dict[socket.socket, bytes] = {}
    while True:
        ready, _, _ = select.select([qmp, *clients], [], [], 0.5)
        for sock in ready:
            if sock is qmp:
                conn, _ = qmp.accept()
                conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 8}}, "capabilities": []}}\r\n')
                clients[conn] = b""
                continue
            data = sock.recv(65536)
            if not data:
                del clients[sock]
                sock.close()
                continue
            buffer = clients[sock] + data
            *lines, clients[sock] = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                message = json.loads(line)
                sock.sendall(b'{"return": {}}\r\n')
                keys = {e["data"]["key"]["data"] for e in
                        (message.get("arguments") or {}).get("events", [])
                        if e.get("type") == "key" and e["data"].get("down")}
                if message.get("execute") == "input-send-event" and \
                        {"ctrl", "alt", "delete"} <= keys and \
                        os.environ.get("MARINER_FAKE_IGNORE_POWER_BUTTON") != "1":
                    for conn in clients:  # QEMU closes every QMP connection as it exits
                        conn.close()
                    return


class Guest:
    """The guest's sshd and shares, as fakelib's boot() brings them up for the microvm fakes."""

    def __init__(self, runner: Path, vm: dict, cwd: Path):
        self.vm, self.cwd = vm, cwd
        self.state = cwd / "guest"
        self.links: list[str] = []
        self.keydir: str | None = None

    def boot(self) -> None:
        address, port = fakelib._ssh_forward(self.vm)
        if address != "127.0.0.1":
            raise Refused(f"fakehost: the SSH forward binds host.address {address!r}; "
                          f"mariner must bind 127.0.0.1")
        user = os.environ.get("MARINER_FAKE_GUEST_USER") or fakelib._get(self.vm, "mariner.username", "vm")
        keys = self._authorized_keys(user, fakelib._get(self.vm, "mariner.ssh.authorizedKey"))
        for target, source in fakelib._share_links(self.vm):
            if target.is_symlink():
                target.unlink()
            elif target.exists():
                _say(f"fakehost: {target} exists on this machine; share {source} is not emulated")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
            self.links.append(str(target))
        proc = subprocess.run(
            [sys.executable, str(fakelib.GUEST_SSHD), "start", "--port", str(port), "--user", user,
             "--authorized-keys-file", str(keys), "--state-dir", str(self.state)],
            capture_output=True, text=True)
        if proc.returncode != 0:
            raise Refused(proc.stderr.strip() or "guest sshd failed to start")

    def _authorized_keys(self, user: str, key: str) -> Path:
        import pwd
        import tempfile

        try:
            other = pwd.getpwnam(user).pw_uid != os.geteuid()
        except KeyError:
            other = os.geteuid() == 0
        if other:  # sshd reads it as the guest user: out of the private state directory
            self.keydir = tempfile.mkdtemp(prefix=f"{fakelib.KEYDIR_PREFIX}runner-", dir="/tmp")
            os.chmod(self.keydir, 0o755)
            Path(self.keydir, "owner").write_text(str(self.cwd))
            keydir = Path(self.keydir)
        else:
            keydir = self.state
            keydir.mkdir(parents=True, exist_ok=True)
        path = keydir / "authorized_keys"
        path.write_text(key.strip() + "\n")
        path.chmod(0o644)
        return path

    def halt(self) -> None:
        if (self.state / "sshd_config").exists():
            subprocess.run([sys.executable, str(fakelib.GUEST_SSHD), "stop", "--state-dir",
                            str(self.state)], capture_output=True, text=True)
        fakelib._unmount_shares(self.links)
        if self.keydir:
            import shutil

            shutil.rmtree(self.keydir, ignore_errors=True)


def shutdown_vm(runner: str, argv: list[str]) -> int:
    name = _host_name(Path(runner))
    path = f"{name}.sock"
    if not os.path.exists(path):
        return 0  # upstream: "Exit gracefully if QEMU is already gone"
    conn = socket.socket(socket.AF_UNIX)
    try:
        conn.connect(path)
    except OSError:
        return 0
    key = lambda k: {"type": "key", "data": {"down": True, "key": {"type": "qcode", "data": k}}}
    conn.sendall((json.dumps({"execute": "qmp_capabilities"}) + "\n").encode())
    conn.sendall((json.dumps({"execute": "input-send-event", "arguments": {
        "events": [key("ctrl"), key("alt"), key("delete")]}}) + "\n").encode())
    while conn.recv(65536):  # `cat` until QEMU closes the socket
        pass
    return 0


def check_supervisord_args(argv: list[str], who: str = "fakehost") -> None:
    """Refuse virtiofsd-run's arguments as its supervisord does: any but `-u USER`, and, when
    not run as root, a USER other than the caller (upstream's config says user = root, so
    without `-u` it is root too). `who` names the stand-in in the message."""
    user = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-u", "--user") and args:
            user = args.pop(0)
        else:
            raise Refused(f"Error: option {arg} not recognized ({who} supervisord)", 2)
    if os.geteuid() != 0 and (user or "root") != getpass.getuser():
        raise Refused("Error: Can't drop privilege as nonroot user", 2)


def run_virtiofsd(runner: str, argv: list[str]) -> int:
    runner = Path(runner)
    check_supervisord_args(argv)
    shares = []
    base = runner / "share" / "microvm" / "virtiofs"
    for tag in sorted(os.listdir(base)):
        sock = (base / tag / "socket").read_text().strip()
        source = (base / tag / "source").read_text().strip()
        if not os.path.isdir(source):
            _say(f"virtiofsd-{tag}: Error: shared directory {source} does not exist")
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(sock)
        listener.listen(1)
        shares.append({"tag": tag, "path": sock, "listener": listener, "conn": None})
        _say(f"virtiofsd-{tag}: listening on {sock}, sharing {source}")
    signal.signal(signal.SIGTERM, _on_term)
    try:
        while True:
            watch = [s["listener"] for s in shares if s["listener"]] + \
                    [s["conn"] for s in shares if s["conn"]]
            ready, _, _ = select.select(watch, [], [], 0.5)
            for share in shares:
                if share["listener"] in ready:
                    share["conn"], _ = share["listener"].accept()
                elif share["conn"] in ready and not share["conn"].recv(4096):
                    # QEMU went away: this virtiofsd exits; supervisord stays behind
                    share["conn"].close()
                    share["conn"] = None
                    share["listener"].close()
                    share["listener"] = None
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(share["path"])
                    _say(f"virtiofsd-{share['tag']}: client disconnected, exiting")
    except _Stop:
        return 0
    finally:
        for share in shares:
            for sock in (share["listener"], share["conn"]):
                if sock:
                    sock.close()
            with contextlib.suppress(FileNotFoundError):
                if share["listener"] is not None:
                    os.unlink(share["path"])
