"""`[nix] modules`: only regular files and directories of them; nothing that blocks, never ends,
or leaves the module's own tree; a size limit per entry; copies keep their modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from mariner_dev import modulefiles


def _project(tmp_path: Path, modules: list[str]) -> Path:
    directory = tmp_path / "api"
    (directory / "nix").mkdir(parents=True)
    (directory / "mariner.toml").write_text(
        '[vm]\nname = "api"\n\n[nix]\nmodules = ' + json.dumps(modules) + "\n")
    return directory


def _mariner(project: Path, *args: str) -> subprocess.CompletedProcess:
    """A real `mariner` process with a deadline: a FIFO that blocks it fails the test, not
    hangs the suite."""
    return subprocess.run([sys.executable, "-m", "mariner_dev", *args], cwd=project,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


def _validate_errors(project: Path) -> list[dict]:
    proc = _mariner(project, "validate", "--json")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)["errors"]


def test_dev_zero_is_refused_by_validate_and_render(tmp_path):
    # as the entry itself (through a .nix-named symlink) and inside a module directory
    project = _project(tmp_path, ["nix/zero.nix", "nix/dir"])
    (project / "nix" / "zero.nix").symlink_to("/dev/zero")
    (project / "nix" / "dir").mkdir()
    (project / "nix" / "dir" / "default.nix").write_text("{ }\n")
    (project / "nix" / "dir" / "null").symlink_to("/dev/null")
    errors = _validate_errors(project)
    assert [e["key"] for e in errors] == ["nix.modules[0]", "nix.modules[1]"]
    assert "is a character device" in errors[0]["message"]
    assert str(project / "nix" / "zero.nix") in errors[0]["message"]
    assert str(project / "nix" / "dir" / "null") in errors[1]["message"]
    assert "outside the module's own directory" in errors[1]["message"]
    proc = _mariner(project, "render", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "character device" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_fifo_is_refused_without_hanging(tmp_path):
    project = _project(tmp_path, ["nix/pipe.nix", "nix/dir"])
    os.mkfifo(project / "nix" / "pipe.nix")
    (project / "nix" / "dir").mkdir()
    (project / "nix" / "dir" / "default.nix").write_text("{ }\n")
    os.mkfifo(project / "nix" / "dir" / "fifo")
    errors = _validate_errors(project)
    assert "pipe.nix: is a FIFO" in errors[0]["message"]
    assert "dir/fifo: is a FIFO" in errors[1]["message"]


def test_a_socket_in_a_module_directory_is_refused(tmp_path):
    import socket

    project = _project(tmp_path, ["nix/dir"])
    (project / "nix" / "dir").mkdir()
    (project / "nix" / "dir" / "default.nix").write_text("{ }\n")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(project / "nix" / "dir" / "s"))
        errors = _validate_errors(project)
    assert "dir/s: is a socket" in errors[0]["message"]


def test_a_symlink_leaving_the_module_is_refused(tmp_path):
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = hunter2\n")
    project = _project(tmp_path, ["nix/dir"])
    (project / "nix" / "dir" / "sub").mkdir(parents=True)
    (project / "nix" / "dir" / "default.nix").write_text("{ }\n")
    (project / "nix" / "dir" / "sub" / "leak.txt").symlink_to("../../../../credentials")
    errors = _validate_errors(project)
    assert errors[0]["key"] == "nix.modules[0]"
    assert "sub/leak.txt: is a symlink to " + str(secret) in errors[0]["message"]
    proc = _mariner(project, "render", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


def test_symlinks_inside_the_module_are_copied_as_files(tmp_path, run_cli):
    project = _project(tmp_path, ["nix/dir"])
    mod = project / "nix" / "dir"
    mod.mkdir()
    (mod / "real.nix").write_text("{ }\n")
    (mod / "default.nix").symlink_to("real.nix")
    code, out, err = run_cli("render", "--out", str(tmp_path / "out"), cwd=project)
    assert code == 0, err
    copied = tmp_path / "out" / "modules" / "0-dir" / "default.nix"
    assert not copied.is_symlink() and copied.read_text() == "{ }\n"


def test_a_too_big_entry_is_refused(tmp_path, monkeypatch):
    project = _project(tmp_path, ["nix/big.nix", "nix/dir"])
    with open(project / "nix" / "big.nix", "wb") as fh:
        fh.truncate(modulefiles.MAX_ENTRY_BYTES + 1)   # sparse: no real disk used
    (project / "nix" / "dir").mkdir()
    (project / "nix" / "dir" / "default.nix").write_text("{ }\n")
    for i in range(3):
        with open(project / "nix" / "dir" / f"part{i}", "wb") as fh:
            fh.truncate(modulefiles.MAX_ENTRY_BYTES // 2)
    errors = _validate_errors(project)
    assert [e["key"] for e in errors] == ["nix.modules[0]", "nix.modules[1]"]
    assert all("MiB a module entry may hold" in e["message"] for e in errors)


def test_a_file_that_grows_after_validation_is_still_cut_off(tmp_path):
    big = tmp_path / "m.nix"
    big.write_text("{ }\n")
    files = modulefiles.scan(big)
    assert [f.size for f in files] == [4]
    with open(big, "ab") as fh:
        fh.truncate(modulefiles.MAX_ENTRY_BYTES + 10)
    try:
        modulefiles.read(big)
    except modulefiles.ModuleFileError as exc:
        assert "MiB a module entry may hold" in str(exc)
    else:
        raise AssertionError("an oversized module was read")


def test_a_file_swapped_for_a_fifo_after_scan_is_not_waited_on(tmp_path):
    path = tmp_path / "m.nix"
    path.write_text("{ }\n")
    (item,) = modulefiles.scan(path)
    path.unlink()
    os.mkfifo(path)
    try:
        modulefiles._read_regular(item.source, 100)
    except modulefiles.ModuleFileError as exc:
        assert "is a FIFO" in str(exc)
    else:
        raise AssertionError("read a FIFO")


def test_copies_keep_their_modes(tmp_path, run_cli):
    project = _project(tmp_path, ["nix/dir", "nix/one.nix"])
    mod = project / "nix" / "dir"
    (mod / "bin").mkdir(parents=True)
    (mod / "default.nix").write_text("{ }\n")
    (mod / "bin" / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (mod / "bin" / "tool.sh").chmod(0o755)
    (mod / "private.nix").write_text("{ }\n")
    (mod / "private.nix").chmod(0o600)
    (project / "nix" / "one.nix").write_text("{ }\n")
    (project / "nix" / "one.nix").chmod(0o640)
    out = tmp_path / "out"
    code, _, err = run_cli("render", "--out", str(out), cwd=project)
    assert code == 0, err

    def mode(rel: str) -> int:
        return stat.S_IMODE((out / "modules" / rel).stat().st_mode)

    assert mode("0-dir/bin/tool.sh") == 0o755
    assert mode("0-dir/private.nix") == 0o600
    assert mode("0-dir/default.nix") == stat.S_IMODE((mod / "default.nix").stat().st_mode)
    assert mode("1-one.nix") == 0o640
    hash_before = json.loads((out / "mariner.json").read_text())["hash"]
    # the executable bit is part of what Nix builds from: changing it changes the hash
    (mod / "bin" / "tool.sh").chmod(0o644)
    code, _, err = run_cli("render", "--out", str(out), cwd=project)
    assert code == 0, err
    assert mode("0-dir/bin/tool.sh") == 0o644
    assert json.loads((out / "mariner.json").read_text())["hash"] != hash_before

