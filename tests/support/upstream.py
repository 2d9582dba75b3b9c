"""Rendered flakes evaluated through the real nix-mariner and microvm.nix modules.

The pinned sources (nixpkgs `lib`, nix-mariner, microvm.nix) come from MARINER_UPSTREAM_SRC,
else ../shared/upstream/src beside the repository. `evaluate` runs one nix-instantiate for any
number of flakes (tests/support/upstream/eval.nix) and returns the values mariner relies on.
Outside pytest too (the real-VM tier's host evaluates the flakes it boots): pytest is imported
only by `upstream_src`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent / "upstream"
EVAL_NIX = HERE / "eval.nix"
SHARED = HERE.parent.parent.parent.parent / "shared"

# The revisions a real build of a mariner VM uses (nix-mariner pins microvm.nix in its lock).
PINS = {
    "nix-mariner": ("https://github.com/mksafavi/nix-mariner",
                    "a34eea014f697d640cf1fc51df94db8ae164028d"),
    "microvm.nix": ("https://github.com/microvm-nix/microvm.nix",
                    "3ecfea2514bc849ce559cc4ce44f19d0a8006aa4"),
    "nixpkgs-lib": ("https://github.com/nix-community/nixpkgs.lib",
                    "de42d44212d207476489bce163375d8306a26d59"),
}
_MARKERS = ("nixpkgs-lib/lib/default.nix", "nix-mariner/flake.nix", "nix-mariner/modules",
            "microvm.nix/flake.nix", "microvm.nix/nixos-modules/microvm/default.nix")


def how_to_get_sources(directory: Path) -> str:
    steps = "; ".join(
        f"git clone {url} {directory}/{name} && git -C {directory}/{name} checkout {rev}"
        for name, (url, rev) in PINS.items())
    return (f"get them with `scripts/upstream-src {directory}` (or by hand: {steps}), "
            f"or point MARINER_UPSTREAM_SRC at a directory holding them")


class SourcesMissing(Exception):
    """The pinned sources are not where MARINER_UPSTREAM_SRC or ../shared says."""


def locate_src() -> Path:
    """The pinned sources, or SourcesMissing saying how to get them."""
    env = os.environ.get("MARINER_UPSTREAM_SRC")
    src = Path(env).absolute() if env else SHARED / "upstream" / "src"
    missing = [m for m in _MARKERS if not (src / m).exists()]
    if missing:
        raise SourcesMissing(f"the pinned nix-mariner/microvm.nix/nixpkgs-lib sources are not "
                             f"in {src} (no {missing[0]}): {how_to_get_sources(src)}")
    lock = json.loads((src / "nix-mariner" / "flake.lock").read_text())
    pinned = lock["nodes"]["microvm"]["locked"]["rev"]
    if pinned != PINS["microvm.nix"][1]:
        raise SourcesMissing(f"{src}/nix-mariner is not the pinned revision "
                             f"{PINS['nix-mariner'][1]}: its lock pins microvm.nix {pinned}")
    return src


def upstream_src() -> Path:
    """The pinned sources, for a test; missing, the test fails and says how to get them (never
    a skip: a run that did not evaluate through the real modules must not pass)."""
    import pytest

    try:
        return locate_src()
    except SourcesMissing as exc:
        pytest.fail(str(exc))


def nix_string(value: str) -> str:
    return json.dumps(value).replace("${", "\\${")


class EvaluationFailed(AssertionError):
    """nix-instantiate rejected a flake: the message carries its error."""


def evaluate(flakes: dict[str, Path], system: str = "x86_64-linux",
             src: Path | None = None) -> dict[str, dict]:
    """Evaluate rendered flake directories (name -> directory) in one nix-instantiate call."""
    src = src or upstream_src()
    nix = shutil.which("nix-instantiate")
    if nix is None:
        raise EvaluationFailed("nix-instantiate is not installed (Debian: nix-bin)")
    attrs = " ".join(f"{nix_string(name)} = /. + {nix_string(str(Path(d).absolute()))};"
                     for name, d in flakes.items())
    expr = (f"import (/. + {nix_string(str(EVAL_NIX))}) {{ src = /. + {nix_string(str(src))}; "
            f"system = {nix_string(system)}; flakes = {{ {attrs} }}; }}")
    proc = subprocess.run([nix, "--eval", "--strict", "--json", "-E", expr],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise EvaluationFailed(f"evaluating {sorted(flakes)} through the real modules "
                               f"failed:\n{_stderr(proc.stderr)}")
    results = json.loads(proc.stdout)
    for result in results.values():
        run = result.pop("virtiofsdRun")
        result["virtiofsdRunText"] = run
        if run is not None and MARINER_VIRTIOFSD_MARK in run:
            result["virtiofsd"] = mariner_virtiofsd_commands(run, result["shares"])
        else:
            result["virtiofsd"] = virtiofsd_commands(run)
    return results


def evaluate_one(directory: Path, src: Path | None = None) -> dict:
    return evaluate({"vm": directory}, src=src)["vm"]


def _stderr(text: str) -> str:
    lines = [line for line in text.splitlines()
             if "build-users-group" not in line]  # Debian's nix without the nixbld group
    return "\n".join(lines[-60:])


# -- reading the virtiofsd command lines out of the evaluation ----------------------------------

_EMBEDDED = re.compile(r"/nix/store/stub-[^#\s]*#")


def _embedded(text: str, start: int = 0):
    """The record a stub script writer embedded after its store path (see pkgs.nix)."""
    match = _EMBEDDED.search(text, start)
    if match is None:
        return None, -1
    value, end = json.JSONDecoder().raw_decode(text, match.end())
    return value, end


def virtiofsd_commands(run: str | None) -> dict[str, list[str]]:
    """tag -> the virtiofsd argv (program first) that microvm.nix's supervisord starts for
    that share."""
    if run is None:
        return {}
    config, _ = _embedded(run)
    assert config and config["kind"] == "text", run
    commands: dict[str, list[str]] = {}
    section = None
    for line in config["text"].splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line.startswith("command=") and section.startswith("program:virtiofsd-"):
            script, _ = _embedded(line)
            assert script["kind"] == "shell", line
            commands[section.removeprefix("program:virtiofsd-")] = _exec_argv(script["text"])
    return commands


# mariner's own virtiofsd-run (the flake's virtiofsd.nix, when the developer is not root)
MARINER_VIRTIOFSD_MARK = "# mariner: virtiofsd as the developer"


def mariner_virtiofsd_commands(run: str, shares: list[dict]) -> dict[str, list[str]]:
    """tag -> the virtiofsd argv (program first) that mariner's virtiofsd-run starts, each
    behind the privilege drop (`"${drop[@]}" <virtiofsd> ... &`)."""
    tags = {share["socket"]: share["tag"] for share in shares}
    commands: dict[str, list[str]] = {}
    for line in run.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith('"${drop[@]}" '):
            argv = shlex.split(line)[1:]
            assert argv[-1] == "&", line
            argv = argv[:-1]
            socket = next(a.split("=", 1)[1] for a in argv if a.startswith("--socket-path="))
            commands[tags[socket]] = argv
    return commands


def _exec_argv(script: str) -> list[str]:
    joined = script.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.lstrip().startswith("exec "))
    return shlex.split(line)[1:]
