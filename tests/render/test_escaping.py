"""No user string reaches Nix source unescaped: each evaluates to exactly the original.

An explicit corpus of the characters that mean something to Nix (`${`, `"`, `\\`, `''`, `$`),
whitespace and control characters, and non-ASCII text, first through nix_string/nix_attr
directly, then through a whole project: env values, the workspace mount, share paths, the
authorized key's comment and the nix-mariner flake reference.
"""

from __future__ import annotations

import tomlkit
import pytest

from mariner_dev.config import load_project
from mariner_dev.errors import MarinerError
from mariner_dev.nixrender import nix_attr, nix_string, render_flake, write_flake
from render_cases import eval_flakes, nix_eval, nix_parse

CORPUS = [
    "${HOME}", "${", "$", "a$", "$$", "$${x}", "$\\{x}", "\\${x}", "${builtins.currentTime}",
    "\\", "\\\\", "\\n", "trailing\\", '"', '\\"', '" + builtins.currentTime + "',
    "''", "'''", "''${x}", "''\\n", "''$", "'", "it's",
    "line1\nline2", "\n", "\r\n", "\r", "tab\there", "\t", "$\n{", "${\n}",
    "héllo wörld", "日本語", "🚀 emoji", "\u00a0nbsp", "\u2028sep", "\x7f", "\x01\x02",
    "\x1b[31mred\x1b[0m", "# not a comment", "/* not a comment */", "; x = 1;",
    "}; evil = {", "", " ", "  padded  ", "${builtins.readFile /etc/passwd}",
]

ATTR_NAMES = ["plain", "with-dash", "prime'", "_under", "if", "then", "let", "in", "or",
              "rec", "inherit", "with", "assert", "1digit", "with space", "${x}", '"q"',
              "é", "a.b", ""]


def _list(strings) -> str:
    return "[ " + " ".join(nix_string(s) for s in strings) + " ]"


def test_nix_string_round_trips_the_corpus():
    assert nix_eval(_list(CORPUS)) == CORPUS


def test_nix_attr_names_round_trip():
    body = " ".join(f"{nix_attr(name)} = {index};" for index, name in enumerate(ATTR_NAMES))
    got = nix_eval("{ " + body + " }")
    assert got == {name: index for index, name in enumerate(ATTR_NAMES)}


def test_nul_cannot_be_written():
    with pytest.raises(MarinerError, match="NUL"):
        nix_string("a\0b")


def test_the_round_trip_check_can_fail():
    """An unescaped antiquotation would not round-trip: the check sees the difference."""
    assert nix_eval('[ "$" "${"$"}{x}" ]') == ["$", "${x}"]
    assert nix_eval(_list(["${x}"])) != nix_eval('[ "${"x"}" ]')


ODD_DIR = "sp ace ${x} \"q\" back\\slash ''x'' é\ttab $"
ODD_MOUNT = "/workspaces/we ird/${x}/''/\"q\"/back\\slash/é/$"
ODD_TARGET = "/mnt/${HOME}/it's \"q\"/''"
ODD_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHN0dWIga2V5 comment ${x} \"q\" \\ '' é\t$")
ODD_FLAKE = "github:owner/repo/${x}\\''$"


def test_user_strings_survive_rendering(tmp_path):
    project = tmp_path / "odd"
    (project / ODD_DIR).mkdir(parents=True)
    env = {f"V{index:02d}": value for index, value in enumerate(CORPUS)}
    doc = {
        "vm": {"name": "odd"},
        "workspace": {"mount": ODD_MOUNT},
        "shares": [{"source": ODD_DIR, "target": ODD_TARGET, "readonly": True}],
        "nix": {"mariner": ODD_FLAKE},
        "env": env,
    }
    (project / "mariner.toml").write_text(tomlkit.dumps(doc))
    cfg = load_project(project_dir=project)
    assert cfg.env_dict == env                     # TOML itself kept every string
    flakes = {}
    for mode, port in (("bridge", None), ("user", 2222)):
        if mode == "user":
            doc["network"] = {"mode": "user"}
            (project / "mariner.toml").write_text(tomlkit.dumps(doc))
            cfg = load_project(project_dir=project)
        flake = render_flake(cfg, cid=77, ssh_port=port, public_key=ODD_KEY)
        flakes[mode] = write_flake(flake, tmp_path / "flakes" / mode)
    nix_parse([p for d in flakes.values() for p in d.rglob("*.nix")])
    results = eval_flakes(flakes)
    for mode, result in results.items():
        vm = result["vm"]
        assert vm["environment"]["variables"] == env, mode
        assert vm["mariner"]["ssh"]["authorizedKey"] == ODD_KEY
        workspace, share = vm["microvm"]["shares"]
        assert workspace["source"] == str(project) and workspace["mountPoint"] == ODD_MOUNT
        assert share["source"] == str(project / ODD_DIR)
        assert share["mountPoint"] == ODD_TARGET and share["readOnly"] is True
        assert result["inputs"]["mariner"]["url"] == ODD_FLAKE
        assert result["names"] == ["odd"]
