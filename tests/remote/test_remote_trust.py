"""Host-key pinning: first contact pins, a changed key is refused, re-trust is explicit;
the SSH identity (including an encrypted one through ssh-agent)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mariner_dev import remote
from mariner_dev.remote import trust
from support.fixtures import make_project, run_mariner, start_guest, stop_guest
from support.guest_sshd import generate_client_key
from support.tools import require_tool


def _exec(project, *args, mode, **kw):
    return run_mariner("exec", *args, cwd=project.dir, env={"MARINER_AGENT": mode}, **kw)


@pytest.fixture
def own_guest(tmp_path):
    guest = start_guest(tmp_path / "g")
    yield guest
    stop_guest(guest)


def test_first_connection_pins_the_host_key(project, guest):
    pinned = trust.pinned_keys(project.target.known_hosts, f"mariner-{project.name}")
    assert pinned == [guest.sshd.host_public_key()]
    line = next(l for l in project.target.known_hosts.read_text().splitlines()
                if l.startswith(f"mariner-{project.name} "))
    # no vsock here: the pin was taken over TCP, and the line says so
    assert line == f"mariner-{project.name} {guest.sshd.host_public_key()} pinned-over=tcp"
    assert trust.pin_channel(project.target.known_hosts, f"mariner-{project.name}") == "tcp"


def test_unpinned_vm_is_refused(remote_isolation, guest):
    proj = make_project(guest, remote_isolation.env(), pin=False)
    for mode in ("require", "off"):
        result = _exec(proj, "--", "true", mode=mode)
        assert result.returncode == 125
        assert b"has not been started by `mariner up` yet (no host key is pinned)" in result.stderr
    remote.stop_agent(proj.name)


def test_changed_host_key_is_refused_then_retrusted_explicitly(remote_isolation, own_guest):
    proj = make_project(own_guest, remote_isolation.env())
    known_hosts = proj.target.known_hosts
    assert _exec(proj, "--", "true", mode="require").returncode == 0
    old_key = own_guest.sshd.host_public_key()
    # The VM is re-created behind mariner's back: same address, new host key.
    own_guest.sshd.stop()
    own_guest.sshd.regenerate_host_keys()
    own_guest.sshd.start()
    before = known_hosts.read_text()
    for mode in ("require", "off"):
        result = _exec(proj, "--", "echo", "should-not-run", mode=mode)
        assert result.returncode == 125, (mode, result.stderr)
        assert result.stdout == b""
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert proj.name in lines[0] and "mariner destroy" in lines[0] \
            and "--trust-new-host-key" in lines[0]
    assert known_hosts.read_text() == before
    with pytest.raises(remote.HostKeyMismatch):
        remote.wait_for_ssh(proj.target, timeout=5, pin=True)
    # The real OpenSSH client, through the generated ssh-config, refuses it too.
    from mariner_dev import sshconfig

    sshconfig.write_entry(proj.cfg, proj.record)
    ssh = require_tool("ssh")
    refused = subprocess.run([ssh, "-F", str(sshconfig.paths.ssh_config_file()), "-o",
                              "BatchMode=yes", f"mariner-{proj.name}", "true"],
                             capture_output=True, timeout=30)
    assert refused.returncode == 255
    assert b"HOST IDENTIFICATION HAS CHANGED" in refused.stderr or \
        b"Host key verification failed" in refused.stderr
    # Explicit re-trust re-pins the new key, and the agent path works again.
    result = _exec(proj, "--trust-new-host-key", "--", "echo", "trusted", mode="require")
    assert result.stdout == b"trusted\n", result.stderr
    assert trust.pinned_keys(known_hosts, f"mariner-{proj.name}") == \
        [own_guest.sshd.host_public_key()] != [old_key]
    assert _exec(proj, "--", "echo", "ok", mode="require").stdout == b"ok\n"
    remote.stop_agent(proj.name)


def test_forget_host_key(remote_isolation, guest):
    proj = make_project(guest, remote_isolation.env())
    alias = f"mariner-{proj.name}"
    assert trust.pinned_keys(proj.target.known_hosts, alias)
    other = [l for l in proj.target.known_hosts.read_text().splitlines()
             if not l.startswith(alias + " ")]
    remote.forget_host_key(proj.name)
    assert not trust.pinned_keys(proj.target.known_hosts, alias)
    assert proj.target.known_hosts.read_text().splitlines() == other


def test_wait_for_ssh_times_out_with_guest_unreachable(remote_isolation, own_guest):
    from mariner_dev.errors import GuestUnreachable

    proj = make_project(own_guest, remote_isolation.env())
    own_guest.sshd.stop()
    assert not remote.tcp_reachable(proj.target)
    with pytest.raises(GuestUnreachable) as info:
        remote.wait_for_ssh(proj.target, timeout=1.5, pin=True)
    assert info.value.exit_code == 125
    own_guest.sshd.start()
    assert remote.tcp_reachable(proj.target)
    remote.wait_for_ssh(proj.target, timeout=10, pin=False)


def test_encrypted_identity_works_through_ssh_agent(remote_isolation, tmp_path):
    key = generate_client_key(tmp_path / "enc" / "id_ed25519", passphrase="s3cret pass")
    guest = start_guest(tmp_path / "g", authorized_key=key.with_name(key.name + ".pub"))
    agent_sock = tmp_path / "agent.sock"
    ssh_agent = subprocess.Popen([require_tool("ssh-agent"), "-D", "-a", str(agent_sock)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        askpass = tmp_path / "askpass"
        askpass.write_text("#!/bin/sh\necho 's3cret pass'\n")
        askpass.chmod(0o700)
        for _ in range(100):
            if agent_sock.exists():
                break
            import time
            time.sleep(0.05)
        env = dict(os.environ, SSH_AUTH_SOCK=str(agent_sock), SSH_ASKPASS=str(askpass),
                   SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        subprocess.run([require_tool("ssh-add"), str(key)], env=env, check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        proj_env = remote_isolation.env()
        # Without an agent: a clear message, exit 125.
        proj = make_project(guest, proj_env, pin=False)
        # [ssh] identity belongs to the per-user config
        user_config = Path(os.environ["XDG_CONFIG_HOME"]) / "mariner" / "config.toml"
        user_config.parent.mkdir(parents=True, exist_ok=True)
        user_config.write_text(f'[ssh]\nidentity = "{key}"\n')
        result = run_mariner("exec", "--trust-new-host-key", "--", "true", cwd=proj.dir,
                             env={"MARINER_AGENT": "off"})
        assert result.returncode == 125
        assert b"encrypted" in result.stderr and b"ssh-add" in result.stderr
        for mode in ("off", "require"):
            result = run_mariner("exec", "--trust-new-host-key", "--", "echo", "via-agent",
                                 cwd=proj.dir, env={"MARINER_AGENT": mode,
                                                    "SSH_AUTH_SOCK": str(agent_sock)})
            assert result.stdout == b"via-agent\n", (mode, result.stderr)
        remote.stop_agent(proj.name)
    finally:
        ssh_agent.terminate()
        ssh_agent.wait()
        stop_guest(guest)


def _vsock_is_the_guest(monkeypatch, guest, answers: bool = True):
    """Stand in for AF_VSOCK (which this sandbox cannot use): a vsock connect to the guest's
    cid reaches the guest's sshd (or fails, `answers=False`); everything else is real."""
    import socket

    from mariner_dev.remote import session

    real = session._connect_socket
    calls = []

    async def connect(family, address, timeout):
        calls.append(family)
        if family == socket.AF_VSOCK:
            if not answers:
                raise ConnectionRefusedError(111, "Connection refused")
            return await real(socket.AF_INET, ("127.0.0.1", guest.port), timeout)
        return await real(family, address, timeout)

    monkeypatch.setattr(session, "_connect_socket", connect)
    monkeypatch.setattr(session, "_vsock_available", lambda target: True)
    return calls


def test_first_pin_is_taken_over_vsock_where_the_guest_answers(remote_isolation, guest,
                                                                monkeypatch):
    import socket

    proj = make_project(guest, remote_isolation.env(), pin=False)
    alias = f"mariner-{proj.name}"
    calls = _vsock_is_the_guest(monkeypatch, guest)
    remote.wait_for_ssh(proj.target, timeout=20, pin=True)
    assert calls[0] == socket.AF_VSOCK
    assert trust.pinned_keys(proj.target.known_hosts, alias) == [guest.sshd.host_public_key()]
    assert trust.pin_channel(proj.target.known_hosts, alias) == "vsock"
    # once pinned, connections go the usual way (TCP first), checked against the pin
    calls.clear()
    remote.wait_for_ssh(proj.target, timeout=20, pin=False)
    assert calls == [socket.AF_INET]


def test_first_pin_falls_back_to_tcp_where_vsock_does_not_answer(remote_isolation, guest,
                                                                 monkeypatch):
    import socket

    proj = make_project(guest, remote_isolation.env(), pin=False)
    calls = _vsock_is_the_guest(monkeypatch, guest, answers=False)
    remote.wait_for_ssh(proj.target, timeout=20, pin=True)
    assert calls[:2] == [socket.AF_VSOCK, socket.AF_INET]
    assert trust.pin_channel(proj.target.known_hosts, f"mariner-{proj.name}") == "tcp"


def test_forced_tcp_pins_over_tcp(remote_isolation, guest, monkeypatch):
    import socket

    proj = make_project(guest, remote_isolation.env(), pin=False)
    calls = _vsock_is_the_guest(monkeypatch, guest)
    monkeypatch.setenv("MARINER_TRANSPORT", "tcp")
    remote.wait_for_ssh(proj.target, timeout=20, pin=True)
    assert calls == [socket.AF_INET]
    assert trust.pin_channel(proj.target.known_hosts, f"mariner-{proj.name}") == "tcp"


def test_trust_new_host_key_prints_old_and_new_fingerprints(remote_isolation, own_guest):
    proj = make_project(own_guest, remote_isolation.env())
    old_key = own_guest.sshd.host_public_key()
    own_guest.sshd.stop()
    own_guest.sshd.regenerate_host_keys()
    own_guest.sshd.start()
    new_key = own_guest.sshd.host_public_key()
    result = _exec(proj, "--trust-new-host-key", "--", "echo", "ok", mode="off")
    assert result.stdout == b"ok\n", result.stderr
    keygen = require_tool("ssh-keygen")

    def openssh_fingerprint(key: str) -> str:
        out = subprocess.run([keygen, "-lf", "-"], input=key.encode(), capture_output=True,
                             check=True).stdout.decode()
        return out.split()[1]

    old_print, new_print = openssh_fingerprint(old_key), openssh_fingerprint(new_key)
    assert trust.fingerprint(old_key) == old_print and trust.fingerprint(new_key) == new_print
    err = result.stderr.decode()
    (line,) = [l for l in err.splitlines() if "host key changed" in l]
    assert f"old {old_print}" in line and f"new {new_print}" in line
    assert trust.pinned_keys(proj.target.known_hosts, f"mariner-{proj.name}") == [new_key]
    remote.stop_agent(proj.name)
