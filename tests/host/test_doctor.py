"""`mariner doctor`: reports on any machine (this one has none of the host setup), exits 1
exactly when a required check fails, and recognises the exposures it warns about."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from mariner_dev import doctor
from mariner_dev.doctor import Check, DoctorReport
from support.fakehost import shell_command as tool

# the isolation fixture sets MARINER_BACKEND=microvm: doctor says so, then checks that host
NAMES = ["backend", "host-os", "kvm", "microvm", "systemd", "nix", "vhost-vsock", "bridge",
         "systemd-networkd", "sudo", "state-dir", "bridge-firewall", "user-net-loopback",
         "bridge-dns", "mariner-home", "runtime-dir"]


@pytest.fixture
def tools(tmp_path, monkeypatch) -> Path:
    """A directory of stand-in commands first on PATH."""
    directory = tmp_path / "tools"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
    return directory


def test_reports_on_this_machine_without_crashing():
    report = doctor.run_doctor()
    assert [c.name for c in report.checks] == NAMES
    for check in report.checks:
        assert check.status in ("ok", "warn", "fail")
        assert check.detail and "could not run this check" not in check.detail, check
        if check.status != "ok":
            assert check.fix, check
    assert [c.name for c in report.checks if not c.required] == ["bridge-firewall",
                                                                  "user-net-loopback",
                                                                  "bridge-dns"]
    assert report.ok == (not any(c.status == "fail" for c in report.checks))
    state_dir = next(c for c in report.checks if c.name == "state-dir")
    assert state_dir.status == "ok"  # the isolation fixture's MARINER_MICROVMS_DIR exists


def test_exit_code_follows_required_failures_only():
    advisory = Check("user-net-loopback", "warn", "d", "f", False)
    required_ok = Check("kvm", "ok", "d", None, True)
    assert DoctorReport([required_ok, advisory]).exit_code == 0
    report = DoctorReport([required_ok, advisory, Check("nix", "fail", "d", "f", True)])
    assert (report.ok, report.exit_code) == (False, 1)
    assert report.to_json() == {"ok": False, "backend": None,
                                "checks": [c.to_json() for c in report.checks]}


def test_cli_json_on_this_machine(run_cli):
    code, out, err = run_cli("doctor", "--json")
    data = json.loads(out)
    assert data["version"] == 1
    if data["ok"]:
        assert (set(data), data["outcome"], code) == (
            {"version", "outcome", "ok", "backend", "checks"}, "success", 0)
    else:
        assert set(data) == {"version", "outcome", "ok", "backend", "checks", "message",
                             "hint", "exit_code"}
        assert (data["outcome"], data["exit_code"], code) == ("error", 1, 1)
    assert data["backend"] == "microvm"
    assert [c["name"] for c in data["checks"]] == NAMES
    for check in data["checks"]:
        assert set(check) == {"name", "status", "detail", "fix", "required"}
    assert len(out.splitlines()) == 1


def test_cli_table(run_cli):
    code, out, err = run_cli("doctor")
    assert code in (0, 1)
    for name in NAMES:
        assert name in out
    assert ("not ready:" in out) == (code == 1)


def test_user_mode_project_makes_the_bridge_advisory(run_cli, tmp_path, monkeypatch):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "mariner.toml").write_text('[vm]\nname = "proj"\n[network]\nmode = "user"\n')
    code, out, _ = run_cli("doctor", "--json", cwd=project)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert not checks["bridge"]["required"] and not checks["systemd-networkd"]["required"]
    assert checks["bridge"]["status"] in ("ok", "warn")
    assert checks["microvm"]["required"]


def test_a_check_that_breaks_is_reported():
    def broken():
        raise RuntimeError("boom")

    check = doctor._guarded("kvm", True, broken)
    assert (check.status, check.required) == ("fail", True)
    assert "RuntimeError: boom" in check.detail


def test_microvm_found_with_the_fake_host(fakehost):
    check = doctor.check_microvm()
    assert check.status == "ok" and str(Path(__file__).parents[1] / "fakehost") in check.detail


def test_microvm_missing(tools, monkeypatch):
    monkeypatch.setenv("PATH", str(tools))
    check = doctor.check_microvm()
    assert check.status == "fail" and "nixosModules.host" in check.fix


@pytest.mark.parametrize("config, status, detail", [
    ("experimental-features = flakes nix-command fetch-closure", "ok", "with nix-command and flakes"),
    ("experimental-features = nix-command", "fail", "without the experimental features flakes"),
])
def test_nix_features(tools, config, status, detail):
    tool(tools, "nix", f'case "$1" in --version) echo "nix (Nix) 2.24.9";; '
                       f'config) echo "cores = 0"; echo "{config}";; esac')
    check = doctor.check_nix()
    assert check.status == status and detail in check.detail
    assert check.detail.startswith("nix (Nix) 2.24.9")


def test_nix_before_config_show(tools):
    tool(tools, "nix", 'case "$1" in --version) echo "nix (Nix) 2.18.1";; '
                       'config) echo "error: '"'"'config'"'"' is not a recognised command" >&2; exit 1;; '
                       'show-config) echo "experimental-features = flakes nix-command";; esac')
    assert doctor.check_nix().status == "ok"


def test_nix_without_nix_command(tools):
    tool(tools, "nix", 'case "$1" in --version) echo "nix (Nix) 2.8.0";; '
                       'config) echo "error: '"'"'config'"'"' is not a recognised command" >&2; exit 1;; '
                       "*) echo \"error: experimental Nix feature 'nix-command' is disabled\" >&2; exit 1;; esac")
    check = doctor.check_nix()
    assert check.status == "fail" and "nix-command" in check.detail
    assert "experimental-features" in check.fix


def test_networkd(tools):
    tool(tools, "systemctl", 'echo active')
    assert doctor.check_networkd().status == "ok"
    tool(tools, "systemctl", 'echo inactive; exit 3')
    check = doctor.check_networkd()
    assert check.status == "fail" and check.detail == "systemd-networkd is inactive"
    assert doctor.check_networkd(required=False).status == "warn"


@pytest.mark.parametrize("sudo, status, detail", [
    ("env", "ok", "`env true` works without a prompt"),
    ("false", "fail", "`false true` failed"),
    ("", "warn", "MARINER_SUDO is empty"),
    ("no-such-sudo -n", "fail", "no-such-sudo is not installed"),
])
def test_sudo_as_a_plain_user(monkeypatch, sudo, status, detail):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("MARINER_SUDO", sudo)
    check = doctor.check_sudo()
    assert check.status == status and detail in check.detail


def test_sudo_as_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert doctor.check_sudo().status == "ok"


def test_state_dir_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MARINER_MICROVMS_DIR", str(tmp_path / "absent"))
    check = doctor.check_state_dir()
    assert check.status == "fail" and str(tmp_path / "absent") in check.detail


@pytest.fixture
def fake_bridge(tmp_path, monkeypatch, tools):
    """/sys/class/net with a br-microvm bridge, and an `ip` that reports its addresses."""
    net = tmp_path / "sys-class-net"
    (net / "br-microvm" / "bridge").mkdir(parents=True)
    monkeypatch.setattr(doctor, "SYS_CLASS_NET", net)

    def addresses(*cidrs: str) -> None:
        info = [{"family": "inet", "local": c.split("/")[0], "prefixlen": int(c.split("/")[1])}
                for c in cidrs]
        tool(tools, "ip", f"echo '{json.dumps([{'ifname': 'br-microvm', 'addr_info': info}])}'")

    return addresses


def test_bridge(fake_bridge):
    fake_bridge("10.0.0.1/24")
    assert doctor.check_bridge().status == "ok"
    fake_bridge("10.0.1.1/24")
    check = doctor.check_bridge()
    assert check.status == "fail" and "has 10.0.1.1/24, not 10.0.0.1/24" in check.detail


def test_bridge_absent_or_not_a_bridge(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "SYS_CLASS_NET", tmp_path)
    assert doctor.check_bridge().detail == "there is no br-microvm interface"
    (tmp_path / "br-microvm").mkdir()
    assert doctor.check_bridge().detail == "br-microvm exists but is not a bridge"
    assert doctor.check_bridge(required=False).status == "warn"


NIXOS_NFT_TRUSTED = """\
table inet nixos-fw {
	chain input-allow {
		icmp type echo-request accept comment "allow ping"
		iifname { "br-microvm" } accept comment "trusted interfaces"
		tcp dport 22 accept
	}
}"""

NIXOS_NFT_DNS_ONLY = """\
table inet nixos-fw {
	chain input {
		type filter hook input priority filter; policy drop;
		iifname "lo" accept
		jump input-allow
	}
	chain input-allow {
		iifname "br-microvm" udp dport 53 accept
		iifname "br-microvm" tcp dport 53 accept
		ct state established,related accept
	}
}"""

NIXOS_IPTABLES_TRUSTED = """\
-P INPUT ACCEPT
-N nixos-fw
-N nixos-fw-accept
-A nixos-fw -i lo -j nixos-fw-accept
-A nixos-fw -i br-microvm -j nixos-fw-accept
-A nixos-fw -p tcp -m tcp --dport 22 -j nixos-fw-accept"""


def test_blanket_accepts():
    assert doctor.blanket_bridge_accepts(NIXOS_NFT_TRUSTED) == [
        'iifname { "br-microvm" } accept comment "trusted interfaces"']
    assert doctor.blanket_bridge_accepts(NIXOS_NFT_DNS_ONLY) == []
    assert doctor.blanket_bridge_accepts(NIXOS_IPTABLES_TRUSTED) == [
        "-A nixos-fw -i br-microvm -j nixos-fw-accept"]


def test_bridge_firewall_warns_about_a_trusted_bridge(fake_bridge, tools):
    fake_bridge("10.0.0.1/24")
    tool(tools, "nft", f"cat <<'RULES'\n{NIXOS_NFT_TRUSTED}\nRULES")
    check = doctor.check_bridge_firewall()
    assert check.status == "warn" and not check.required
    assert "every VM reaches every service on this host" in check.detail
    assert 'allowedUDPPorts = [ 53 ]' in check.fix and "trustedInterfaces" in check.fix
    tool(tools, "nft", f"cat <<'RULES'\n{NIXOS_NFT_DNS_ONLY}\nRULES")
    assert doctor.check_bridge_firewall().status == "ok"


def test_bridge_firewall_unreadable_is_advice(fake_bridge, tools, monkeypatch):
    fake_bridge("10.0.0.1/24")
    tool(tools, "nft", "echo 'Operation not permitted' >&2; exit 1")
    tool(tools, "iptables", "echo 'Permission denied (you must be root)' >&2; exit 4")
    check = doctor.check_bridge_firewall()
    assert check.status == "warn" and "cannot read the firewall rules" in check.detail
    assert "Operation not permitted" in check.detail and "trusted br-microvm" in check.detail


def test_no_bridge_no_firewall_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "SYS_CLASS_NET", tmp_path)
    check = doctor.check_bridge_firewall()
    assert check.status == "ok" and "do not trust br-microvm" in check.detail and check.fix


def test_proc_net_tcp_parsing(tmp_path):
    tcp = tmp_path / "tcp"
    tcp.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        "   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n"
        "   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n"
        "   2: 0F02000A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n"
        "   3: 0100007F:A1B2 0100007F:1538 01 00000000:00000000 00:00000000 00000000\n")
    tcp6 = tmp_path / "tcp6"
    tcp6.write_text(
        "  sl  local_address rem_address st\n"
        "   0: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A\n"
        "   1: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A\n"
        "   2: 0000000000000000FFFF00000100007F:0CEA 00000000000000000000000000000000:0000 0A\n")
    listeners = doctor.listening_tcp((str(tcp), str(tcp6)))
    assert listeners == [("0.0.0.0", 22), ("10.0.2.15", 80), ("::1", 631),
                         ("::ffff:7f00:1", 3306), ("127.0.0.1", 5432), ("::", 8080)]
    assert doctor.loopback_reachable(listeners) == [
        "*:22", "[::1]:631", "[::ffff:7f00:1]:3306", "127.0.0.1:5432", "*:8080"]


def test_loopback_listener_is_named():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        reachable = doctor.loopback_reachable(doctor.listening_tcp())
        check = doctor.check_user_net_loopback()
    assert f"127.0.0.1:{port}" in reachable
    assert check.status == "warn" and not check.required
    assert reachable[0] in check.detail and "10.0.2.2" in check.detail
    assert "restrict=on" in check.fix


# -- the pinned host module: firewall on, DNS on the bridge, vhost-vsock --------------------

def test_bridge_firewall_off_is_reported(fake_bridge, tools):
    fake_bridge("10.0.0.1/24")
    tool(tools, "nft", "true")            # answers, lists nothing
    tool(tools, "iptables", "true")
    check = doctor.check_bridge_firewall()
    assert check.status == "warn" and "no firewall is active" in check.detail
    assert "list no rules" in check.detail
    assert "networking.firewall.enable = true" in check.fix
    # rules that never filter input count as no firewall either
    tool(tools, "nft", "printf 'table inet t {\\n chain c {\\n  counter\\n }\\n}\\n'")
    check = doctor.check_bridge_firewall()
    assert check.status == "warn" and "filters input" in check.detail


def test_firewall_filters_input():
    assert doctor.firewall_filters_input(NIXOS_NFT_DNS_ONLY)
    assert not doctor.firewall_filters_input("table inet t {\n chain c { counter }\n}")
    assert doctor.firewall_filters_input("-P INPUT ACCEPT\n-A INPUT -j nixos-fw\n")
    assert doctor.firewall_filters_input("-P INPUT DROP\n")
    assert not doctor.firewall_filters_input("-P INPUT ACCEPT\n-A INPUT -i lo -j ACCEPT\n")


@pytest.fixture
def vsock(tmp_path, monkeypatch):
    """Where check_vhost_vsock looks, pointed into tmp_path."""
    paths = {"module": tmp_path / "sys-module-vhost_vsock", "device": tmp_path / "vhost-vsock",
             "modules": tmp_path / "proc-modules"}
    monkeypatch.setattr(doctor, "VHOST_VSOCK_MODULE", paths["module"])
    monkeypatch.setattr(doctor, "VHOST_VSOCK_DEVICE", paths["device"])
    monkeypatch.setattr(doctor, "PROC_MODULES", paths["modules"])
    paths["modules"].write_text("ext4 1 0 - Live 0x0\n")
    return paths


def test_vhost_vsock_needs_the_device(vsock):
    check = doctor.check_vhost_vsock()
    assert check.status == "fail" and "not loaded and there is no /dev/vhost-vsock" in check.detail
    assert "modprobe vhost_vsock" in check.fix
    vsock["modules"].write_text("vhost_vsock 24576 0 - Live 0x0\n")
    check = doctor.check_vhost_vsock()
    assert check.status == "fail" and "/dev/vhost-vsock is missing" in check.detail
    vsock["device"].write_text("")       # a plain file is no device
    assert doctor.check_vhost_vsock().status == "fail"
    vsock["device"].unlink()
    os.symlink("/dev/null", vsock["device"])  # a character device
    check = doctor.check_vhost_vsock()
    assert check.status == "ok" and "module is loaded" in check.detail
    vsock["modules"].write_text("")
    assert "built in" in doctor.check_vhost_vsock().detail


@pytest.fixture
def dns_listener(fake_bridge, monkeypatch):
    """The host's listening sockets, as check_bridge_dns sees them."""
    fake_bridge("10.0.0.1/24")
    listeners: list[tuple[str, int]] = []
    monkeypatch.setattr(doctor, "listening_tcp", lambda *a: list(listeners))
    return listeners


def test_exposed_dns_the_guest_is_not_told_about(dns_listener):
    dns_listener.append(("10.0.0.1", 53))
    check = doctor.check_bridge_dns("bridge", None)
    assert check.status == "warn" and not check.required
    assert "answers DNS on 10.0.0.1:53" in check.detail and "is not told" in check.detail
    assert 'dns = "10.0.0.1"' in check.fix
    assert doctor.check_bridge_dns("bridge", "10.0.0.1").status == "ok"
    assert doctor.check_bridge_dns("user", None).status == "ok"


def test_dns_named_but_not_exposed(dns_listener):
    dns_listener.append(("127.0.0.53", 53))  # resolved's own stub only
    check = doctor.check_bridge_dns("bridge", "10.0.0.1")
    assert check.status == "warn" and "nothing on this host listens on 10.0.0.1:53" in check.detail
    assert "exposeDNS" in check.fix
    assert doctor.check_bridge_dns("bridge", None).status == "ok"


def test_cli_doctor_tells_the_project_dns(run_cli, tmp_path, dns_listener):
    dns_listener.append(("10.0.0.1", 53))
    project = tmp_path / "proj"
    project.mkdir()
    (project / "mariner.toml").write_text('[vm]\nname = "proj"\n')
    _, out, _ = run_cli("doctor", "--json", cwd=project)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["bridge-dns"]["status"] == "warn"
    (project / "mariner.toml").write_text('[vm]\nname = "proj"\n[network]\ndns = "10.0.0.1"\n')
    _, out, _ = run_cli("doctor", "--json", cwd=project)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["bridge-dns"]["status"] == "ok"


def test_cli_plain_lines_when_piped(run_cli):
    # run_cli captures stdout: not a terminal, so no box-drawing table, one line per check
    code, out, err = run_cli("doctor")
    lines = [line for line in out.splitlines() if not line.startswith("  fix: ")]
    assert [line.split(":", 1)[0] for line in lines[:-1]] == NAMES
    for line in lines[:-1]:
        name, status, detail = line.split(": ", 2)
        assert status in ("ok", "warn", "fail", "warn (advisory)", "fail (advisory)"), line
        assert detail
    assert lines[-1].startswith("ready:" if code == 0 else "not ready:")
    assert not any(c in out for c in "┃━│─┏")


@pytest.mark.parametrize("text, status, words", [
    ('NAME=NixOS\nID=nixos\nPRETTY_NAME="NixOS 24.11 (Vicuna)"\n', "ok", "NixOS 24.11"),
    ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n', "fail",
     "this host runs Debian GNU/Linux 12 (bookworm), not NixOS"),
])
def test_host_os(tmp_path, text, status, words):
    from mariner_dev.doctor import check_host_os

    release = tmp_path / "os-release"
    release.write_text(text)
    check = check_host_os(os_release=release)
    assert check.status == status and words in check.detail


@pytest.mark.parametrize("body, status, words", [
    ('echo "Failed to connect to bus: Host is down" >&2; exit 1', "fail",
     "systemd is not running on this host (Failed to connect to bus: Host is down)"),
    ("echo LoadState=not-found", "fail", "no microvm@ unit"),
    ("echo LoadState=loaded", "ok", "has the microvm@ unit"),
])
def test_systemd(tools, monkeypatch, body, status, words):
    from mariner_dev.doctor import check_systemd

    tool(tools, "systemctl", body)
    check = check_systemd()
    assert check.status == status and words in check.detail


def test_no_systemctl_at_all(tmp_path, monkeypatch):
    from mariner_dev.doctor import check_systemd

    monkeypatch.setenv("PATH", str(tmp_path))
    check = check_systemd()
    assert check.status == "fail" and "this host has no systemd" in check.detail


@pytest.mark.parametrize("kind, words", [
    ("file", "is not a directory"), ("dangling", "is a dangling symlink"),
    ("relative", "is a relative path"), ("missing", "created when first needed"),
])
def test_mariner_home(tmp_path, monkeypatch, kind, words):
    from mariner_dev.doctor import check_mariner_home

    target = tmp_path / "home"
    if kind == "file":
        target.write_text("")
    elif kind == "dangling":
        target.symlink_to(tmp_path / "nowhere")
    monkeypatch.setenv("MARINER_HOME", "rel/home" if kind == "relative" else str(target))
    check = check_mariner_home()
    assert words in check.detail
    assert check.status == ("ok" if kind == "missing" else "fail")


def test_both_kvm_checks_open_and_ask_kvm_the_same_way(tmp_path):
    """check_kvm (microvm backend) and check_kvm_user (runner backend) share _kvm_answers: a
    device that will not open or does not answer KVM's ioctl is named, with the check's fix."""
    absent = doctor._kvm_answers(tmp_path / "absent", False, "load kvm", "/dev/kvm opens")
    assert (absent.status, absent.fix) == ("warn", "load kvm")
    assert absent.detail == "cannot open /dev/kvm: No such file or directory"
    not_kvm = tmp_path / "not-kvm"
    not_kvm.write_text("")
    silent = doctor._kvm_answers(not_kvm, True, "load kvm", "/dev/kvm opens")
    assert (silent.status, silent.required) == ("fail", True)
    assert silent.detail.startswith("/dev/kvm does not answer: ")
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        for check, opens in ((doctor.check_kvm(), "/dev/kvm opens (KVM API version "),
                             (doctor.check_kvm_user(), "/dev/kvm opens read-write (KVM API "
                                                       "version ")):
            assert check.status == "ok" and check.detail.startswith(opens), check
