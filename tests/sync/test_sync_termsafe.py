"""File names in `mariner sync`'s report come from a mariner.toml (or a repository) the user
may not have written: an escape sequence in one is shown escaped, never sent to the terminal."""

from __future__ import annotations

import shutil

from support.fixtures import run_mariner

from sync_helpers import write

NAME = ".mt-esc-\x1b]0;owned\x07-\x1b[2J"


def test_sync_escapes_control_characters_in_file_names(home, guest, project, agents):
    write(home / NAME / "f", "x\n")
    p = project(f'files = ["~/{NAME.encode("unicode_escape").decode()}"]\n'.replace(
        "\\x1b", "\\u001b").replace("\\x07", "\\u0007"), name="syncesc")
    p.register()
    try:
        outputs = []
        for mode in ("require", "off"):
            write(home / NAME / "f", f"{mode}\n")
            result = run_mariner("sync", cwd=p.dir, env={"MARINER_AGENT": mode})
            assert result.returncode == 0, result.stderr
            for stream in (result.stdout, result.stderr):
                assert b"\x1b" not in stream and b"\x07" not in stream, stream
            outputs.append(result.stdout)
        for out in outputs:
            assert b"~/.mt-esc-\\x1b]0;owned\\x07-\\x1b[2J/f" in out, out
        assert (guest.home / NAME / "f").read_text() == "off\n"
    finally:
        shutil.rmtree(guest.home / NAME, ignore_errors=True)
