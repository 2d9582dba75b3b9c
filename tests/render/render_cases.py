"""Representative projects rendered to VM flakes, and the Nix calls that check them.

The cases are shared by the golden, parse, evaluation and contract tests. Everything that
depends on the machine (temporary paths, the public key, the Nix system, the host uid) is
fixed or normalised, so the golden files are the same everywhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mariner_dev.config import load_project
from mariner_dev.model import ProjectConfig
from mariner_dev.nixrender import RenderedFlake, nix_string, nix_system, render_flake, write_flake
from support.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
NIXSTUB = REPO / "tests" / "support" / "nixstub.nix"
STUB_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHN0dWIga2V5IGZvciBtYXJpbmVyIHRlc3Rz "
            "mariner-test@stub")
# The per-user config every case sees: the ids would otherwise be the developer's.
USER_CONFIG = "[vm]\nuid = 1000\ngid = 100\n"


@dataclass(frozen=True)
class Spec:
    """A project to render: an example directory or a mariner.toml plus files, and the
    cid / SSH port that allocation would have given it."""

    name: str
    cid: int
    ssh_port: int | None = None
    example: str | None = None
    toml: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    dirs: tuple[str, ...] = ()


SPECS = [
    Spec("example-minimal", cid=7, example="minimal"),
    Spec("example-webapp", cid=8, ssh_port=2222, example="webapp"),
    Spec("example-docker", cid=9, example="docker"),
    Spec("bridge-interface-gid", cid=42, toml="""
[vm]
name = "lab"
cpus = 6
memory = 3072
hypervisor = "crosvm"
user = "dev"
uid = 1234
gid = 2345

[network]
mode = "bridge"
interface = "microvm-lab"

[workspace]
mount = "/srv/lab"

[nix]
packages = ["ripgrep", "python312Packages.pip", "haskellPackages.lens"]
"""),
    Spec("user-shares", cid=200, ssh_port=2299, toml="""
[vm]
name = "9lives"
cpus = 1
memory = "512MiB"

[network]
mode = "user"
interface = "mr-user0"

[[shares]]
source = "data"
target = "/data"
readonly = true

[[shares]]
source = "~/cache dir"
target = "/var/cache/app"
tag = "app-cache"
readonly = false

[storage]
persist = "1GiB"
nix_store = 4096
docker = "2G"

[docker]
enable = true

[env]
APP_ENV = "test"
EMPTY = ""
""", dirs=("data", "~/cache dir")),
    Spec("modules", cid=10, toml="""
[vm]
name = "let"

[nix]
modules = ["nix/extra module.nix", "nix/dirmod"]
""", files={
        "nix/extra module.nix": "{ pkgs, ... }:\n{\n  programs.git.enable = true;\n}\n",
        "nix/dirmod/default.nix": "{ ... }:\n{\n  imports = [ ./helper.nix ];\n}\n",
        "nix/dirmod/helper.nix": "{ ... }:\n{\n  services.openssh.enable = true;\n}\n",
    }),
]
SPEC_NAMES = [s.name for s in SPECS]


def build_project(spec: Spec, root: Path, home: Path) -> Path:
    """The project directory of a spec, created under `root`."""
    directory = root / "projects" / spec.name
    if spec.example:
        shutil.copytree(REPO / "examples" / spec.example, directory)
        return directory
    directory.mkdir(parents=True)
    (directory / "mariner.toml").write_text(spec.toml.lstrip())
    for rel, text in spec.files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_text(text)
    for rel in spec.dirs:
        (home / rel[2:] if rel.startswith("~/") else directory / rel).mkdir(parents=True)
    return directory


@dataclass
class Rendered:
    spec: Spec
    project: Path
    cfg: ProjectConfig
    flake: RenderedFlake
    directory: Path          # where write_flake put it


def isolated(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """Point HOME, MARINER_HOME and the XDG directories into `root` (for wide-scoped fixtures,
    which run before the autouse per-test isolation)."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    for var, sub in (("HOME", "home"), ("MARINER_HOME", "mariner-home"),
                     ("MARINER_MICROVMS_DIR", "microvms"), ("XDG_CONFIG_HOME", "xdg-config"),
                     ("XDG_STATE_HOME", "xdg-state"), ("XDG_CACHE_HOME", "xdg-cache")):
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("XDG_DATA_HOME", str(root / "xdg-data"))
    monkeypatch.setenv("MARINER_BACKEND", "microvm")  # the golden flakes are the host module's
    config = root / "xdg-config" / "mariner" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(USER_CONFIG)
    return home


def render_spec(spec: Spec, root: Path, home: Path, public_key: str = STUB_KEY) -> Rendered:
    project = build_project(spec, root, home)
    cfg = load_project(project_dir=project)
    flake = render_flake(cfg, cid=spec.cid, ssh_port=spec.ssh_port, public_key=public_key)
    directory = write_flake(flake, root / "flakes" / spec.name)
    return Rendered(spec, project, cfg, flake, directory)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Rendered]:
    """Every spec rendered and written, in its own isolated environment."""
    root = tmp_path_factory.mktemp("render")
    with pytest.MonkeyPatch.context() as mp:
        home = isolated(mp, root)
        return {spec.name: render_spec(spec, root, home) for spec in SPECS}


def normalise(r: Rendered, root: Path) -> dict[str, bytes]:
    """The rendered files with the machine-dependent parts replaced by placeholders."""
    out = {}
    for rel, data in r.flake.files.items():
        text = data.decode()
        text = text.replace(str(root), "@ROOT@").replace(r.flake.hash, "@HASH@")
        text = text.replace(nix_string(nix_system()), '"@SYSTEM@"')
        out[rel] = text.encode()
    return out


# -- Nix --------------------------------------------------------------------------------------

def nix_parse(files: list[Path]) -> None:
    """Parse every file with the real Nix parser; fail naming the first file it rejects."""
    nix = require_tool("nix-instantiate")
    assert files
    proc = subprocess.run([nix, "--parse", *map(str, files)], capture_output=True, text=True)
    if proc.returncode != 0:
        for path in files:
            one = subprocess.run([nix, "--parse", str(path)], capture_output=True, text=True)
            assert one.returncode == 0, f"{path} does not parse:\n{one.stderr}\n{path.read_text()}"
        pytest.fail(f"nix-instantiate --parse failed:\n{proc.stderr}")


def nix_eval(expr: str, cwd: Path | None = None):
    """`nix-instantiate --eval --strict --json` of an expression, as Python data."""
    nix = require_tool("nix-instantiate")
    proc = subprocess.run([nix, "--eval", "--strict", "--json", "-E", expr],
                          capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, f"nix-instantiate --eval failed:\n{proc.stderr}\n{expr}"
    return json.loads(proc.stdout)


def nix_path(path: Path) -> str:
    """A Nix path expression for an absolute path of any spelling."""
    return f"(/. + {nix_string(str(path))})"


# Calls the flake's outputs with stub inputs, then calls its vm.nix module (taken from the
# modules list, so that the test follows the wiring) with the stub lib.
EVAL_FLAKE = """
let
  lib = import %(stub)s;
  mariner = {
    inputs.nixpkgs.lib.nixosSystem = args: args;
    nixosModules.default = "<mariner-module>";
  };
  show = m: if builtins.typeOf m == "path" then "path:" + toString m else m;
  evalFlake = dir:
    let
      flake = import (dir + "/flake.nix");
      out = flake.outputs { self = { }; inherit mariner; };
      names = builtins.attrNames out.nixosConfigurations;
      system = out.nixosConfigurations.${builtins.head names};
      extra = builtins.tail (builtins.tail system.modules);
    in {
      inherit names;
      description = flake.description;
      inputs = flake.inputs;
      system = system.system;
      configKeys = builtins.attrNames system;
      modules = map show system.modules;
      vm = import (builtins.elemAt system.modules 1) { inherit lib; pkgs = { }; };
      extraAreFunctions = map (m: builtins.isFunction (import m)) extra;
    };
in
"""


def eval_flakes(directories: dict[str, Path]):
    """Evaluate several rendered flakes in one nix-instantiate call: name -> result."""
    body = " ".join(f"{nix_string(name)} = evalFlake {nix_path(d)};"
                    for name, d in directories.items())
    return nix_eval(EVAL_FLAKE % {"stub": nix_path(NIXSTUB)} + "{ " + body + " }")


@pytest.fixture(scope="module")
def evaluated(rendered):
    return eval_flakes({name: r.directory for name, r in rendered.items()})
