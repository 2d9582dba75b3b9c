"""Dotfiles sync against a real sshd: initial, no-op, changes both sides, modes, mtimes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mariner_dev.sync import sync_once

from support.jsondoc import document
from sync_helpers import give_to_guest, snapshot, write


@pytest.fixture
def dotfiles(home, project):
    """A typical set of dotfiles and a registered project syncing them."""
    write(home / ".gitconfig", "[user]\n\tname = Dev\n", 0o644, 1_600_000_000)
    write(home / ".config/nvim/init.lua", "vim.o.number = true\n", 0o600, 1_600_000_100)
    write(home / ".config/nvim/lua/plugins.lua", "return {}\n", 0o644, 1_600_000_200)
    write(home / ".local/bin/tool", "#!/bin/sh\necho hi\n", 0o755, 1_600_000_300)
    os.utime(home / ".config/nvim/lua", (1_600_000_400, 1_600_000_400))
    p = project('files = ["~/.gitconfig", "~/.config/nvim", "~/.local/bin/tool"]\n')
    return p.register()


def test_initial_sync_copies_files_modes_and_mtimes(dotfiles, guest_root, home):
    cfg, record = dotfiles
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert sorted(c.rel for c in report.changes) == [
        ".config/nvim/init.lua", ".config/nvim/lua/plugins.lua", ".gitconfig", ".local/bin/tool"]
    assert all(c.action == "added" for c in report.changes)
    got = snapshot(guest_root)
    assert got[".gitconfig"][:4] == ("file", b"[user]\n\tname = Dev\n", 0o644, 1_600_000_000)
    assert got[".config/nvim/init.lua"][:4] == ("file", b"vim.o.number = true\n", 0o600,
                                                1_600_000_100)
    assert got[".local/bin/tool"][2:4] == (0o755, 1_600_000_300)
    assert got[".config/nvim/lua"][0] == "dir"
    assert got[".config/nvim/lua"][3] == 1_600_000_400
    assert report.bytes_sent == sum(len(v[1]) for v in got.values() if v[0] == "file")


def test_noop_resync_transfers_nothing_and_touches_nothing(dotfiles, guest_root):
    cfg, record = dotfiles
    sync_once(cfg, record, guest_root=str(guest_root))
    before = snapshot(guest_root)
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert report.changes == []
    assert report.bytes_sent == 0
    assert report.checked == 6
    assert snapshot(guest_root) == before   # same inodes, mtimes, modes: nothing rewritten


def actions(report) -> dict[str, str]:
    return {c.rel: c.action for c in report.changes}


def test_host_changes_additions_and_deletions_propagate(dotfiles, guest_root, home):
    cfg, record = dotfiles
    sync_once(cfg, record, guest_root=str(guest_root))
    write(home / ".gitconfig", "[user]\n\tname = Changed\n", 0o644, 1_700_000_000)
    write(home / ".config/nvim/lua/new.lua", "-- new\n", 0o640, 1_700_000_100)
    (home / ".config/nvim/init.lua").unlink()
    os.chmod(home / ".local/bin/tool", 0o700)
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert actions(report) == {".gitconfig": "updated", ".config/nvim/lua/new.lua": "added",
                               ".config/nvim/init.lua": "removed", ".local/bin/tool": "mode"}
    got = snapshot(guest_root)
    assert got[".gitconfig"][1:4] == (b"[user]\n\tname = Changed\n", 0o644, 1_700_000_000)
    assert got[".config/nvim/lua/new.lua"][1:4] == (b"-- new\n", 0o640, 1_700_000_100)
    assert ".config/nvim/init.lua" not in got
    assert got[".local/bin/tool"][2] == 0o700
    assert report.bytes_sent == len(b"[user]\n\tname = Changed\n") + len(b"-- new\n")


def test_touch_on_the_host_sets_the_mtime_without_sending(dotfiles, guest_root, home):
    cfg, record = dotfiles
    sync_once(cfg, record, guest_root=str(guest_root))
    os.utime(home / ".gitconfig", (1_650_000_000, 1_650_000_000))
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert actions(report) == {".gitconfig": "touched"}
    assert report.bytes_sent == 0
    assert int((guest_root / ".gitconfig").stat().st_mtime) == 1_650_000_000


def test_files_edited_or_deleted_in_the_guest_are_restored(dotfiles, guest_root):
    cfg, record = dotfiles
    sync_once(cfg, record, guest_root=str(guest_root))
    (guest_root / ".gitconfig").write_text("edited in the guest")
    (guest_root / ".config/nvim/lua/plugins.lua").unlink()
    os.chmod(guest_root / ".config/nvim/init.lua", 0o666)
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert actions(report) == {".gitconfig": "restored", ".config/nvim/lua/plugins.lua": "restored",
                               ".config/nvim/init.lua": "mode"}
    got = snapshot(guest_root)
    assert got[".gitconfig"][1] == b"[user]\n\tname = Dev\n"
    assert got[".config/nvim/lua/plugins.lua"][1:4] == (b"return {}\n", 0o644, 1_600_000_200)
    assert got[".config/nvim/init.lua"][2] == 0o600


def test_removal_touches_only_what_mariner_put_there(dotfiles, guest_root, home, project):
    cfg, record = dotfiles
    (guest_root / ".config/nvim").mkdir(parents=True)
    (guest_root / ".config/nvim/guest-own.txt").write_text("the guest's own file")
    (guest_root / ".config/other").mkdir()
    give_to_guest(guest_root)
    sync_once(cfg, record, guest_root=str(guest_root))
    # The whole nvim entry leaves the config: mariner's files go, the guest's stay.
    cfg2, record2 = project('files = ["~/.gitconfig", "~/.local/bin/tool"]\n').register()
    report = sync_once(cfg2, record2, guest_root=str(guest_root))
    assert actions(report) == {".config/nvim/init.lua": "removed",
                               ".config/nvim/lua/plugins.lua": "removed"}
    got = snapshot(guest_root)
    assert got[".config/nvim/guest-own.txt"][1] == b"the guest's own file"
    assert ".config/nvim/lua" not in got             # created by mariner, now empty
    assert ".config/other" in got
    assert ".gitconfig" in got and ".local/bin/tool" in got


def test_dry_run_changes_nothing(dotfiles, guest_root):
    cfg, record = dotfiles
    report = sync_once(cfg, record, guest_root=str(guest_root), dry_run=True)
    assert report.dry_run and len(report.changes) == 4
    assert report.lines()[0].startswith("would be added")
    assert os.listdir(guest_root) == []
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert len(report.changes) == 4       # the dry run recorded nothing


def test_symlinks_inside_the_tree_are_kept_escaping_ones_skipped(home, project, guest_root):
    write(home / ".config/app/real.conf", "x = 1\n")
    (home / ".config/app/alias.conf").symlink_to("real.conf")
    (home / ".config/app/abs.conf").symlink_to(home / ".config/app/real.conf")
    (home / ".config/app/dangling").symlink_to("sub/none")
    (home / ".config/app/passwd").symlink_to("/etc/passwd")
    (home / ".config/app/up").symlink_to("../../.bashrc")
    cfg, record = project('files = ["~/.config/app"]\n').register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    app = guest_root / ".config/app"
    assert os.readlink(app / "alias.conf") == "real.conf"
    assert os.readlink(app / "abs.conf") == "real.conf"    # rewritten relative to the guest
    assert os.readlink(app / "dangling") == "sub/none"
    assert not (app / "passwd").exists() and not (app / "passwd").is_symlink()
    assert not (app / "up").is_symlink()
    skipped = dict(report.skipped)
    assert "outside the synced files" in skipped[".config/app/passwd"]
    assert "outside the synced files" in skipped[".config/app/up"]
    assert any("skipped ~/.config/app/passwd" in w for w in report.warnings)
    # A link edited in the guest to point elsewhere is put back.
    (app / "alias.conf").unlink()
    (app / "alias.conf").symlink_to("/etc/shadow")
    give_to_guest(guest_root)
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert actions(report) == {".config/app/alias.conf": "restored"}
    assert os.readlink(app / "alias.conf") == "real.conf"


def test_a_file_that_became_a_directory_and_back(dotfiles, guest_root, home):
    cfg, record = dotfiles
    sync_once(cfg, record, guest_root=str(guest_root))
    lua = home / ".config/nvim/lua"
    for p in lua.iterdir():
        p.unlink()
    lua.rmdir()
    write(lua, "now a file\n")
    sync_once(cfg, record, guest_root=str(guest_root))
    assert (guest_root / ".config/nvim/lua").read_text() == "now a file\n"
    lua.unlink()
    write(lua / "again.lua", "dir again\n")
    sync_once(cfg, record, guest_root=str(guest_root))
    assert (guest_root / ".config/nvim/lua/again.lua").read_text() == "dir again\n"


def test_cli_sync_dry_run_json_and_errors(home, project, guest, run_cli):
    import secrets
    import shutil

    name = f".mt-cli-{secrets.token_hex(4)}"
    write(home / name / "a.conf", "a\n")
    write(home / ".ssh/id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\n", 0o600)
    p = project(f'files = ["~/{name}", "~/.ssh/id_ed25519"]\n')
    code, out, err = run_cli("sync", cwd=p.dir)
    assert code == 1 and "does not exist yet; run `mariner up`" in err
    code, out, err = run_cli("sync", "--json", cwd=p.dir)
    failure = document("sync", out, code)
    assert code == 1 and "does not exist yet" in failure["message"]
    p.register()
    try:
        code, out, err = run_cli("sync", "--dry-run", cwd=p.dir)
        assert code == 0, err
        assert out.splitlines() == [f"would be added    ~/{name}/a.conf (2 B)"]
        assert not (guest.home / name).exists()
        code, out, err = run_cli("sync", cwd=p.dir)
        assert code == 0, err
        assert out.splitlines() == [f"added    ~/{name}/a.conf (2 B)"]
        assert "refused ~/.ssh/id_ed25519" in err and "[dotfiles] allow" in err
        assert (guest.home / name / "a.conf").read_text() == "a\n"
        code, out, err = run_cli("sync", "--json", cwd=p.dir)
        data = document("sync", out, code)
        assert code == 0 and data["changes"] == [] and data["bytes_sent"] == 0
        assert data["refused"][0]["path"] == "~/.ssh/id_ed25519"
    finally:
        shutil.rmtree(guest.home / name, ignore_errors=True)


def test_cli_sync_when_the_vm_is_down(home, project, own_guest, run_cli):
    write(home / ".gitconfig", "x\n")
    p = project('files = ["~/.gitconfig"]\n', on=own_guest)
    p.register()
    own_guest.sshd.stop()
    code, out, err = run_cli("sync", cwd=p.dir)
    assert code == 1
    assert err.count("\n") == 1 and "is not running" in err and "run `mariner up`" in err


def test_sync_dotfiles_is_what_up_calls(dotfiles, guest_root):
    from mariner_dev.sync import config_fingerprint, sync_dotfiles

    cfg, record = dotfiles
    report = sync_dotfiles(cfg, record, guest_root=str(guest_root))
    assert isinstance(report.fingerprint, str) and report.fingerprint == config_fingerprint(cfg)
    assert (guest_root / ".gitconfig").exists()


def test_the_sync_keeps_only_what_it_manages_of_the_guest_listings(dotfiles, guest_root,
                                                                   monkeypatch):
    """A guest home of many files (a hostile VM can make millions): the sync's view of the
    guest holds the names it manages, not every name in the directories it reads."""
    from mariner_dev.sync import engine

    cfg, record = dotfiles
    clutter = [guest_root / f"clutter-{i:05d}" for i in range(3000)]
    for path in clutter:
        path.write_bytes(b"")
    (guest_root / ".config" / "other-app").mkdir(parents=True)
    for i in range(500):
        (guest_root / ".config" / f"other-{i}").write_bytes(b"")
    leftover = guest_root / ".config" / "nvim" / ".~mariner-0123456789abcdef.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a file")
    give_to_guest(guest_root)
    seen = []
    real = engine.make_plan

    def spy(scan, inspected, guest, *args, **kwargs):
        seen.append(sum(len(v) for v in guest.listings.values() if isinstance(v, dict)))
        return real(scan, inspected, guest, *args, **kwargs)

    monkeypatch.setattr(engine, "make_plan", spy)
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert len(report.changes) == 4
    assert not leftover.exists()                 # an interrupted sync's file is still cleaned
    assert all(path.exists() for path in clutter[:10])
    # .gitconfig .config .local + nvim, init.lua, lua, plugins.lua, bin, tool, the leftover
    assert seen and seen[0] <= 12, seen


def test_an_sftp_server_that_stops_answering_fails_the_sync_in_bounded_time(
        dotfiles, guest_root, guest, monkeypatch):
    """The connection stays up (sshd answers keepalives) but the guest's SFTP server is
    frozen: the sync fails with one line after the per-request timeout, it does not hang."""
    import asyncio
    import signal
    import time

    from mariner_dev.errors import GuestUnreachable
    from mariner_dev.remote.session import connect
    from mariner_dev.remote.target import target_for
    from mariner_dev.sync import engine, guest as guest_mod
    from mariner_dev.sync.coalesce import open_sftp
    from support.guest_sshd import _descendants

    cfg, record = dotfiles
    monkeypatch.setattr(guest_mod, "OP_TIMEOUT", 1.5)
    monkeypatch.setattr(guest_mod, "LIST_TIMEOUT", 1.5)
    spec = engine.spec_for(cfg, guest_root=str(guest_root))

    async def main():
        conn = await connect(target_for(cfg, record))
        try:
            before = set(_descendants(guest.sshd.pid()))
            sftp = await open_sftp(conn)
            servers = [p for p in set(_descendants(guest.sshd.pid())) - before
                       if b"sftp" in open(f"/proc/{p}/cmdline", "rb").read()]
            assert len(servers) == 1, servers
            os.kill(servers[0], signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(GuestUnreachable) as info:
                    await engine.sync_over(conn, spec, sftp=sftp)
                return time.monotonic() - started, info.value
            finally:
                os.kill(servers[0], signal.SIGCONT)
        finally:
            conn.close()

    took, error = asyncio.run(main())
    assert took < 10, took
    assert "did not answer an SFTP request within 1.5 s" in str(error)
    assert len(str(error).splitlines()) == 1
