"""virtiofsd serves the shares as the developer, never as root (issue 9, item 4).

The rendered flake's `virtiofsd-run` is evaluated through the real module system, with
microvm.nix's own option declarations and its own virtiofsd module (which it must override),
and the script that comes out is then run: as root, with the real `setpriv`, against a
stand-in virtiofsd that records who it runs as and the command line it was given.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mariner_dev.config import load_project
from mariner_dev.nixrender import (VIRTIOFSD_MODULE, ShareIdentity, nix_string, render_flake,
                                   write_flake)
from support.tools import SHARED, require_tool

from render_cases import STUB_KEY

DEV = ShareIdentity(uid=4242, gid=4343, guest_uid=1000, guest_gid=100)


def upstream() -> Path:
    src = Path(os.environ.get("MARINER_UPSTREAM_SRC") or SHARED / "upstream" / "src")
    if not (src / "microvm.nix" / "nixos-modules" / "microvm" / "options.nix").is_file():
        pytest.fail(f"the pinned microvm.nix sources are not in {src} "
                    f"(set MARINER_UPSTREAM_SRC)")
    return src


EVAL = """
let
  src = %(src)s;
  lib = import (src + "/nixpkgs-lib/lib");
  drv = name: path: { type = "derivation"; inherit name; outPath = path; };
  pkgs = {
    coreutils = drv "coreutils" %(coreutils)s;
    util-linux = drv "util-linux" %(util_linux)s;
    systemd = drv "systemd" %(systemd)s;
    # what upstream's own virtiofsd-run needs to be computed (the module system reads each
    # definition's priority, so it is evaluated even when mariner's mkForce wins)
    python3Packages.supervisor = drv "supervisor" "/stub/supervisor";
    writers.writePython3 = name: args: text: "/stub/${name}";
    replaceVars = path: vars: "/stub/replaced";
    writeText = name: text: "/stub/${name}";
  };
  vm = import (%(flake)s + "/vm.nix") { inherit lib pkgs; config = { }; };
  flakeModules = (import (%(flake)s + "/flake.nix")).outputs {
    self = { };
    mariner = { inputs.nixpkgs.lib.nixosSystem = args: args; nixosModules.default = { }; };
  };
  modules = (builtins.head (builtins.attrValues flakeModules.nixosConfigurations)).modules;
  eval = lib.evalModules {
    specialArgs = { inherit pkgs; };
    modules = [
      (src + "/microvm.nix/nixos-modules/microvm/options.nix")
      (src + "/microvm.nix/nixos-modules/microvm/virtiofsd")
      (src + "/microvm.nix/nixos-modules/microvm/vsock-ssh.nix")
      {
        options.networking.hostName = lib.mkOption { type = lib.types.str; };
        options.services.openssh.enable = lib.mkOption { type = lib.types.bool; default = false; };
        options.assertions = lib.mkOption {
          type = lib.types.listOf lib.types.unspecified; default = [ ];
        };
        config = {
          networking.hostName = vm.networking.hostName;
          microvm.hypervisor = vm.microvm.hypervisor;
          microvm.shares = vm.microvm.shares;
          microvm.vsock.ssh.enable = vm.microvm.vsock.ssh.enable;
          microvm.vsock.cid = %(cid)s;   # nix-mariner's vm.nix: vsock.cid = config.mariner.cid
          microvm.virtiofsd.package = drv "virtiofsd" %(virtiofsd)s;
          microvm.virtiofsd.group = %(group)s;
          microvm.virtiofsd.threadPoolSize = 3;
        };
      }
    ] ++ builtins.filter (m: builtins.typeOf m == "path" && baseNameOf m == "%(module)s") modules
      ++ %(extra)s;
  };
in {
  script = eval.config.microvm.binScripts.virtiofsd-run;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) eval.config.assertions);
  sockets = map (s: s.socket) eval.config.microvm.shares;
  vsockSsh = eval.config.microvm.vsock.ssh.enable;
  openssh = eval.config.services.openssh.enable;
}
"""


def evaluate(flake: Path, *, bins: Path, group: str = '"nogroup"', extra: str = "[ ]",
             cid: str = "vm.mariner.cid") -> dict:
    nix = require_tool("nix-instantiate")
    expr = EVAL % {
        "src": f"(/. + {nix_string(str(upstream()))})", "flake": f"(/. + {nix_string(str(flake))})",
        "coreutils": nix_string("/usr"), "util_linux": nix_string("/usr"),
        "systemd": nix_string(str(bins.parent)), "virtiofsd": nix_string(str(bins.parent)),
        "group": group, "module": VIRTIOFSD_MODULE, "extra": extra, "cid": cid}
    proc = subprocess.run([nix, "--eval", "--strict", "--json", "-E", expr],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


FAKE_VIRTIOFSD = """#!/usr/bin/python3
import json, os, signal, socket, sys, time
args = sys.argv[1:]
path = next(a.split("=", 1)[1] for a in args if a.startswith("--socket-path="))
record = {"argv": args, "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
          "groups": sorted(os.getgroups()), "umask": os.umask(0o007)}
with open(os.path.join(os.environ["FAKE_RECORD"], os.path.basename(path) + ".json"), "w") as fh:
    json.dump(record, fh)
if os.environ.get("FAKE_FAIL") == os.path.basename(path):
    sys.exit(3)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(1)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(1)
"""


@pytest.fixture
def rig(tmp_path):
    """A world-readable scratch directory (the dropped virtiofsd must reach its binary and
    write its record), fake bin/virtiofsd and bin/systemd-notify, and a project."""
    base = Path(tempfile.mkdtemp(prefix="mrv-", dir="/tmp"))
    os.chmod(base, 0o755)
    bins = base / "bin"
    bins.mkdir()
    (bins / "virtiofsd").write_text(FAKE_VIRTIOFSD)
    (bins / "systemd-notify").write_text(
        '#!/bin/sh\n{ echo "$*"; ls "$FAKE_SOCKETS"; } > "$FAKE_RECORD/notify.new"\n'
        'mv "$FAKE_RECORD/notify.new" "$FAKE_RECORD/notify"\n')   # whole, for the reader
    for exe in bins.iterdir():
        exe.chmod(0o755)
    record = base / "record"
    record.mkdir(mode=0o777)
    record.chmod(0o777)
    project = tmp_path / "proj dir"
    (project / "data").mkdir(parents=True)
    (tmp_path / "rw").mkdir()
    (project / "mariner.toml").write_text(
        '[vm]\nname = "vfs"\n[network]\nmode = "user"\n'
        '[[shares]]\nsource = "data"\ntarget = "/data"\n'
        f'[[shares]]\nsource = "{tmp_path / "rw"}"\ntarget = "/rw"\nreadonly = false\n')
    yield base, bins, record, project
    shutil.rmtree(base, ignore_errors=True)


def render(project: Path, out: Path, ids: ShareIdentity | None, socket_dir: str | None = None):
    cfg = load_project(project_dir=project)
    flake = render_flake(cfg, cid=9, ssh_port=2222, public_key=STUB_KEY, share_identity=ids,
                         socket_dir=socket_dir)
    return cfg, write_flake(flake, out)


def test_the_script_overrides_upstream_and_drops_to_the_developer(rig):
    if os.geteuid() != 0:
        pytest.fail("this test runs the script as root, as the host module does (CI runs as root)")
    base, bins, record, project = rig
    sockets = base / "run" / "vfs"
    cfg, flake = render(project, base / "flake", DEV, socket_dir=str(sockets))
    result = evaluate(flake, bins=bins)
    assert result["failed"] == []
    script = result["script"]
    assert "supervisord" not in script and "--posix-acl" not in script
    assert result["sockets"] == [f"{sockets}/0.sock", f"{sockets}/1.sock", f"{sockets}/2.sock"]

    runner = base / "virtiofsd-run"
    runner.write_text("#!/bin/bash\n" + script)
    runner.chmod(0o755)
    env = dict(os.environ, FAKE_RECORD=str(record), FAKE_SOCKETS=str(sockets),
               NOTIFY_SOCKET="/run/fake-notify", PATH="/usr/bin:/bin")
    proc = subprocess.Popen([str(runner)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (record / "notify").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no readiness notification"
            time.sleep(0.05)
        # readiness only once every socket exists
        notified = (record / "notify").read_text().split()
        assert notified[0] == "--ready" and sorted(notified[1:]) == ["0.sock", "1.sock", "2.sock"]
        st = os.stat(sockets)
        assert (st.st_uid, oct(st.st_mode & 0o7777)) == (DEV.uid, "0o750")
        assert st.st_gid == __import__("grp").getgrnam("nogroup").gr_gid

        seen = {p.stem: json.loads(p.read_text()) for p in record.glob("*.json")}
        assert set(seen) == {"0.sock", "1.sock", "2.sock"}
        nogroup = __import__("grp").getgrnam("nogroup").gr_gid
        for name, run in seen.items():
            # the developer, not root, with only the socket group besides their own
            assert (run["uid"], run["euid"], run["gid"]) == (DEV.uid, DEV.uid, DEV.gid)
            assert run["groups"] == [nogroup]
            argv = run["argv"]
            assert argv[:2] == [f"--socket-path={sockets}/{name}", "--socket-group=nogroup"]
            assert "--sandbox=none" in argv and "--xattr" in argv
            assert "--posix-acl" not in argv
            for flag in ("--translate-uid=squash-guest:0:4242:4294967295",
                         "--translate-gid=squash-guest:0:4343:4294967295",
                         "--translate-uid=host:4242:1000:1", "--translate-gid=host:4343:100:1"):
                assert flag in argv, (flag, argv)
            assert argv[argv.index("--thread-pool-size") + 1] == "3"
        shared = {name: next(a.split("=", 1)[1] for a in run["argv"]
                             if a.startswith("--shared-dir=")) for name, run in seen.items()}
        assert shared["0.sock"] == str(project) and shared["1.sock"] == str(project / "data")
        assert shared["2.sock"] == str(cfg.shares[1].source)
        readonly = {name for name, run in seen.items() if "--readonly" in run["argv"]}
        assert readonly == {"1.sock"}    # the workspace and readonly = false are writable
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    for name in seen:     # SIGTERM to the script stopped every daemon
        assert not _listening(sockets / name)


def _listening(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def test_one_daemon_failing_fails_the_unit(rig):
    base, bins, record, project = rig
    sockets = base / "run" / "vfs"
    _, flake = render(project, base / "flake", DEV, socket_dir=str(sockets))
    runner = base / "virtiofsd-run"
    runner.write_text("#!/bin/bash\n" + evaluate(flake, bins=bins)["script"])
    runner.chmod(0o755)
    env = dict(os.environ, FAKE_RECORD=str(record), FAKE_SOCKETS=str(sockets),
               FAKE_FAIL="1.sock", PATH="/usr/bin:/bin")
    proc = subprocess.run([str(runner)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "exited" in proc.stderr
    assert not (record / "notify").exists()     # never reported ready


def test_a_module_share_outside_the_socket_directory_fails_evaluation(rig):
    """A share added by a [nix] module keeps upstream's relative socket, which virtiofsd could
    not create as the developer: an assertion names it instead of a VM that cannot start."""
    base, bins, record, project = rig
    _, flake = render(project, base / "flake", DEV)
    extra = ('[ { microvm.shares = [ { proto = "virtiofs"; tag = "extra"; source = "/srv"; '
             'mountPoint = "/srv"; } ]; } ]')
    result = evaluate(flake, bins=bins, extra=extra)
    assert len(result["failed"]) == 1 and "extra" in result["failed"][0]
    assert "/run/mariner-virtiofs/vfs" in result["failed"][0]


def test_the_default_socket_directory_fits_a_socket_path(rig):
    base, bins, record, project = rig
    _, flake = render(project, base / "flake", DEV)
    sockets = evaluate(flake, bins=bins)["sockets"]
    assert sockets[0] == "/run/mariner-virtiofs/vfs/0.sock"
    longest = "/run/mariner-virtiofs/" + "n" * 63 + "/999.sock"
    assert len(longest.encode()) < 108


def test_a_root_developer_keeps_upstreams_virtiofsd(rig):
    """When the developer is root there is nothing to drop: the VM starts as before."""
    base, bins, record, project = rig
    for ids in (None, ShareIdentity(uid=0, gid=0, guest_uid=1000, guest_gid=100)):
        cfg, flake = render(project, base / f"flake-{ids is None}", ids)
        assert not (flake / VIRTIOFSD_MODULE).exists()
        assert VIRTIOFSD_MODULE not in (flake / "flake.nix").read_text()
        assert 'socket = "virtiofs-workspace.sock"' in (flake / "vm.nix").read_text()
    # and upstream's script is what the module system then yields
    script = evaluate(flake, bins=bins)["script"]
    assert script.strip().startswith("exec /stub/supervisor/bin/supervisord --configuration")


def test_render_for_serves_shares_as_the_project_owner(tmp_path):
    """`up`'s render takes the developer from the developer identity: as root, the owner of
    the project directory (SUDO_UID under sudo)."""
    from mariner_dev.project import render_for
    from mariner_dev.state import VmRecord

    project = tmp_path / "p"
    project.mkdir()
    (project / "mariner.toml").write_text('[vm]\nname = "own"\nuid = 1000\n')
    if os.geteuid() == 0:
        os.chown(project, 4242, 4343)
    cfg = load_project(project_dir=project)
    flake = render_for(cfg, VmRecord(name="own", project=str(project),
                                     config_file=str(cfg.config_file), cid=9,
                                     network_mode="bridge"))
    module = flake.files[VIRTIOFSD_MODULE].decode()
    uid = 4242 if os.geteuid() == 0 else os.getuid()
    assert f"--reuid={uid}" in module and f"squash-guest:0:{uid}:4294967295" in module
    assert f"host:{uid}:1000:1" in module


def test_the_guests_sshd_listens_on_vsock(rig):
    """microvm.nix's vsock-ssh module is on (sshd answers on vsock::22 through systemd's
    ssh-generator), so the first host-key pin can be taken over AF_VSOCK; a render whose cid
    is nulled (no vhost-vsock) must turn it off too, or evaluation fails by name."""
    base, bins, record, project = rig
    _, flake = render(project, base / "flake", DEV)
    result = evaluate(flake, bins=bins)
    assert result["vsockSsh"] is True and result["openssh"] is True
    assert result["failed"] == []
    result = evaluate(flake, bins=bins, cid="lib.mkForce null")
    assert result["failed"] == ["microvm.vsock.ssh.enable requires microvm.vsock.cid to be set"]
    result = evaluate(flake, bins=bins, cid="lib.mkForce null",
                      extra="[ { microvm.vsock.ssh.enable = lib.mkForce false; } ]")
    assert result["failed"] == [] and result["vsockSsh"] is False


def test_through_the_whole_module_set(rig):
    """The same render through nix-mariner's and microvm.nix's whole module set (the fast
    suite's real-module evaluation): no failed assertion, mariner's script wins over the
    supervisord one, one virtiofsd per virtiofs share as the developer, sshd on vsock."""
    from support.upstream import evaluate_one

    base, bins, record, project = rig
    _, flake = render(project, base / "flake", DEV)
    result = evaluate_one(flake)
    assert result["failedAssertions"] == []
    assert result["vsockSsh"] is True and result["cid"] == 9
    assert "supervisord" not in result["virtiofsdRunText"]
    assert "--reuid=4242 --regid=4343" in result["virtiofsdRunText"]
    virtiofs = [s for s in result["shares"] if s["proto"] == "virtiofs"]
    assert sorted(result["virtiofsd"]) == sorted(s["tag"] for s in virtiofs)
    for share in virtiofs:
        argv = result["virtiofsd"][share["tag"]]
        assert argv[0] == "/nix/store/stub-virtiofsd/bin/virtiofsd"
        assert f"--shared-dir={share['source']}" in argv
        assert share["socket"].startswith("/run/mariner-virtiofs/vfs/")
        assert "--translate-uid=squash-guest:0:4242:4294967295" in argv
        assert "--posix-acl" not in argv
        assert ("--readonly" in argv) == share["readOnly"]
