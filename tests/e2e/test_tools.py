"""What a developer does in a running VM besides exec: a shell under tmux, dotfiles sync,
port forwards to a service in the guest. This VM also renders its own group ([vm] gid)."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from realvm import GUEST_UID, free_port, make_vm, teardown_vm, wait_for

pytestmark = pytest.mark.e2e

GID = 2345


@pytest.fixture(scope="module")
def vm(module_base, e2e_image):
    vm = make_vm(module_base, e2e_image, "e2e-tools", gid=GID,
                 user_toml='[dotfiles]\nfiles = ["~/.gitconfig", "~/.config/tool"]\n')
    (vm.home / ".gitconfig").write_text("[user]\n\tname = First Name\n")
    (vm.home / ".config" / "tool").mkdir(parents=True)
    (vm.home / ".config" / "tool" / "settings.ini").write_text("colour = blue\n")
    try:
        vm.up()
        yield vm
    finally:
        teardown_vm(vm)


def test_the_guest_user_has_the_rendered_uid_and_group(vm):
    assert vm.guest_text("id -u; id -g; id -gn").split() == [str(GUEST_UID), str(GID), "dev"]
    vm.guest(f"touch {vm.workspace}/group-check")
    st = (vm.project / "group-check").stat()
    assert (st.st_uid, st.st_gid) == (GUEST_UID, GID)


def test_shell_under_tmux_runs_in_the_mounted_subdirectory(vm):
    sub = vm.project / "src" / "pkg"
    sock = Path(vm.env["XDG_RUNTIME_DIR"]) / "tmux.sock"
    tmux = ["tmux", "-S", str(sock), "-f", "/dev/null"]
    # the pane's command reports the shell's exit status itself (tmux 3.3a may not record it)
    command = (f"{shlex.quote(sys.executable)} -m mariner_dev shell; "
               f"echo shell-exit=$?; sleep 600")
    subprocess.run([*tmux, "new-session", "-d", "-s", "e2e", "-x", "150", "-y", "40",
                    "-c", str(sub), command], env=vm.env, check=True, timeout=30)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-J", "-t", "e2e", "-S", "-100"],
                              env=vm.env, capture_output=True, text=True, timeout=30).stdout

    try:
        wait_for(lambda: "$" in screen(), 60, "the guest shell's prompt")
        subprocess.run([*tmux, "send-keys", "-t", "e2e",
                        "echo at=$(pwd) uid=$(id -u) tty=$(tty | cut -c1-8); exit 4", "Enter"],
                       env=vm.env, check=True, timeout=30)
        def finished() -> str | None:
            text = screen()
            return text if "shell-exit=" in text else None

        text = wait_for(finished, 60, "the shell to exit")
        assert f"at={vm.workspace}/src/pkg uid={GUEST_UID} tty=/dev/pts" in text, text
        assert "shell-exit=4" in text, text
    finally:
        subprocess.run([*tmux, "kill-server"], env=vm.env, capture_output=True, timeout=30)


def test_up_synced_the_dotfiles_and_sync_updates_them(vm):
    assert vm.guest_text("cat ~/.gitconfig") == "[user]\n\tname = First Name"
    assert vm.guest_text("cat ~/.config/tool/settings.ini") == "colour = blue"
    assert vm.guest_text("stat -c %u ~/.gitconfig ~/.config/tool/settings.ini").split() == \
        [str(GUEST_UID)] * 2
    (vm.home / ".gitconfig").write_text("[user]\n\tname = Second Name\n")
    (vm.home / ".config" / "tool" / "extra.ini").write_text("size = 3\n")
    vm.mariner("sync", check=0)
    assert vm.guest_text("cat ~/.gitconfig") == "[user]\n\tname = Second Name"
    assert vm.guest_text("cat ~/.config/tool/extra.ini") == "size = 3"


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_forward_reaches_a_service_in_the_guest(vm):
    vm.guest("mkdir -p ~/www && echo served-from-the-guest > ~/www/marker.txt && "
             "{ setsid python3 -m http.server 8000 --bind 127.0.0.1 --directory ~/www "
             ">/dev/null 2>&1 < /dev/null & echo $! > ~/www.pid; }")
    wait_for(lambda: vm.guest("python3 -c 'import socket; "
                                "socket.create_connection((\"127.0.0.1\", 8000))'",
                                check=False).returncode == 0, 30, "the guest's http.server")
    port = free_port()
    forward = subprocess.Popen([sys.executable, "-m", "mariner_dev", "forward", f"{port}:8000"],
                               cwd=vm.project, env=vm.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/marker.txt"
        body = wait_for(lambda: _get(url) or (forward.poll() is not None and "exited"), 60,
                          f"{url} through mariner forward")
        assert body == "served-from-the-guest\n", (body, forward.stderr.read()
                                                   if forward.poll() is not None else "")
    finally:
        forward.send_signal(signal.SIGINT)
        try:
            forward.wait(timeout=20)
        except subprocess.TimeoutExpired:
            forward.kill()
            forward.wait()
    wait_for(lambda: _get(url) is None, 10, "the forward to close after Ctrl-C")
    vm.guest("kill $(cat ~/www.pid)")
