"""Rendered flakes are parsed by the real Nix; the flake's shape and the packages it asks of
nixpkgs are evaluated against stub inputs (no nixpkgs here)."""

from __future__ import annotations

import pytest

from mariner_dev.nixrender import nix_system
from render_cases import (SPEC_NAMES, GOLDEN, evaluated, nix_parse,  # noqa: F401
                          rendered)

MARINER_URL = "github:mksafavi/nix-mariner/a34eea014f697d640cf1fc51df94db8ae164028d"


def test_every_rendered_file_parses(rendered):  # noqa: F811
    files = [p for r in rendered.values() for p in r.directory.rglob("*.nix")]
    # flake.nix, vm.nix and every copied module, for every case
    assert len(files) == sum(sum(rel.endswith(".nix") for rel in r.flake.files)
                             for r in rendered.values())
    nix_parse(files + sorted(GOLDEN.rglob("*.nix")))


def test_parse_check_can_fail(tmp_path):
    good, bad = tmp_path / "good.nix", tmp_path / "bad.nix"
    good.write_text("{ a = 1; }")
    bad.write_text('{ a = "unterminated; }')
    nix_parse([good])
    # a bad file after a good one is still found: one call parses every file it is given
    with pytest.raises(AssertionError, match="bad.nix does not parse"):
        nix_parse([good, bad])


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_flake_shape(evaluated, rendered, name):  # noqa: F811
    e, r = evaluated[name], rendered[name]
    assert e["names"] == [r.cfg.name]            # nixosConfigurations.<name> = the VM name
    assert e["inputs"] == {"mariner": {"url": MARINER_URL}}
    assert e["description"] == f"mariner VM {r.cfg.name}"
    assert e["system"] == nix_system()
    assert sorted(e["configKeys"]) == ["modules", "system"]
    assert e["modules"][0] == "<mariner-module>"
    assert e["modules"][1] == f"path:{r.directory}/vm.nix"
    assert e["modules"][2:] == [f"path:{r.directory}/{rel}" for rel in sorted(
        {"/".join(k.split("/")[:2]) for k in r.flake.files if k.startswith("modules/")})]
    assert all(e["extraAreFunctions"])


# What the rendered vm.nix asks of nixpkgs (packages by attribute path) and the login
# environment: the stub lib returns the attribute path it would look up. Everything else a
# flake sets is read from its evaluation through the real modules (test_upstream_eval.py).
PACKAGES_AND_ENV = {
    "example-minimal": ([], None),
    "example-webapp": (["git", "gnumake", "nodejs_22", "python312", "python312Packages.pip",
                        "postgresql_16"],
                       {"APP_ENV": "development", "DATABASE_URL": "postgres://localhost:5432/app"}),
    "example-docker": (["docker-compose", "jq"], None),
    "bridge-interface-gid": (["ripgrep", "python312Packages.pip", "haskellPackages.lens"], None),
    "user-shares": ([], {"APP_ENV": "test", "EMPTY": ""}),
    "modules": ([], None),
}


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_packages_and_environment(evaluated, name):  # noqa: F811
    vm = evaluated[name]["vm"]
    packages, env = PACKAGES_AND_ENV[name]
    assert vm.get("environment", {}).get("systemPackages", []) == packages
    assert vm.get("environment", {}).get("variables") == env


def test_modules_case(evaluated):  # noqa: F811
    e = evaluated["modules"]
    assert e["names"] == ["let"]
    assert [m.rsplit("/", 1)[-1] for m in e["modules"][1:]] == [
        "vm.nix", "0-extra-module.nix", "1-dirmod"]
    assert len(evaluated["example-docker"]["modules"]) == 3
