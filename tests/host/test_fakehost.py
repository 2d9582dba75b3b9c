"""The fake host refuses what the real microvm, systemctl and journalctl refuse."""

from __future__ import annotations

import json
import os

import pytest

from support import guest_sshd
from support.fakehost import client_key, render_vm, wait_for, write_project


@pytest.fixture
def flake(tmp_path, fakehost):
    port = guest_sshd.free_port()
    key = client_key(tmp_path / "keys")
    write_project(tmp_path / "api", "api", ssh_port=port)
    return render_vm(tmp_path / "api", tmp_path / "flake", cid=7, ssh_port=port,
                     public_key=key.with_name(key.name + ".pub").read_text().strip())


def create(fakehost, flake_ref, name="api"):
    return fakehost.run("microvm", "-c", name, "-f", flake_ref)


def test_every_call_is_logged_with_its_argv(fakehost, flake):
    create(fakehost, f"path:{flake}")
    fakehost.run("systemctl", "is-active", "microvm@api")
    records = fakehost.records()
    assert [r["prog"] for r in records] == ["microvm", "systemctl"]
    assert records[0]["argv"] == ["-c", "api", "-f", f"path:{flake}"]
    assert records[0]["path"].endswith("/tests/fakehost/bin/microvm")


def test_create_writes_upstreams_layout(fakehost, flake):
    result = create(fakehost, f"path:{flake}")
    assert result.returncode == 0, result.stderr
    assert "Created MicroVM api." in result.stdout
    directory = fakehost.vm_dir("api")
    assert (directory / "flake").read_text() == f"path:{flake}"
    assert os.path.islink(directory / "current")
    assert (directory / "current" / "bin" / "microvm-run").is_file()
    assert not os.path.lexists(directory / "booted")


def test_relative_flake_is_refused(fakehost, flake, monkeypatch):
    monkeypatch.chdir(flake.parent)
    result = create(fakehost, f"path:{flake.name}")
    assert result.returncode == 1 and "not absolute" in result.stderr
    assert not fakehost.vm_dir("api").exists()


@pytest.mark.parametrize("ref", ["github:mksafavi/nix-mariner", "/abs/without/scheme"])
def test_only_path_flakes(fakehost, flake, ref):
    result = create(fakehost, ref)
    assert result.returncode == 1 and "only `path:` flakes" in result.stderr


def test_missing_flake_nix_is_refused(fakehost, tmp_path):
    (tmp_path / "empty").mkdir()
    result = create(fakehost, f"path:{tmp_path / 'empty'}")
    assert result.returncode == 1 and "does not contain a '/flake.nix' file" in result.stderr


def test_unparsable_flake_nix_is_refused(fakehost, flake):
    (flake / "flake.nix").write_text("{ outputs = ; }")
    result = create(fakehost, f"path:{flake}")
    assert result.returncode == 1 and "syntax error" in result.stderr


def test_flake_must_define_the_vm_name(fakehost, flake):
    result = create(fakehost, f"path:{flake}", name="other")
    assert result.returncode == 1
    assert "does not provide attribute 'nixosConfigurations.other'" in result.stderr
    assert "(it has: api)" in result.stderr


def test_flake_must_import_vm_nix(fakehost, flake):
    text = (flake / "flake.nix").read_text()
    (flake / "flake.nix").write_text(text.replace("./vm.nix", ""))
    result = create(fakehost, f"path:{flake}")
    assert result.returncode == 1 and "does not import ./vm.nix" in result.stderr


def test_duplicate_create_is_refused(fakehost, flake):
    assert create(fakehost, f"path:{flake}").returncode == 0
    result = create(fakehost, f"path:{flake}")
    assert result.returncode == 1 and "already exists" in result.stdout


def test_update_of_an_unknown_vm_fails(fakehost):
    result = fakehost.run("microvm", "-u", "ghost")
    assert result.returncode == 1 and "No such file or directory" in result.stderr


@pytest.mark.parametrize("args", [["-x"], ["--create", "api"], ["-c"]])
def test_unknown_or_incomplete_flags_fail(fakehost, args):
    assert fakehost.run("microvm", *args).returncode == 1


def test_renamed_option_is_an_evaluation_error(fakehost, flake):
    vm = flake / "vm.nix"
    vm.write_text(vm.read_text().replace("mariner.ssh.authorizedKey", "mariner.hostAuthorizedKey"))
    result = create(fakehost, f"path:{flake}")
    assert result.returncode == 1
    assert "The option `mariner.hostAuthorizedKey' does not exist" in result.stderr


def test_microvm_assertions(fakehost, flake):
    vm = flake / "vm.nix"
    vm.write_text(vm.read_text().replace('microvm.hypervisor = "qemu"',
                                         'microvm.hypervisor = "cloud-hypervisor"')
                  .replace('id = "mariner-user"', 'id = "a-very-long-interface"'))
    result = create(fakehost, f"path:{flake}")
    assert result.returncode == 1 and "Failed assertions:" in result.stderr
    assert "`config.microvm.forwardPorts` works only with qemu" in result.stderr
    assert "longer than the maximum length of 15" in result.stderr


def test_build_fail_knob(fakehost, flake, monkeypatch):
    monkeypatch.setenv("MARINER_FAKE_BUILD_FAIL", "error: something Nix said")
    result = create(fakehost, f"path:{flake}")
    assert (result.returncode, result.stderr.strip()) == (1, "error: something Nix said")
    assert not fakehost.vm_dir("api").exists()


def test_fakes_refuse_to_run_without_a_microvms_dir(fakehost, monkeypatch, flake):
    monkeypatch.delenv("MARINER_MICROVMS_DIR")
    for prog, args in (("microvm", ["-c", "api", "-f", f"path:{flake}"]),
                       ("systemctl", ["start", "microvm@api"]),
                       ("journalctl", ["-u", "microvm@api"])):
        result = fakehost.run(prog, *args)
        assert result.returncode == 1 and "MARINER_MICROVMS_DIR is not set" in result.stderr


def test_systemctl_start_of_an_unknown_vm(fakehost):
    result = fakehost.run("systemctl", "start", "microvm@ghost.service")
    assert result.returncode == 5
    assert "Unit microvm@ghost.service not found." in result.stderr


def test_systemctl_other_units_are_not_found(fakehost):
    assert fakehost.run("systemctl", "start", "sshd.service").returncode == 5
    result = fakehost.run("systemctl", "is-active", "sshd")
    assert (result.returncode, result.stdout) == (3, "inactive\n")


def test_systemctl_is_active_exit_codes(fakehost, flake, monkeypatch):
    create(fakehost, f"path:{flake}")
    result = fakehost.run("systemctl", "is-active", "microvm@api")
    assert (result.returncode, result.stdout) == (3, "inactive\n")
    assert fakehost.run("systemctl", "start", "microvm@api").returncode == 0
    result = fakehost.run("systemctl", "is-active", "microvm@api")
    assert (result.returncode, result.stdout) == (0, "active\n")
    assert fakehost.run("systemctl", "stop", "microvm@api").returncode == 0
    monkeypatch.setenv("MARINER_FAKE_BOOT_FAIL", "1")
    fakehost.run("systemctl", "start", "microvm@api")
    wait_for(lambda: fakehost.unit_state("api") == "failed", what="the unit to fail")
    result = fakehost.run("systemctl", "is-active", "--quiet", "microvm@api")
    assert (result.returncode, result.stdout) == (3, "")
    result = fakehost.run("systemctl", "status", "microvm@api")
    assert result.returncode == 3 and "Active: failed" in result.stdout


def test_systemctl_show(fakehost, flake):
    create(fakehost, f"path:{flake}")
    fakehost.run("systemctl", "start", "microvm@api")
    result = fakehost.run("systemctl", "show", "-p", "ActiveState", "--property=SubState,Id",
                          "microvm@api", "microvm@ghost")
    blocks = [dict(line.split("=", 1) for line in block.splitlines())
              for block in result.stdout.strip().split("\n\n")]
    assert blocks == [
        {"ActiveState": "active", "SubState": "running", "Id": "microvm@api.service"},
        {"ActiveState": "inactive", "SubState": "dead", "Id": "microvm@ghost.service"}]
    value = fakehost.run("systemctl", "show", "--value", "-p", "ActiveEnterTimestampMonotonic",
                         "microvm@api")
    assert int(value.stdout) > 0


def test_systemctl_unknown_flag_fails(fakehost):
    result = fakehost.run("systemctl", "--user", "start", "microvm@api")
    assert result.returncode == 1 and "unrecognized option '--user'" in result.stderr


def test_journalctl(fakehost, flake):
    assert fakehost.run("journalctl", "-u", "microvm@api", "--no-pager").stdout \
        == "-- No entries --\n"
    create(fakehost, f"path:{flake}")
    fakehost.run("systemctl", "start", "microvm@api")
    fakehost.run("systemctl", "stop", "microvm@api")
    result = fakehost.run("journalctl", "-u", "microvm@api.service", "-n", "1")
    assert result.stdout.rstrip().endswith("Stopped microvm@api.service - MicroVM 'api'.")
    assert fakehost.run("journalctl", "-u", "microvm@api", "--since", "today").returncode == 1
    assert fakehost.run("journalctl", "-u", "microvm@api", "-n", "x").returncode == 1
    assert fakehost.run("journalctl", "-n", "3").returncode == 1  # no unit


def test_guest_ssh_must_stay_on_loopback(fakehost, flake):
    vm = flake / "vm.nix"
    vm.write_text(vm.read_text().replace('address = "127.0.0.1"', 'address = "0.0.0.0"'))
    assert create(fakehost, f"path:{flake}").returncode == 0
    fakehost.run("systemctl", "start", "microvm@api")
    wait_for(lambda: fakehost.unit_state("api") == "failed", what="the unit to fail")
    assert "mariner must bind 127.0.0.1" in fakehost.journal("api")


def test_bridge_mode_is_not_emulated(fakehost, tmp_path):
    key = client_key(tmp_path / "keys")
    project = tmp_path / "br"
    project.mkdir()
    (project / "mariner.toml").write_text('[vm]\nname = "br"\n')
    flake = render_vm(project, tmp_path / "flake-br", cid=9, ssh_port=None,
                      public_key=key.with_name(key.name + ".pub").read_text().strip())
    assert create(fakehost, f"path:{flake}", name="br").returncode == 0
    fakehost.run("systemctl", "start", "microvm@br")
    wait_for(lambda: fakehost.unit_state("br") == "failed", what="the unit to fail")
    assert "only user networking is emulated" in fakehost.journal("br")


def test_build_snapshot_is_what_boots(fakehost, flake):
    """A flake edited after the build does not reach the guest until `microvm -u`."""
    create(fakehost, f"path:{flake}")
    guest = json.loads((fakehost.vm_dir("api") / "current" / "share" / "microvm"
                        / "guest.json").read_text())
    assert guest["vm"]["mariner"]["cid"] == 7
    vm = flake / "vm.nix"
    vm.write_text(vm.read_text().replace("mariner.cid = 7;", "mariner.cid = 8;"))
    guest = json.loads((fakehost.vm_dir("api") / "current" / "share" / "microvm"
                        / "guest.json").read_text())
    assert guest["vm"]["mariner"]["cid"] == 7
    assert fakehost.run("microvm", "-u", "api").returncode == 0
    guest = json.loads((fakehost.vm_dir("api") / "current" / "share" / "microvm"
                        / "guest.json").read_text())
    assert guest["vm"]["mariner"]["cid"] == 8


def test_stale_guest_key_dirs_are_collected(fakehost, flake, tmp_path):
    """As root the guest's authorized_keys live in /tmp (the guest account cannot reach the
    VM dir); a key dir whose VM directory vanished without a stop is removed at the next boot."""
    import tempfile
    from pathlib import Path

    stale = Path(tempfile.mkdtemp(prefix="mariner-fakeguest-gone-", dir="/tmp"))
    (stale / "owner").write_text(str(tmp_path / "no-such-vm-dir"))
    create(fakehost, f"path:{flake}")
    fakehost.run("systemctl", "start", "microvm@api")
    wait_for(lambda: fakehost.unit_record("api").get("sshd_port"), what="the guest's sshd")
    keydir = fakehost.unit_record("api").get("keydir")
    if os.geteuid() == 0:
        assert not stale.exists()
        assert keydir and (Path(keydir) / "authorized_keys").is_file()
    else:  # the guest account is ours: the keys stay in the VM dir
        assert stale.exists() and keydir is None
        stale.joinpath("owner").unlink()
        stale.rmdir()
    fakehost.run("systemctl", "stop", "microvm@api")
    assert keydir is None or not os.path.exists(keydir)


def test_runner_records_its_vsock_cid_and_a_taken_cid_fails_the_start(fakehost, flake,
                                                                      tmp_path):
    """As upstream's runner.nix: `share/microvm/vsock-cid`; vsock cids are global to the
    kernel, so a second running VM with the same cid (any user's) cannot start."""
    create(fakehost, f"path:{flake}")
    cid_file = fakehost.vm_dir("api") / "current" / "share" / "microvm" / "vsock-cid"
    assert cid_file.read_text() == "7\n"
    # another VM in the state directory runs with cid 7
    other = fakehost.vm_dir("other")
    (other / "run" / "share" / "microvm").mkdir(parents=True)
    (other / "run" / "share" / "microvm" / "vsock-cid").write_text("7\n")
    (other / "booted").symlink_to(other / "run")
    (other / ".fake-unit.json").write_text(json.dumps({"state": "active"}))
    assert fakehost.run("systemctl", "start", "microvm@api").returncode == 0
    wait_for(lambda: fakehost.unit_state("api") == "failed", what="the unit to fail")
    assert "guest-cid=7: vhost-vsock: unable to set guest cid: Address already in use" \
        in fakehost.journal("api")
    # once it stops, the cid is free again
    (other / ".fake-unit.json").write_text(json.dumps({"state": "inactive"}))
    assert fakehost.run("systemctl", "start", "microvm@api").returncode == 0
    wait_for(lambda: guest_sshd_running(fakehost), what="the guest to boot")


def guest_sshd_running(fakehost) -> bool:
    state = json.loads((fakehost.vm_dir("api") / ".fake-unit.json").read_text())
    return bool(state.get("sshd_port"))


def test_host_down_knob(fakehost, monkeypatch):
    monkeypatch.setenv("MARINER_FAKE_HOST_DOWN", "1")
    result = fakehost.run("systemctl", "show", "microvm@api")
    assert result.returncode == 1 and result.stderr == "Failed to connect to bus: Host is down\n"


def test_update_without_a_flake_file_fails(fakehost, flake):
    create(fakehost, f"path:{flake}")
    (fakehost.vm_dir("api") / "flake").unlink()
    result = fakehost.run("microvm", "-u", "api")
    assert result.returncode == 1 and "cat: flake: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
