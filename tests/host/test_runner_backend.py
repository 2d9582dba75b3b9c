"""The runner backend (host/userhost.py, host/supervisor.py) and its choice (host/choice.py):
VMs built with the fake `nix` and run as the user under mariner's own supervisor, the real-sshd
guest booted by the fake runner. Lifecycle commands on both backends: tests/lifecycle."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from mariner_dev import doctor
from mariner_dev.errors import HostError, UsageError
from mariner_dev.host import choice, supervisor
from mariner_dev.host.nixerror import NixBuildError
from mariner_dev.host.userhost import RunnerHost, state_root
from support.fakehost import fakehost, render_vm, wait_for, write_project  # noqa: F401
from support.guest_sshd import free_port, port_open


# -- choosing the backend ---------------------------------------------------------------------

def test_env_wins_over_the_user_config(monkeypatch):
    monkeypatch.setenv("MARINER_BACKEND", "runner")
    assert choice.choose("microvm").name == "runner"
    monkeypatch.delenv("MARINER_BACKEND")
    assert choice.choose("microvm") == choice.Choice("microvm", "microvm",
                                                     "[host] backend = microvm")


def test_unknown_env_value_is_bad_usage(monkeypatch):
    monkeypatch.setenv("MARINER_BACKEND", "docker")
    with pytest.raises(UsageError, match="MARINER_BACKEND='docker'.*auto, microvm, runner"):
        choice.choose(None)


def test_user_config_sets_the_backend(monkeypatch):
    monkeypatch.delenv("MARINER_BACKEND")
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[host]\nbackend = "runner"\n')
    assert choice.user_setting() == "runner"
    from mariner_dev.lifecycle import default_backend

    assert isinstance(default_backend(), RunnerHost)


def test_auto_without_the_host_module_picks_runner_or_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("MARINER_BACKEND")
    monkeypatch.setattr(choice, "UNIT_DIRS", (str(tmp_path / "units"),))
    monkeypatch.setattr(choice, "runner_missing", lambda: [])
    picked = choice.choose(None)
    assert picked.name == "runner" and "microvm@.service" in picked.reason
    monkeypatch.setattr(choice, "runner_missing", lambda: ["read-write access to /dev/kvm"])
    with pytest.raises(HostError, match="read-write access to /dev/kvm") as info:
        choice.choose(None)
    assert "mariner doctor" in info.value.hint
    assert choice.choose(None, strict=False).name == "runner"


def test_auto_picks_microvm_where_the_host_module_is(monkeypatch, tmp_path, fakehost):
    monkeypatch.delenv("MARINER_BACKEND")
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "microvm@.service").write_text("")
    monkeypatch.setattr(choice, "UNIT_DIRS", (str(tmp_path / "units"),))
    assert choice.choose(None).name == "microvm"  # fake microvm and systemctl on PATH


# -- config: network mode and [host] ------------------------------------------------------------

def test_runner_defaults_to_user_networking_and_refuses_bridge(run_cli, tmp_path, monkeypatch):
    project = tmp_path / "p"
    project.mkdir()
    (project / "mariner.toml").write_text('[vm]\nname = "p"\n')

    def validate(backend: str) -> tuple[int, str, str]:
        monkeypatch.setenv("MARINER_BACKEND", backend)
        return run_cli("validate", "--json", cwd=project)

    code, out, _ = validate("runner")
    assert code == 0 and json.loads(out)["config"]["network"]["mode"] == "user"
    code, out, _ = validate("microvm")
    assert code == 0 and json.loads(out)["config"]["network"]["mode"] == "bridge"
    (project / "mariner.toml").write_text('[vm]\nname = "p"\n[network]\nmode = "bridge"\n')
    code, out, _ = validate("runner")
    assert code == 2
    problems = json.loads(out)["errors"]
    assert [p["key"] for p in problems] == ["network.mode"]
    assert "only root" in problems[0]["message"] and "MARINER_BACKEND=microvm" in problems[0]["message"]


def test_host_table_only_in_the_per_user_config(run_cli, tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    (project / "mariner.toml").write_text('[vm]\nname = "p"\n[host]\nbackend = "runner"\n')
    code, out, _ = run_cli("validate", "--json", cwd=project)
    assert code == 2
    problem, = json.loads(out)["errors"]
    assert problem["key"] == "host" and "per-user config" in problem["message"]
    assert problem["line"] == 3


# -- rendering for the runner backend ----------------------------------------------------------

def test_runner_render_nulls_vsock_forces_a_read_only_store_and_drops_the_socket_group(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MARINER_BACKEND", "runner")
    monkeypatch.setattr(choice, "vhost_vsock_usable", lambda: False)
    write_project(tmp_path / "p", "rv", ssh_port=free_port())
    flake = render_vm(tmp_path / "p", tmp_path / "flake", cid=9, ssh_port=2222,
                      public_key="ssh-ed25519 AAAA test")
    vm = (flake / "vm.nix").read_text()
    assert "microvm.vsock.cid = lib.mkForce null;" in vm
    assert "microvm.vsock.ssh.enable = lib.mkForce false;" in vm
    assert "microvm.virtiofsd.group = null;" in vm
    assert "microvm.shares = lib.mkForce [" in vm
    store = vm.split("microvm.shares = lib.mkForce [", 1)[1].split("}", 1)[0]
    assert 'tag = "ro-store"' in store and 'source = "/nix/store"' in store
    assert "readOnly = true;" in store
    monkeypatch.setattr(choice, "vhost_vsock_usable", lambda: True)
    flake = render_vm(tmp_path / "p", tmp_path / "flake2", cid=9, ssh_port=2222,
                      public_key="ssh-ed25519 AAAA test")
    assert "microvm.vsock.cid" not in (flake / "vm.nix").read_text()


def test_microvm_render_leaves_nix_mariners_shares_alone(tmp_path):
    write_project(tmp_path / "p", "mv", ssh_port=free_port())
    flake = render_vm(tmp_path / "p", tmp_path / "flake", cid=9, ssh_port=2222,
                      public_key="ssh-ed25519 AAAA test")
    vm = (flake / "vm.nix").read_text()
    assert "mkForce [" not in vm and "ro-store" not in vm and "vsock.cid" not in vm


# -- the backend against the fake nix and its runner -----------------------------------------

@pytest.fixture
def vm(fakehost, tmp_path, monkeypatch):
    """A rendered runner-mode VM flake and the backend that runs it."""
    monkeypatch.setenv("MARINER_BACKEND", "runner")
    port = free_port()
    write_project(tmp_path / "proj", "rvm", ssh_port=port)
    key = (tmp_path / "id.pub")
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1u7sBfK8zQ1kY9Vn1tYf6m7hW3o9QJ1xk0a8b2c3d4 t\n")
    flake = render_vm(tmp_path / "proj", tmp_path / "flake", cid=7, ssh_port=port,
                      public_key=key.read_text().strip())
    return {"backend": RunnerHost(), "flake": flake, "port": port, "name": "rvm",
            "fakehost": fakehost}


def _booted(vm):
    """Create and start the VM and wait for its guest's sshd: (backend, name, port)."""
    host, name, port = vm["backend"], vm["name"], vm["port"]
    host.create(name, vm["flake"])
    host.start(name)
    wait_for(lambda: port_open(port), 20, "the guest's sshd")
    return host, name, port


def _records(fakehost, prog):
    return [r for r in fakehost.records() if r["prog"] == prog]


def test_create_builds_into_a_private_state_dir(vm):
    host, name = vm["backend"], vm["name"]
    host.create(name, vm["flake"])
    directory = state_root() / name
    assert directory == Path(os.environ["XDG_DATA_HOME"]) / "mariner" / "vms" / name
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert (directory / "flake").read_text().strip() == f"path:{vm['flake']}"
    assert (directory / "current" / "bin" / "microvm-run").exists()
    status = host.status(name)
    assert status.exists and status.unit == "inactive" and status.current
    build, = _records(vm["fakehost"], "nix")
    assert build["argv"] == ["--extra-experimental-features", "nix-command flakes", "build", "-o",
                             str(directory / "current"),
                             f"path:{vm['flake']}#nixosConfigurations.{name}.config.microvm."
                             f"declaredRunner"]
    with pytest.raises(HostError, match="already exists"):
        host.create(name, vm["flake"])


def test_a_failed_first_build_leaves_no_vm_and_names_the_key(vm, monkeypatch):
    monkeypatch.setenv("MARINER_FAKE_BUILD_FAIL",
                       "error: The option `microvm.vsock.cid' has conflicting definition values")
    with pytest.raises(NixBuildError) as info:
        vm["backend"].create(vm["name"], vm["flake"])
    assert info.value.config_key == "vm.cid"
    assert not (state_root() / vm["name"]).exists()
    assert vm["backend"].list_vms() == []


def test_start_runs_virtiofsd_first_then_qemu_in_the_state_dir_and_stop_is_clean(vm):
    host, name, port = _booted(vm)
    directory = state_root() / name
    status = host.status(name)
    assert status.running and status.booted == status.current and status.uptime is not None
    virtiofsd, = _records(vm["fakehost"], "virtiofsd-run")
    qemu, = _records(vm["fakehost"], "microvm-run")
    assert virtiofsd["time"] < qemu["time"]
    assert virtiofsd["cwd"] == qemu["cwd"] == str(directory)
    import getpass

    assert virtiofsd["argv"] == ["-u", getpass.getuser()]  # its config says user = root
    assert qemu["argv"] == []
    assert (directory / "persist.img").exists()  # volumes relative to the working directory
    # the runner it booted from is a GC root while it runs (before the supervisor started it)
    root, = _records(vm["fakehost"], "nix-store")
    assert root["argv"] == ["--realise", os.readlink(directory / "current"),
                            "--add-root", str(directory / "booted"), "--indirect"]
    assert root["time"] < virtiofsd["time"]
    assert os.readlink(directory / "booted") == os.readlink(directory / "current")
    # ... and the supervisor left that link in place (a root whose link goes missing for a
    # moment is dropped by a garbage collection that sees it)
    store = Path(os.environ["MARINER_FAKE_NIX_STORE"])
    link, inode = (store / ".gcroots").read_text().split()
    assert (link, int(inode)) == (str(directory / "booted"), (directory / "booted").lstat().st_ino)
    host.start(name)  # already running: nothing happens
    assert len(_records(vm["fakehost"], "microvm-run")) == 1
    host.stop(name)
    assert not port_open(port)
    assert host.status(name).unit == "inactive" and host.status(name).booted is None
    shutdown, = _records(vm["fakehost"], "microvm-shutdown")
    assert shutdown["cwd"] == str(directory)
    record = supervisor.read_record(str(directory))
    assert record["state"] == "stopped"
    for pid in (record["pid"],):
        assert not supervisor.alive(pid, record["start"])
    assert not list(directory.glob("*.sock"))  # virtiofsd stopped with QEMU
    log = "\n".join(host.logs(name))
    assert "virtiofsd-run started" in log and "Welcome to NixOS" in log and "Power down" in log
    # virtiofsd exits when QEMU disconnects: the next start starts it again
    host.start(name)
    wait_for(lambda: port_open(port), 20, "the guest's sshd after a restart")
    assert len(_records(vm["fakehost"], "virtiofsd-run")) == 2
    host.stop(name)


def test_a_start_whose_supervisor_fails_leaves_no_gc_root(vm, monkeypatch):
    host, name = vm["backend"], vm["name"]
    host.create(name, vm["flake"])

    def fails(self, name, directory):
        raise HostError(f"the supervisor of VM {name} did not start (exit status 1)")

    monkeypatch.setattr(RunnerHost, "_spawn_supervisor", fails)
    with pytest.raises(HostError, match="did not start"):
        host.start(name)
    assert not os.path.lexists(state_root() / name / "booted")
    assert host.status(name).booted is None


def test_a_guest_that_ignores_the_power_button_is_terminated_after_the_timeout(vm, monkeypatch):
    monkeypatch.setenv("MARINER_FAKE_IGNORE_POWER_BUTTON", "1")
    host, name, port = _booted(vm)
    started = time.monotonic()
    host.stop(name, timeout=4)
    assert time.monotonic() - started < 25
    assert host.status(name).unit == "inactive" and not port_open(port)
    log = "\n".join(host.logs(name))
    assert "terminating on signal 15" in log and "stopped" in log.splitlines()[-1]


def test_a_crash_is_failed_with_the_console_tail_and_start_recovers(vm):
    host, name, port = _booted(vm)
    record = supervisor.read_record(str(state_root() / name))
    os.kill(record["qemu_pid"], signal.SIGKILL)
    wait_for(lambda: host.status(name).unit == "failed", 20, "the crash to be recorded")
    tail = host.log_tail(name, 5)
    assert any("QEMU killed by signal 9" in line for line in tail), tail
    host.start(name)
    wait_for(lambda: host.status(name).unit == "active", 20, "the restart")
    host.stop(name)
    assert host.status(name).unit == "inactive"


def test_a_killed_supervisor_is_failed_not_running(vm):
    host, name = vm["backend"], vm["name"]
    host.create(name, vm["flake"])
    host.start(name)
    directory = state_root() / name
    record = supervisor.read_record(str(directory))
    wait_for(lambda: supervisor.read_record(str(directory)).get("qemu_pid"), 20, "QEMU")
    record = supervisor.read_record(str(directory))
    os.killpg(record["pid"], signal.SIGKILL)  # the supervisor and QEMU with it
    wait_for(lambda: host.status(name).unit == "failed", 20, "the dead supervisor to show")
    # a recycled pid would not fool it: the start time must match too
    assert not supervisor.alive(os.getpid(), record["start"])


def test_a_guest_that_never_boots_fails_and_stop_is_a_no_op(vm, monkeypatch):
    monkeypatch.setenv("MARINER_FAKE_BOOT_FAIL", "1")
    host, name = vm["backend"], vm["name"]
    host.create(name, vm["flake"])
    host.start(name)
    wait_for(lambda: host.status(name).unit == "failed", 20, "the failed boot")
    assert any("Kernel panic" in line for line in host.log_tail(name, 10))
    host.stop(name)  # nothing runs: nothing to do, no error
    assert host.status(name).unit == "failed"


def test_virtiofsd_that_cannot_start_fails_the_vm_before_qemu_runs(vm, tmp_path):
    host, name = vm["backend"], vm["name"]
    host.socket_timeout = 3
    host.create(name, vm["flake"])
    # the workspace share's source disappears: its virtiofsd never creates the socket
    source = tmp_path / "proj"
    moved = tmp_path / "moved"
    source.rename(moved)
    try:
        host.start(name)
        wait_for(lambda: host.status(name).unit == "failed", 30, "the virtiofsd failure")
    finally:
        moved.rename(source)
    assert _records(vm["fakehost"], "microvm-run") == []
    assert any("did not create" in line or "exited with status" in line
               for line in host.log_tail(name, 10))


def test_destroy_removes_the_state_dir_and_stops_first(vm):
    host, name, port = _booted(vm)
    host.destroy(name)
    assert not (state_root() / name).exists()
    assert not port_open(port)
    assert host.status(name).exists is False
    host.destroy(name)  # absent: no-op


def test_no_sudo_and_no_microvm_or_systemctl(vm):
    host, name, port = _booted(vm)
    host.stop(name)
    progs = {r["prog"] for r in vm["fakehost"].records()}
    assert progs == {"nix", "nix-store", "virtiofsd-run", "microvm-run", "microvm-shutdown"}


# -- the fake runner is as strict as the real one -----------------------------------------------

def test_fake_runner_refuses_vsock_without_vhost_vsock(vm, monkeypatch, tmp_path):
    """The microvm backend's render keeps nix-mariner's vsock cid: QEMU would fail here."""
    if os.access("/dev/vhost-vsock", os.R_OK | os.W_OK):
        pytest.fail("this check needs a host without /dev/vhost-vsock")  # never skip
    monkeypatch.setattr(choice, "vhost_vsock_usable", lambda: True)
    flake = render_vm(tmp_path / "proj", tmp_path / "flake-vsock", cid=7, ssh_port=vm["port"],
                      public_key="ssh-ed25519 AAAA test")
    host, name = vm["backend"], vm["name"]
    host.create(name, flake)
    host.start(name)
    wait_for(lambda: host.status(name).unit == "failed", 20, "QEMU's refusal")
    assert any("vhost-vsock" in line for line in host.log_tail(name, 10))


def test_fake_supervisord_takes_only_dash_u_and_as_a_user_only_that_user(monkeypatch):
    """virtiofsd-run's supervisord stand-in (fakerunner's; the e2e tier's calls the same check)
    refuses what supervisord refuses: any other option, and as a user any other user, root by
    default (upstream's config says user = root)."""
    import fakerunner
    from fakelib import Refused

    fakerunner.check_supervisord_args(["-u", "someone"])  # root may become anyone
    with pytest.raises(Refused, match=r"option --bogus not recognized \(e2e supervisord\)") as exc:
        fakerunner.check_supervisord_args(["-u", "dev", "--bogus"], "e2e")
    assert exc.value.status == 2
    monkeypatch.setattr(fakerunner.os, "geteuid", lambda: 1234)
    monkeypatch.setattr(fakerunner.getpass, "getuser", lambda: "dev")
    fakerunner.check_supervisord_args(["-u", "dev"])
    fakerunner.check_supervisord_args(["--user", "dev"])
    for argv in ([], ["-u", "root"], ["-u", "someone"]):
        with pytest.raises(Refused, match="Can't drop privilege as nonroot user") as exc:
            fakerunner.check_supervisord_args(argv)
        assert exc.value.status == 2
    with pytest.raises(Refused, match="option -u not recognized"):
        fakerunner.check_supervisord_args(["-u"])  # no user after it


# -- doctor for the runner backend ---------------------------------------------------------------

def test_doctor_on_the_runner_backend(monkeypatch):
    monkeypatch.setenv("MARINER_BACKEND", "runner")
    report = doctor.run_doctor()
    assert report.backend == "runner"
    names = [c.name for c in report.checks]
    assert names == ["backend", "kvm", "nix", "vhost-vsock", "user-namespaces", "newuidmap",
                     "state-dir", "user-net-loopback", "mariner-home", "runtime-dir"]
    assert "microvm" not in names and "sudo" not in names and "bridge" not in names
    for check in report.checks:
        assert "could not run this check" not in check.detail
        assert check.status == "ok" or check.fix


def test_doctor_names_the_apparmor_restriction(tmp_path):
    sysctl = tmp_path / "sys"
    (sysctl / "kernel").mkdir(parents=True)
    (sysctl / "kernel" / "apparmor_restrict_unprivileged_userns").write_text("1\n")
    check = doctor.check_userns(str(sysctl))
    assert check.status == "fail" and check.required
    assert "apparmor_restrict_unprivileged_userns" in check.detail
    assert "userns," in check.fix and "does not fall back" in check.fix
    (sysctl / "kernel" / "apparmor_restrict_unprivileged_userns").write_text("0\n")
    (sysctl / "kernel" / "unprivileged_userns_clone").write_text("0\n")
    check = doctor.check_userns(str(sysctl))
    assert check.status == "fail" and "unprivileged_userns_clone" in check.detail
    (sysctl / "kernel" / "unprivileged_userns_clone").write_text("1\n")
    assert doctor.check_userns(str(sysctl)).status == "ok"


def test_doctor_wants_subordinate_ids_for_a_normal_user(tmp_path, monkeypatch):
    import getpass

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    tools = tmp_path / "tools"
    from support.fakehost import shell_command

    shell_command(tools, "newuidmap", "exit 0")
    shell_command(tools, "newgidmap", "exit 0")
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("someone:100000:65536\n")
    subgid.write_text(f"{getpass.getuser()}:100000:65536\n")
    check = doctor.check_uidmap((str(subuid), str(subgid)))
    assert check.status == "fail" and str(subuid) in check.detail and "usermod" in check.fix
    subuid.write_text(f"{getpass.getuser()}:100000:65536\n")
    assert doctor.check_uidmap((str(subuid), str(subgid))).status == "ok"
    monkeypatch.setenv("PATH", "/nonexistent")
    check = doctor.check_uidmap((str(subuid), str(subgid)))
    assert check.status == "fail" and "apt install uidmap" in check.fix


def test_doctor_state_dir_space(tmp_path, monkeypatch):
    check = doctor.check_runner_state(tmp_path / "a" / "b")
    assert check.status == "ok" and "GiB free" in check.detail
    monkeypatch.setattr(doctor, "MIN_FREE_BYTES", 1 << 62)
    check = doctor.check_runner_state(tmp_path / "a" / "b")
    assert check.status == "fail" and "XDG_DATA_HOME" in check.fix


def test_logs_escape_what_the_guest_prints(tmp_path):
    """The console is the guest's output: an escape sequence must not reach the terminal."""
    host = RunnerHost(root=tmp_path)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "console.log").write_bytes(
        b"ok line\r\n\x1b]0;owned\x07\x1b[2J title\n\xc2\x9b31m c1\n\tkept tab\npartial")
    assert list(host.logs("g")) == ["ok line", "\\x1b]0;owned\\x07\\x1b[2J title",
                                    "\\x9b31m c1", "\tkept tab", "partial"]
    assert list(host.logs("g", lines=2)) == ["\tkept tab", "partial"]


def test_preflight_without_kvm(monkeypatch, tmp_path):
    from mariner_dev.errors import HostUnavailable

    monkeypatch.setenv("MARINER_KVM", str(tmp_path / "no-kvm"))
    with pytest.raises(HostUnavailable, match="no .*no-kvm"):
        RunnerHost().preflight()
    (tmp_path / "no-kvm").write_text("")
    (tmp_path / "no-kvm").chmod(0o400)
    if os.geteuid() != 0:  # root may write it anyway
        with pytest.raises(HostUnavailable, match="read-write access"):
            RunnerHost().preflight()


def test_preflight_names_what_runner_mode_lacks(monkeypatch):
    from mariner_dev.errors import HostUnavailable

    monkeypatch.setattr(choice, "runner_missing", lambda: ["read-write access to /dev/kvm"])
    with pytest.raises(HostUnavailable, match="runner backend cannot run VMs here: no "
                                              "read-write access to /dev/kvm") as info:
        RunnerHost().preflight()
    assert "mariner doctor" in info.value.hint
    monkeypatch.setattr(choice, "runner_missing", lambda: [])
    RunnerHost().preflight()
