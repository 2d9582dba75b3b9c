"""Shared machinery of the fake `microvm`, `systemctl` and `journalctl` in tests/fakehost/bin.

The fakes play a NixOS host with the microvm.nix host module. Everything they know lives in
MARINER_MICROVMS_DIR/<name>/ (which they refuse to run without, so a test can never touch
/var/lib/microvms):

    flake                       the flakeref given to `microvm -c` (as upstream)

A build also writes flake.lock into the flake directory when it has none, as Nix does.
    current -> .fake-store/<hash>-microvm-<name>     the "runner" the last build produced
    booted  -> the runner the unit started from      (created on start, removed on stop)
    .fake-store/<hash>-microvm-<name>/
        bin/microvm-run         a stub (the fakes never run it)
        share/microvm/guest.json   what the build evaluated from the flake's vm.nix
    .fake-unit.json             the unit's state (ActiveState, SubState, timestamps, pids)
    .fake-journal               the unit's journal, one line per entry
    guest/                      the state dir of the sshd playing the guest (guest_sshd.py)

The "build" evaluates the rendered flake with the real nix-instantiate against stub inputs,
so the guest gets what the flake says, never what a test assumes. The <hash> depends only on
what would change the real system (the Nix sources, parsed, and the evaluated vm.nix), so an
unchanged re-render keeps `current` where it was, like Nix would.

Every invocation of a fake is appended to $MARINER_FAKEHOST_LOG when that is set, one JSON
line each: {"prog": "systemctl", "argv": [the arguments after the program], "path": the
program as invoked (absolute when mariner's runner ran it), "cwd", "time"}.

Knobs (environment variables, read when the command runs):
    MARINER_FAKE_BUILD_FAIL="<text>"  `microvm -c/-u` prints <text> on stderr and exits 1
    MARINER_FAKE_BUILD_DELAY=<s>      `microvm -c/-u` takes this long to "build"
    MARINER_FAKE_BOOT_DELAY=<s>       after `systemctl start`, the guest's sshd starts this
                                      much later (start itself returns at once, the unit is
                                      active meanwhile: SSH is not answering yet)
    MARINER_FAKE_BOOT_FAIL=1          the guest "crashes" while booting: the unit goes
                                      failed with QEMU's last words in the journal
    MARINER_FAKE_STOP_DELAY=<s>       `systemctl stop` stays deactivating this long
    MARINER_FAKE_START_DELAY=<s>      `systemctl start` returns this much later (the unit is
                                      started at once: a client killed meanwhile does not
                                      undo the job, as with systemd)
    MARINER_FAKE_GUEST_USER=<user>    run the guest's sshd for this account instead of the
                                      flake's mariner.username (only when a test cannot
                                      render its test account into [vm] user)
    MARINER_FAKE_NO_SHARES=1          do not emulate virtiofs shares (see below)
    MARINER_FAKE_HOST_DOWN=1          every `systemctl` fails as on a machine whose systemd
                                      is not running ("Failed to connect to bus: Host is down")

Shares: on boot, each microvm.shares entry is emulated as a symlink mountPoint -> source on
this machine (the guest *is* this machine), created only where nothing exists yet (or a
symlink the fake made), and removed on stop.

vsock cids are global to the host's kernel: a VM whose cid another running VM in the state
directory (any user's: its `booted` runner's vsock-cid) already holds fails at start with
QEMU's "unable to set guest cid: Address already in use".

Deliberate differences from upstream, all stricter: an unknown `microvm` flag fails (upstream
prints its help and exits 0); only absolute `path:` flakes are accepted; starting a VM whose
state directory or runner is missing fails (systemd would skip it on its condition and exit 0).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
NIXSTUB = TESTS / "support" / "nixstub.nix"
GUEST_SSHD = TESTS / "support" / "guest_sshd.py"

UNIT_FILE = ".fake-unit.json"
JOURNAL_FILE = ".fake-journal"
LOCK_FILE = ".fake-unit.lock"
STORE = ".fake-store"
VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Refused(Exception):
    """The fake refuses what the real command would refuse: message and exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# -- environment ----------------------------------------------------------------------------

def microvms_dir() -> Path:
    value = os.environ.get("MARINER_MICROVMS_DIR")
    if not value:
        raise Refused("fakehost: MARINER_MICROVMS_DIR is not set; the fakes never use "
                      "/var/lib/microvms")
    return Path(value)


def vm_dir(name: str) -> Path:
    return microvms_dir() / name


def record_invocation(prog: str) -> None:
    log = os.environ.get("MARINER_FAKEHOST_LOG")
    if not log:
        return
    line = json.dumps({"prog": prog, "argv": sys.argv[1:], "path": sys.argv[0],
                       "cwd": os.getcwd(), "time": time.time()}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def knob_seconds(name: str) -> float:
    try:
        return max(0.0, float(os.environ.get(name) or 0))
    except ValueError:
        raise Refused(f"fakehost: {name}={os.environ[name]!r} is not a number") from None


def main_wrapper(prog: str, main) -> None:
    """Run a fake's main(argv): log the call, turn Refused into stderr + exit status."""
    try:
        record_invocation(prog)
        if prog == "systemctl" and os.environ.get("MARINER_FAKE_HOST_DOWN") == "1":
            raise Refused("Failed to connect to bus: Host is down")
        status = main(sys.argv[1:])
    except Refused as exc:
        if str(exc):
            print(str(exc), file=sys.stderr)
        status = exc.status
    except BrokenPipeError:
        status = 141
    sys.exit(status or 0)


# -- small file helpers ---------------------------------------------------------------------

def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


@contextlib.contextmanager
def unit_lock(directory: Path):
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_unit(name: str) -> dict:
    try:
        return json.loads((vm_dir(name) / UNIT_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return {"state": "inactive", "substate": "dead"}


def write_unit(name: str, **changes) -> dict:
    unit = read_unit(name)
    unit.update(changes)
    write_json_atomic(vm_dir(name) / UNIT_FILE, unit)
    return unit


def journal(name: str, ident: str, *messages: str) -> None:
    """Append journal entries in journalctl's default `short` format."""
    path = vm_dir(name) / JOURNAL_FILE
    if not path.parent.is_dir():
        return
    stamp = datetime.now().strftime("%b %d %H:%M:%S")
    host = socket.gethostname().split(".")[0]
    pid = 1 if ident == "systemd" else os.getpid()
    with open(path, "a") as fh:
        for message in messages:
            for line in message.splitlines() or [""]:
                fh.write(f"{stamp} {host} {ident}[{pid}]: {line}\n")


# -- the "build": check the flake as strictly as Nix would, evaluate vm.nix -----------------

def nix_instantiate() -> str:
    path = shutil.which("nix-instantiate")
    if path is None:
        raise Refused("fakehost: nix-instantiate is not installed (Debian: nix-bin); the fake "
                      "microvm evaluates the rendered flake with it")
    return path


def _nix(args: list[str], what: str) -> str:
    proc = subprocess.run([nix_instantiate(), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Refused(proc.stderr.rstrip() or f"error: nix-instantiate failed on {what}")
    return proc.stdout


def parse_nix(path: Path) -> str:
    """`nix-instantiate --parse`: the file's normalised form, or a Nix syntax error."""
    return _nix(["--parse", str(path)], str(path))


def flake_dir_from_ref(flakeref: str) -> Path:
    if not flakeref.startswith("path:"):
        raise Refused(f"fakehost: only `path:` flakes are emulated, got {flakeref!r}")
    raw = flakeref[len("path:"):]
    if "?" in raw or "#" in raw:
        raise Refused(f"fakehost: flake reference {flakeref!r} carries a query or fragment")
    if not raw.startswith("/"):
        # upstream builds in a temporary directory: a relative path would resolve there
        raise Refused(f"error: path '{raw}' is not absolute: microvm builds from a temporary "
                      f"directory, so the flake needs an absolute `path:` reference")
    directory = Path(raw)
    if not directory.is_dir():
        raise Refused(f"error: getting status of '{directory}': No such file or directory")
    if not (directory / "flake.nix").is_file():
        raise Refused(f"error: source tree referenced by '{flakeref}' does not contain a "
                      f"'/flake.nix' file")
    return directory


_OUTPUTS_EXPR = """{ flakeFile, name }:
let
  flake = import (/. + flakeFile);
  nixpkgs = {
    lib.nixosSystem = args: {
      fakeNixosSystem = true;
      modules = map (m: if builtins.isPath m then toString m else "<module>") (args.modules or [ ]);
    };
  };
  input = {
    inputs = { inherit nixpkgs; microvm = { }; };
    nixosModules = { default = { }; host = { }; };
    lib = nixpkgs.lib;
    outPath = "/fakehost/input";
  };
  inputs = builtins.mapAttrs (n: _: input) (flake.inputs or { });
  outputs = flake.outputs (inputs // { self = { outPath = dirOf flakeFile; }; });
  configs = outputs.nixosConfigurations or { };
in
  if configs ? ${name} then configs.${name}.modules
  else throw "flake '${dirOf flakeFile}' does not provide attribute 'nixosConfigurations.${name}' (it has: ${builtins.concatStringsSep ", " (builtins.attrNames configs)})"
"""

_VM_EXPR = """{ vmFile, stub }:
import (/. + vmFile) { lib = import (/. + stub); pkgs = { }; config = { }; }
"""


def flake_modules(directory: Path, name: str) -> list[str]:
    """The modules of nixosConfigurations.<name>, from the flake evaluated with stub inputs."""
    flake = directory / "flake.nix"
    parse_nix(flake)
    out = _nix(["--eval", "--strict", "--json", "-E", _OUTPUTS_EXPR,
                "--argstr", "flakeFile", str(flake), "--argstr", "name", name],
               "flake.nix outputs")
    return json.loads(out)


def evaluate_vm(vm_file: Path) -> dict:
    parse_nix(vm_file)
    out = _nix(["--eval", "--strict", "--json", "-E", _VM_EXPR,
                "--argstr", "vmFile", str(vm_file), "--argstr", "stub", str(NIXSTUB)],
               str(vm_file))
    return json.loads(out)


def _get(data: dict, dotted: str, default=None):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _content(value):
    """The value of a definition, through mkForce/mkDefault/mkBefore records."""
    if isinstance(value, dict) and value.get("_type") in ("override", "order"):
        return value.get("content")
    return value


# nix-mariner's storage.nix: a plain definition, so a list in vm.nix is appended to it and only
# lib.mkForce replaces it.
NIX_MARINER_SHARES = [{"tag": "ro-store", "source": "/nix/store", "mountPoint": "/nix/.ro-store",
                       "proto": "9p"}]


def effective_shares(vm: dict) -> list[dict]:
    """microvm.shares as the module system merges it with nix-mariner's own entry."""
    value = _get(vm, "microvm.shares", []) or []
    if isinstance(value, dict) and value.get("_type") == "override":
        return list(value.get("content") or [])
    return NIX_MARINER_SHARES + list(value)


def vsock_cid_of(vm: dict):
    """microvm.vsock.cid: nix-mariner copies mariner.cid there, unless vm.nix forces it."""
    value = _get(vm, "microvm.vsock.cid", _get(vm, "mariner.cid"))
    return _content(value)


def _assertions(name: str, vm: dict) -> list[str]:
    """What microvm.nix and nix-mariner assert at build time (the subset the fake knows)."""
    host = _get(vm, "networking.hostName", name)
    failed = []
    interfaces = _get(vm, "microvm.interfaces", []) or []
    forward = _get(vm, "microvm.forwardPorts", []) or []
    hypervisor = _get(vm, "microvm.hypervisor", "qemu")
    if forward and not (hypervisor == "qemu" and [i.get("type") for i in interfaces] == ["user"]):
        failed.append(f"MicroVM {host}: `config.microvm.forwardPorts` works only with qemu and "
                      f"one network interface with `type = \"user\"`")
    ids = [i.get("id", "") for i in interfaces]
    for iface in sorted(set(ids)):
        if ids.count(iface) > 1:
            failed.append(f"MicroVM {host}: interface id {iface} is used more than once")
        if len(iface) > 15:
            failed.append(f"MicroVM {host}: interface name {iface} is longer than the maximum "
                          f"length of 15 characters on Linux")
    shares = effective_shares(vm)
    for field in ("tag", "socket"):
        values = [s.get(field) for s in shares if s.get(field) is not None]
        for value in sorted(set(values)):
            if values.count(value) > 1:
                failed.append(f"MicroVM {host}: share {field} {value} is used more than once")
    return failed


def check_vm_config(name: str, vm: dict) -> None:
    """Refuse like Nix would: undefined required options, renamed options, failed asserts."""
    if _get(vm, "mariner.hostAuthorizedKey") is not None:
        raise Refused("error: The option `mariner.hostAuthorizedKey' does not exist. Definition "
                      "values:\n       - In `vm.nix'")
    for required in ("mariner.cid", "mariner.ssh.authorizedKey"):
        if _get(vm, required) is None:
            raise Refused(f"error: The option `{required}' is used but not defined.")
    cid = _get(vm, "mariner.cid")
    if not isinstance(cid, int) or cid < 0:
        raise Refused(f"error: A definition for option `mariner.cid' is not of type `unsigned "
                      f"integer, meaning >=0'. Definition values:\n       - In `vm.nix': {cid!r}")
    username = _get(vm, "mariner.username", "vm")
    uid = _get(vm, f"users.users.{username}.uid")
    if uid is not None and not isinstance(uid, dict) and uid != 1000:
        raise Refused(f"error: The option `users.users.{username}.uid' has conflicting definition "
                      f"values:\n       - In `nix-mariner/modules/user.nix': 1000\n       - In "
                      f"`vm.nix': {uid}\n       Use `lib.mkForce value` or `lib.mkDefault value` "
                      f"to change the priority on any of these definitions.")
    failed = _assertions(name, vm)
    if failed:
        raise Refused("error:\n       Failed assertions:\n"
                      + "".join(f"       - {line}\n" for line in failed))


def _tree_digest(directory: Path, modules: list[str]) -> str:
    """What the real system closure depends on: the Nix sources (normalised) of the flake and
    of every module it imports from its own directory; comments and unused files do not count."""
    digest = hashlib.sha256()
    digest.update(parse_nix(directory / "flake.nix").encode())
    for module in sorted(m for m in modules if m.startswith(str(directory) + "/")):
        path = Path(module)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(directory)).encode() + b"\0")
            digest.update(parse_nix(file).encode() if file.suffix == ".nix" else file.read_bytes())
    return digest.hexdigest()[:32]


def _lock_inputs(directory: Path) -> None:
    """Like Nix on a `path:` flake without a lock: write flake.lock into the flake directory
    (the real one pins nix-mariner's revision and narHash; a later build reuses it)."""
    lock = directory / "flake.lock"
    if lock.exists():
        return
    text = (directory / "flake.nix").read_text()
    url = re.search(r'inputs\.mariner\.url = "([^"]*)";', text)
    data = {"nodes": {"mariner": {"locked": {"type": "github", "owner": "mksafavi",
                                             "repo": "nix-mariner",
                                             "narHash": "sha256-fakehost",
                                             "lastModified": int(time.time())},
                                  "original": {"url": url.group(1) if url else None}},
                      "root": {"inputs": {"mariner": "mariner"}}},
            "root": "root", "version": 7}
    lock.write_text(json.dumps(data, indent=2) + "\n")


def build(name: str, flakeref: str, store: Path) -> Path:
    """Check and "build" the VM `name` from `flakeref`; return the runner dir under `store`."""
    fail = os.environ.get("MARINER_FAKE_BUILD_FAIL")
    delay = knob_seconds("MARINER_FAKE_BUILD_DELAY")
    directory = flake_dir_from_ref(flakeref)
    modules = flake_modules(directory, name)
    vm_file = directory / "vm.nix"
    if str(vm_file) not in modules:
        raise Refused(f"fakehost: nixosConfigurations.{name} does not import ./vm.nix "
                      f"(its modules: {modules})")
    vm = evaluate_vm(vm_file)
    check_vm_config(name, vm)
    if delay:
        time.sleep(delay)
    if fail:
        raise Refused(fail)
    _lock_inputs(directory)
    runner = store / f"{_tree_digest(directory, modules)}-microvm-{name}"
    if not runner.is_dir():
        (runner / "bin").mkdir(parents=True)
        (runner / "share" / "microvm").mkdir(parents=True)
        run = runner / "bin" / "microvm-run"
        run.write_text("#!/bin/sh\necho 'fakehost: this runner is not runnable' >&2\nexit 1\n")
        run.chmod(0o755)
        write_json_atomic(runner / "share" / "microvm" / "guest.json",
                          {"name": name, "flakeref": flakeref, "vm": vm})
        # upstream's runner.nix: `echo ${vsock.cid} > $out/share/microvm/vsock-cid` when it
        # is not null; nix-mariner sets microvm.vsock.cid from mariner.cid
        cid = vsock_cid_of(vm)
        if cid is not None:
            (runner / "share" / "microvm" / "vsock-cid").write_text(f"{cid}\n")
    return runner


def vsock_cid(vm_directory: Path, link: str) -> int | None:
    try:
        return int((vm_directory / link / "share" / "microvm" / "vsock-cid").read_text())
    except (OSError, ValueError):
        return None


def cid_holder(name: str, cid: int | None) -> str | None:
    """Another VM in the state directory that runs with vsock cid `cid` (any user's)."""
    if cid is None:
        return None
    for other in sorted(microvms_dir().iterdir()):
        if other.name == name or other.name.startswith(".") or not other.is_dir():
            continue
        if vsock_cid(other, "booted") == cid and \
                read_unit(other.name).get("state") in ("active", "activating"):
            return other.name
    return None


def guest_config(runner: Path) -> dict:
    return json.loads((runner / "share" / "microvm" / "guest.json").read_text())["vm"]


# -- the unit: start, boot, stop -----------------------------------------------------------

def _now_fields() -> dict:
    return {"enter_monotonic_us": int(time.monotonic() * 1_000_000),
            "enter_timestamp": datetime.now().astimezone().strftime("%a %Y-%m-%d %H:%M:%S %Z")}


def start_unit(name: str) -> None:
    directory = vm_dir(name)
    unit = f"microvm@{name}.service"
    if not directory.is_dir():
        raise Refused(f"Failed to start {unit}: Unit {unit} not found.", 5)
    if not (directory / "current" / "bin" / "microvm-run").exists():
        raise Refused(f"fakehost: {unit}: ConditionPathExists={directory}/current/bin/"
                      f"microvm-run failed (systemd would skip the unit and exit 0)")
    with unit_lock(directory):
        state = read_unit(name)
        if state.get("state") in ("active", "activating"):
            return
        booted = directory / "booted"
        with contextlib.suppress(FileNotFoundError):
            booted.unlink()
        booted.symlink_to(os.readlink(directory / "current"))
        journal(name, "systemd", f"Starting {unit} - MicroVM '{name}'...")
        journal(name, "systemd", f"Started {unit} - MicroVM '{name}'.")
        boot = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "boot", name],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        write_unit(name, state="active", substate="running", result="success",
                   boot_pid=boot.pid, boot_start=_start_time(boot.pid), **_now_fields())


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: with the pid, names one process for good."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _fail_boot(name: str, *messages: str) -> None:
    journal(name, f"microvm@{name}", *messages)
    journal(name, "systemd",
            f"microvm@{name}.service: Main process exited, code=exited, status=1/FAILURE",
            f"microvm@{name}.service: Failed with result 'exit-code'.")
    with contextlib.suppress(FileNotFoundError):
        (vm_dir(name) / "booted").unlink()
    write_unit(name, state="failed", substate="failed", result="exit-code", boot_pid=None,
               enter_monotonic_us=0)


def _ssh_forward(vm: dict) -> tuple[str, int]:
    for entry in _get(vm, "microvm.forwardPorts", []) or []:
        guest = entry.get("guest", {})
        if entry.get("from", "host") == "host" and guest.get("port") == 22:
            host = entry.get("host", {})
            return host.get("address", ""), host.get("port")
    raise Refused("fakehost: only user networking is emulated: the flake has no "
                  "microvm.forwardPorts entry to guest port 22")


def _share_links(vm: dict) -> list[tuple[Path, Path]]:
    if os.environ.get("MARINER_FAKE_NO_SHARES") == "1":
        return []
    return [(Path(s["mountPoint"]), Path(s["source"]))
            for s in effective_shares(vm)
            if s.get("mountPoint") and s.get("source") and s.get("tag") != "ro-store"]


def _mount_shares(name: str, vm: dict) -> list[str]:
    made = []
    for target, source in _share_links(vm):
        if target.is_symlink():
            target.unlink()
        elif target.exists():
            journal(name, f"microvm@{name}", f"fakehost: {target} exists on this machine; "
                    f"share {source} is not emulated")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
        made.append(str(target))
    return made


def _unmount_shares(made: list[str]) -> None:
    for target in made:
        with contextlib.suppress(OSError):
            if os.path.islink(target):
                os.unlink(target)


KEYDIR_PREFIX = "mariner-fakeguest-"


def _collect_stale_keydirs() -> None:
    """Remove key dirs whose VM directory is gone (a test that deleted its microvms dir
    without stopping the unit)."""
    for keydir in Path("/tmp").glob(f"{KEYDIR_PREFIX}*"):
        with contextlib.suppress(OSError):
            owner = (keydir / "owner").read_text()
            if not os.path.isdir(owner):
                shutil.rmtree(keydir, ignore_errors=True)


def _authorized_keys_file(name: str, user: str, key: str) -> tuple[Path, str | None]:
    """sshd reads the file as the guest user: when that is another account than ours, the
    VM's directory (inside a private temp dir) is out of its reach, so use a world-traversable
    directory of its own, removed on stop."""
    import pwd

    try:
        other = pwd.getpwnam(user).pw_uid != os.geteuid()
    except KeyError:
        other = os.geteuid() == 0  # guest_sshd creates the account when root
    if other:
        _collect_stale_keydirs()
        keydir = Path(tempfile.mkdtemp(prefix=f"{KEYDIR_PREFIX}{name}-", dir="/tmp"))
        keydir.chmod(0o755)
        (keydir / "owner").write_text(str(vm_dir(name)))
    else:
        keydir = vm_dir(name) / "guest"
        keydir.mkdir(parents=True, exist_ok=True)
    path = keydir / "authorized_keys"
    path.write_text(key.strip() + "\n")
    path.chmod(0o644)
    return path, (str(keydir) if other else None)


def boot(name: str) -> int:
    """The background half of `systemctl start`: the guest comes up, or dies trying."""
    directory = vm_dir(name)
    cid = vsock_cid(directory, "booted")
    if cid_holder(name, cid) is not None:
        # vsock cids are global to the kernel: QEMU cannot open its device and exits at once
        with unit_lock(directory):
            state = read_unit(name)
            if state.get("state") != "active" or state.get("boot_pid") != os.getpid():
                return 0
            _fail_boot(name, f"qemu-system-x86_64: -device vhost-vsock-pci,id=vsock0,"
                       f"guest-cid={cid}: vhost-vsock: unable to set guest cid: Address "
                       f"already in use")
        return 0
    time.sleep(knob_seconds("MARINER_FAKE_BOOT_DELAY"))
    if not directory.is_dir():
        return 0
    with unit_lock(directory):
        state = read_unit(name)
        if state.get("state") != "active" or state.get("boot_pid") != os.getpid():
            return 0  # stopped (or restarted) while we slept
        ident = f"microvm@{name}"
        journal(name, ident, "[    0.000000] Linux version 6.6.0 (nixbld@localhost) #1-NixOS SMP",
                "[    0.210000] virtio-fs: tag <workspace> mounted")
        if os.environ.get("MARINER_FAKE_BOOT_FAIL") == "1":
            _fail_boot(name, "[    1.500000] Kernel panic - not syncing: VFS: Unable to mount "
                       "root fs on unknown-block(0,0)",
                       "qemu-system-x86_64: terminating on signal 15 from pid 1 (systemd)")
            return 0
        try:
            vm = guest_config(directory / "booted")
            address, port = _ssh_forward(vm)
            if address != "127.0.0.1":
                raise Refused(f"fakehost: the SSH forward binds host.address {address!r}; "
                              f"mariner must bind 127.0.0.1")
            user = os.environ.get("MARINER_FAKE_GUEST_USER") or _get(vm, "mariner.username", "vm")
            keys, keydir = _authorized_keys_file(name, user, _get(vm, "mariner.ssh.authorizedKey"))
            write_unit(name, keydir=keydir)
            shares = _mount_shares(name, vm)
            write_unit(name, shares=shares)
            proc = subprocess.run(
                [sys.executable, str(GUEST_SSHD), "start", "--port", str(port), "--user", user,
                 "--authorized-keys-file", str(keys), "--state-dir", str(directory / "guest")],
                capture_output=True, text=True)
            if proc.returncode != 0:
                raise Refused(proc.stderr.strip() or "guest sshd failed to start")
        except (Refused, OSError, KeyError, ValueError) as exc:
            _fail_boot(name, f"fakehost: the guest failed to boot: {exc}")
            return 0
        journal(name, ident, f"<<< Welcome to NixOS (fakehost) - {name} >>>",
                f"sshd listening on 127.0.0.1 port 22 (forwarded from 127.0.0.1:{port})",
                f"{name} login: ")
        write_unit(name, boot_pid=None, sshd_port=port)
    return 0


def _halt_guest(name: str, state: dict) -> None:
    directory = vm_dir(name)
    pid = state.get("boot_pid")
    # Still booting: its own session, so the whole group goes; only if that pid is still the
    # boot process (its start time), never a process that got the pid since.
    if pid and state.get("boot_start") is not None \
            and _start_time(pid) == state.get("boot_start"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    if (directory / "guest" / "sshd_config").exists():
        subprocess.run([sys.executable, str(GUEST_SSHD), "stop", "--state-dir",
                        str(directory / "guest")], capture_output=True, text=True)
    _unmount_shares(state.get("shares") or [])
    if state.get("keydir"):
        shutil.rmtree(state["keydir"], ignore_errors=True)


def stop_unit(name: str) -> None:
    directory = vm_dir(name)
    if not directory.is_dir():
        return  # the template unit exists; an instance that never ran stops trivially
    unit = f"microvm@{name}.service"
    with unit_lock(directory):
        state = read_unit(name)
        if state.get("state") not in ("active", "activating", "deactivating"):
            return
        write_unit(name, state="deactivating", substate="stop")
        journal(name, "systemd", f"Stopping {unit} - MicroVM '{name}'...")
        _halt_guest(name, state)
        time.sleep(knob_seconds("MARINER_FAKE_STOP_DELAY"))
        with contextlib.suppress(FileNotFoundError):
            (directory / "booted").unlink()
        journal(name, f"microvm@{name}", "reboot: Power down")
        journal(name, "systemd", f"{unit}: Deactivated successfully.",
                f"Stopped {unit} - MicroVM '{name}'.")
        write_unit(name, state="inactive", substate="dead", boot_pid=None, shares=[],
                   keydir=None, enter_monotonic_us=0, sshd_port=None)


def reset_failed(name: str) -> None:
    directory = vm_dir(name)
    if not directory.is_dir():
        return
    with unit_lock(directory):
        if read_unit(name).get("state") == "failed":
            write_unit(name, state="inactive", substate="dead", result="success")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "boot":
        sys.exit(boot(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "stop":
        sys.exit(stop_unit(sys.argv[2]) or 0)
    print("usage: fakelib.py boot|stop <name>  (internal to the fakehost executables)",
          file=sys.stderr)
    sys.exit(2)
