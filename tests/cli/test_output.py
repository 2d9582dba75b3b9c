"""What the commands print for people: literal text (no rich markup), long paths unbroken."""

from __future__ import annotations

from support.fakehost import fakehost  # noqa: F401  (fixture)


def test_messages_are_printed_literally_and_not_wrapped(run_cli, tmp_path):
    # "[red]" and "[dotfiles]" are rich style tags; a path longer than the terminal (COLUMNS
    # is 120 in tests) must stay on one line.
    directory = tmp_path / ("p[red]x[dotfiles]" + "y" * 150)
    directory.mkdir()
    code, _, err = run_cli("init", cwd=directory)
    assert code == 0, err
    assert f"Wrote {directory / 'mariner.toml'}\n" in err


def test_list_shows_whole_project_paths(run_cli, tmp_path, fakehost):
    directory = tmp_path / ("p[red]x" + "y" * 150)
    directory.mkdir()
    (directory / "mariner.toml").write_text('[vm]\nname = "listed"\n')
    code, _, err = run_cli("render", cwd=directory)
    assert code == 0, err
    code, out, err = run_cli("list")
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if line.startswith("listed")]
    assert row.rstrip().endswith(str(directory))
