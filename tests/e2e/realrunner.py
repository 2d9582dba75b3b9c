"""The e2e tier's runner backend: the fake `nix build` of tests/fakehost (fakerunner.py), except
that the runner it produces boots the Debian guest under real QEMU and serves each share with
Debian's virtiofsd. mariner's own supervisor (mariner_dev/host/supervisor.py) runs them, so its
start order, readiness wait, clean shutdown, crash detection and restart meet real processes.

    bin/microvm-run      execs QEMU (realhost.qemu_argv: the same machine as the microvm
                         backend's e2e VM) in the working directory mariner gives it, the VM's
                         state directory: disk.qcow2 (an overlay on the cached image, kept
                         across down/up) and .e2e/config.json live there, QMP listens on
                         <hostName>.sock and each share's chardev connects to the socket
                         microvm.nix names (virtiofs-<tag>.sock), both relative to it
    bin/virtiofsd-run    supervisord's stand-in: refuses a non-root user without `-u` (as the
                         real one, whose config says user = root), starts
                         /usr/lib/qemu/virtiofsd per share on its socket, and stays until
                         SIGTERM (each virtiofsd exits when QEMU disconnects)
    bin/microvm-shutdown fakerunner's, which speaks upstream's protocol to QEMU's real QMP:
                         qmp_capabilities, Ctrl-Alt-Del key events, wait until the socket closes
                         (the guest reboots; QEMU runs with -no-reboot, so it exits)

Environment: MARINER_E2E_IMAGE, MARINER_E2E_ACCEL (see realhost.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

E2E = Path(__file__).resolve().parent
sys.path.insert(0, str(E2E.parent / "fakehost"))

import fakelib  # noqa: E402
import fakerunner  # noqa: E402
import realhost  # noqa: E402
from fakelib import Refused  # noqa: E402

fakerunner.PROGRAMS = ("realrunner", E2E)
shutdown_vm = fakerunner.shutdown_vm


def nix_main(argv: list[str]) -> int:
    fakerunner.PROGRAMS = ("realrunner", E2E)
    fakelib.build = realhost.build  # plus the evaluation through the real modules
    return fakerunner.nix_main(argv)


def run_vm(runner: str, argv: list[str]) -> int:
    runner = Path(runner)
    if argv:
        raise Refused(f"e2e runner: microvm-run takes no arguments, got {argv}")
    vm = fakelib.guest_config(runner)
    name = fakerunner._host_name(runner)
    if fakelib.vsock_cid_of(vm) is not None and not os.access("/dev/vhost-vsock", os.W_OK):
        raise Refused("qemu-system-x86_64: -device vhost-vsock-pci: vhost-vsock: failed to "
                      "open vhost device: No such file or directory")
    spec = realhost.guest_spec(name, realhost.evaluated_config(runner))
    image = realhost.image_dir()
    cwd = Path.cwd()
    disk = realhost.ensure_disk(cwd, image)
    (cwd / realhost.CONFIG_DIR).mkdir(exist_ok=True)
    config = cwd / realhost.CONFIG_DIR / "config.json"
    fakelib.write_json_atomic(config, spec.guest_config())
    sockets = {s["tag"]: s.get("socket") or f"{name}-virtiofs-{s['tag']}.sock"
               for s in fakelib.effective_shares(vm) if s.get("proto") == "virtiofs"}
    argv = realhost.qemu_argv(name, spec, image, disk, config, cwd, realhost.accelerator(),
                              qmp=f"{name}.sock", sockets=[sockets[s.tag] for s in spec.shares])
    print(f"e2e runner: {' '.join(argv)}", flush=True)
    os.execvp(argv[0], argv)


def run_virtiofsd(runner: str, argv: list[str]) -> int:
    runner = Path(runner)
    fakerunner.check_supervisord_args(argv, "e2e")
    base = runner / "share" / "microvm" / "virtiofs"
    children = []
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    for tag in sorted(os.listdir(base)):
        sock = (base / tag / "socket").read_text().strip()
        source = (base / tag / "source").read_text().strip()
        with open(f".virtiofsd-{tag}.log", "ab") as log:
            children.append(subprocess.Popen(
                _as_this_user([realhost.VIRTIOFSD, f"--socket-path={sock}",
                               "-o", f"source={source}", "-o", "cache=auto"], tag),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        print(f"virtiofsd-{tag}: started (pid {children[-1].pid}) on {sock}", flush=True)
    while not stopping:
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


def _as_this_user(argv: list[str], tag: str) -> list[str]:
    """Debian's C virtiofsd insists on root for its sandbox and switches to each guest
    request's ids; the nixpkgs virtiofsd a real runner starts runs as the developer. As a user,
    run it in a user namespace that maps the user's own ids to themselves, with the namespace's
    capabilities kept: files of the guest user (the developer's uid) are the developer's, as
    with the real one (guest root, unmapped here, can create nothing), and its lock file goes
    to a private /run."""
    if os.geteuid() == 0:
        return argv
    private_run = Path(f".virtiofsd-{tag}.run").absolute()
    private_run.mkdir(exist_ok=True)
    return ["unshare", "--user", f"--map-user={os.getuid()}", f"--map-group={os.getgid()}",
            "--keep-caps", "--mount", "sh", "-c", 'mount --bind "$0" /run && exec "$@"',
            str(private_run), *argv]
