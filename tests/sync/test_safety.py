"""Secrets stay home unless allowed; no name, link or guest trick writes outside the guest home."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mariner_dev.sync import sync_once
from mariner_dev.sync.credentials import secret_by_content, secret_by_name
from mariner_dev.sync.manifest import manifest_file

from sync_helpers import give_to_guest, snapshot, write

PEM = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
       "-----END OPENSSH PRIVATE KEY-----\n")


# Every place issue 9 lists, and the histories: each refused by its name alone.
SECRET_PLACES = [
    ".ssh/id_ed25519", ".ssh/id_rsa", ".ssh/work_key", ".ssh/keys/deploy",
    ".ssh/authorized_keys", "certs/server.pem", "tls/site.KEY", ".aws/credentials",
    ".aws/config", ".aws/sso/cache/x.json", ".netrc", ".docker/config.json", ".git-credentials",
    ".config/gh/hosts.yml", ".kube/config", ".gnupg/private-keys-v1.d/AB12.key",
    ".gnupg/secring.gpg", ".gnupg/pubring.kbx", ".gnupg/trustdb.gpg", ".npmrc", ".pypirc",
    ".password-store/email/me.gpg", ".password-store/.gpg-id", ".bash_history",
    ".zsh_history", ".python_history", ".node_repl_history", ".psql_history",
    ".mysql_history", ".sqlite_history", ".local/share/fish/fish_history", ".irb_history",
    ".lesshst", ".config/git/credentials"]


@pytest.mark.parametrize("rel", SECRET_PLACES)
def test_known_secret_places(rel):
    assert secret_by_name(rel) is not None


@pytest.mark.parametrize("rel", [
    ".ssh/id_ed25519.pub", ".ssh/config", ".ssh/known_hosts", ".ssh/config.d/work",
    ".gitconfig", ".config/gh/config.yml", "keys.txt", ".bashrc", ".zshrc", ".config/fish/config.fish",
    ".npmrc.d/readme", ".historyfile-notes"])
def test_ordinary_files_are_not_secrets(rel):
    assert secret_by_name(rel) is None


# (what it is, content): a token of each common shape, in a file with an innocent name.
TOKEN_FILES = {
    "github-classic": "token: ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8\n",
    "github-fine-grained": "GH=github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz\n",
    "npm": "//registry.npmjs.org/:_authToken=${NPM}\n",
    "npm-token": "export NPM_TOKEN=npm_" + "a1B2c3D4e5" * 3 + "f6G7h8\n",
    "aws": "aws_access_key_id = AKIAIOSFODNN7EXAMPLE\n",
    "slack-bot": "SLACK=xoxb-123456789012-123456789012-abcdefABCDEF\n",
    "slack-user": "SLACK=xoxp-123456789012-123456789012-abcdefABCDEF\n",
    "openssh-key": PEM,
    "pgp-key": "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nxx\n",
}


@pytest.mark.parametrize("kind", sorted(TOKEN_FILES))
def test_tokens_are_found_by_content(kind):
    assert secret_by_content(TOKEN_FILES[kind].encode()) is not None


def test_token_like_words_are_not_secrets():
    for text in (b"ghp_short", b"npm_install", b"AKIA lowercase akiaiosfodnn7example",
                 b"xoxo-hugs", b"authToken = none", b"github_pat_", b"see docs/AKIA.md"):
        assert secret_by_content(text) is None, text


def test_private_key_headers_are_found_by_content():
    assert secret_by_content(b"junk\n" + PEM.encode())
    assert secret_by_content(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert secret_by_content(b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n")
    assert secret_by_content(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert not secret_by_content(b"-----BEGIN PUBLIC KEY-----\n")
    assert not secret_by_content(b"-----BEGIN CERTIFICATE-----\n")


def test_secrets_are_refused_with_the_key_that_allows_them(home, project, guest_root):
    write(home / ".ssh/id_ed25519", PEM, 0o600)
    write(home / ".ssh/id_ed25519.pub", "ssh-ed25519 AAAA me\n")
    write(home / ".ssh/config", "Host *\n")
    write(home / ".aws/credentials", "[default]\naws_secret_access_key = x\n", 0o600)
    write(home / ".config/tool/settings.json", "{}\n")
    # A private key under an innocent name is found by its content.
    write(home / ".config/tool/backup.txt", "saved for later\n" + PEM, 0o600)
    # A symlink to a key is refused too, though the link itself has an innocent name.
    (home / ".config/tool/link").symlink_to("keys/deploy.pem")
    write(home / ".config/tool/keys/deploy.pem", "not really pem")
    p = project('files = ["~/.ssh", "~/.aws", "~/.config/tool"]\n')
    cfg, record = p.register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    refused = dict(report.refused)
    assert set(refused) == {".ssh/id_ed25519", ".aws/credentials", ".config/tool/backup.txt",
                            ".config/tool/link", ".config/tool/keys/deploy.pem"}
    message = refused[".ssh/id_ed25519"]
    assert "~/.ssh/id_ed25519" in message and '[dotfiles] allow = ["~/.ssh/id_ed25519"]' in message
    assert "private key" in refused[".config/tool/backup.txt"]
    got = snapshot(guest_root)
    assert set(got) == {".ssh", ".ssh/id_ed25519.pub", ".ssh/config", ".aws", ".config",
                        ".config/tool", ".config/tool/settings.json", ".config/tool/keys"}
    assert all(PEM.encode() not in (v[1] or b"") for v in got.values() if v[0] == "file")

    # Allowed explicitly, it syncs; the allowance withdrawn, mariner takes it back out.
    p.write('files = ["~/.ssh", "~/.aws", "~/.config/tool"]\n'
            'allow = ["~/.ssh/id_ed25519", "~/.config/tool/backup.txt"]\n')
    cfg, record = p.register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert {c.rel for c in report.changes} == {".ssh/id_ed25519", ".config/tool/backup.txt"}
    assert (guest_root / ".ssh/id_ed25519").read_text() == PEM
    p.write('files = ["~/.ssh", "~/.aws", "~/.config/tool"]\n')
    cfg, record = p.register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert {(c.rel, c.action) for c in report.changes} == {
        (".ssh/id_ed25519", "removed"), (".config/tool/backup.txt", "removed")}
    assert not (guest_root / ".ssh/id_ed25519").exists()
    assert not (guest_root / ".config/tool/backup.txt").exists()


def test_a_configured_entry_that_is_a_key_is_refused(home, project, guest_root):
    write(home / ".ssh/id_rsa", PEM, 0o600)
    cfg, record = project('files = ["~/.ssh/id_rsa"]\n').register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert [r for r, _ in report.refused] == [".ssh/id_rsa"]
    assert os.listdir(guest_root) == [".ssh"] and os.listdir(guest_root / ".ssh") == []


HOSTILE = ["new\nline", "..", "...", "..x", "-rf", "back\\slash", "sp ace", "tab\tname",
           "ünïcödé", "$(touch pwned)", "*", "a\rb"]


def test_hostile_names_stay_inside_the_guest_home(home, project, guest_root, tmp_path):
    outside = guest_root.parent
    before_outside = sorted(os.listdir(outside))
    base = home / ".config/hostile"
    for name in HOSTILE:
        if name in ("..",):
            continue
        write(base / name, f"content of {name!r}\n")
        write(base / ("dir " + name) / "inner", "inner\n")
    odd = os.fsencode(str(base)) + b"/bad\xff\xfename"
    with open(odd, "wb") as fh:
        fh.write(b"undecodable name\n")
    (base / "abs-link").symlink_to("/etc/passwd")
    (base / "climb-link").symlink_to("../../../../../../../../tmp")
    cfg, record = project('files = ["~/.config/hostile"]\n').register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    got = snapshot(guest_root / ".config/hostile")
    for name in HOSTILE:
        if name == "..":
            continue
        assert got[name][1] == f"content of {name!r}\n".encode()
        assert got[f"dir {name}/inner"][1] == b"inner\n"
    assert os.path.exists(os.fsencode(str(guest_root / ".config/hostile")) + b"/bad\xff\xfename")
    assert "abs-link" not in got and "climb-link" not in got
    assert sorted(os.listdir(outside)) == before_outside
    assert not Path("/tmp/pwned").exists() and not (guest_root / "pwned").exists()
    lines = report.lines() + report.warnings
    assert all("\n" not in line and "\r" not in line for line in lines)
    assert any("new\\nline" in line for line in lines)


def test_a_tampered_manifest_cannot_remove_or_write_outside(home, project, guest_root):
    write(home / ".gitconfig", "x\n")
    cfg, record = project('files = ["~/.gitconfig"]\n').register()
    sync_once(cfg, record, guest_root=str(guest_root))
    victim = guest_root.parent / f"{guest_root.name}-victim"
    victim.write_text("must survive")
    try:
        data = json.loads(manifest_file(cfg.name).read_text())
        for evil in ["../" + victim.name, str(victim), "a/../../" + victim.name, "", ".",
                     "x/./y"]:
            data["entries"][evil] = {"kind": "file", "size": 1, "mtime_ns": 1}
        manifest_file(cfg.name).write_text(json.dumps(data))
        report = sync_once(cfg, record, guest_root=str(guest_root))
        assert report.changes == []
        assert victim.read_text() == "must survive"
    finally:
        victim.unlink()


def test_mariner_never_writes_through_a_guest_symlink(home, project, guest_root, tmp_path):
    """The guest replaces a synced directory by a symlink to elsewhere: mariner refuses it."""
    write(home / ".config/nvim/init.lua", "ok\n")
    write(home / ".bashrc", "rc\n")
    cfg, record = project('files = ["~/.config/nvim", "~/.bashrc"]\n').register()
    elsewhere = guest_root.parent / f"{guest_root.name}-elsewhere"
    elsewhere.mkdir()
    try:
        (guest_root / ".config").symlink_to(elsewhere)
        # A planted symlink where a file goes is replaced, never written through.
        (guest_root / ".bashrc").symlink_to(elsewhere / "bashrc-target")
        give_to_guest(guest_root)
        os.chown(elsewhere, guest_root.stat().st_uid, guest_root.stat().st_gid)
        report = sync_once(cfg, record, guest_root=str(guest_root))
        assert os.listdir(elsewhere) == []
        assert (guest_root / ".bashrc").read_text() == "rc\n"
        assert not (guest_root / ".bashrc").is_symlink()
        assert any("~/.config is not a directory in the guest" in w for w in report.warnings)
    finally:
        import shutil

        shutil.rmtree(elsewhere, ignore_errors=True)


def test_every_listed_secret_stays_home_and_an_allowed_one_arrives(home, project, guest_root,
                                                                   run_cli):
    """Each place issue 9 names, and each token shape under an innocent name, is refused by a
    real sync, named with its reason by `sync --dry-run` and `validate`; only what [dotfiles]
    allow names (in the per-user config) reaches the guest."""
    for rel in SECRET_PLACES:
        write(home / rel, "not obviously secret\n", 0o600)
    for kind, text in TOKEN_FILES.items():
        write(home / "notes" / f"{kind}.txt", text)
    write(home / "notes" / "plain.txt", "nothing to see\n")
    tops = sorted({rel.split("/")[0] for rel in SECRET_PLACES} | {"notes"})
    files = "files = [" + ", ".join(f'"~/{top}"' for top in tops) + "]\n"
    p = project(files)
    expected = set(SECRET_PLACES) | {f"notes/{kind}.txt" for kind in TOKEN_FILES}

    code, out, err = run_cli("validate", cwd=p.dir)
    assert code == 0, err
    for rel in expected:
        assert f"refused ~/{rel}: it is " in err, rel
    code, out, err = run_cli("validate", "--json", cwd=p.dir)
    assert {r["path"] for r in json.loads(out)["dotfiles_refused"]} == {f"~/{r}" for r in expected}

    cfg, record = p.register()
    report = sync_once(cfg, record, guest_root=str(guest_root), dry_run=True)
    assert set(dict(report.refused)) == expected
    assert "GitHub token" in dict(report.refused)["notes/github-classic.txt"]
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert set(dict(report.refused)) == expected
    got = snapshot(guest_root)
    assert not expected & {rel for rel, v in got.items() if v[0] == "file"}
    assert got["notes/plain.txt"][1] == b"nothing to see\n"

    # allowed by the developer (per-user config), the two arrive; the others still stay home
    p.write(files + 'allow = ["~/.npmrc", "~/notes/aws.txt"]\n')
    cfg, record = p.register()
    report = sync_once(cfg, record, guest_root=str(guest_root))
    assert (guest_root / ".npmrc").read_text() == "not obviously secret\n"
    assert (guest_root / "notes" / "aws.txt").read_text() == TOKEN_FILES["aws"]
    assert set(dict(report.refused)) == expected - {".npmrc", "notes/aws.txt"}
