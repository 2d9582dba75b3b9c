"""The JSON Schema is well-formed, documented, fully implemented, and agrees with mariner.

mariner validates with its own small implementation of the schema's keywords; jsonschema is the
reference implementation. Both must give the same verdict on every example, every valid corpus
file and every structurally invalid corpus file, so model and schema cannot drift apart.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest

from config_corpus import REPO, VALID_DIR, dotted, invalid_cases
from mariner_dev import model
from mariner_dev.config import load_project, parse_size_mib
from mariner_dev.schema import SUPPORTED_KEYWORDS, load_schema, schema_path, walk_keywords

SCHEMA_FILE = REPO / "schema" / "mariner.schema.json"
EXAMPLES = sorted(p.parent for p in (REPO / "examples").glob("*/mariner.toml"))
VALID = sorted(VALID_DIR.glob("*.toml"))


def reference_validator():
    schema = json.loads(SCHEMA_FILE.read_text())
    return jsonschema.Draft202012Validator(schema)


def test_schema_is_valid_2020_12():
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema_path().resolve() == SCHEMA_FILE.resolve()


def test_schema_uses_only_keywords_mariner_implements():
    used = set(walk_keywords(load_schema()))
    assert used <= SUPPORTED_KEYWORDS, used - SUPPORTED_KEYWORDS
    # walk_keywords must see into every nesting the schema uses, or this test proves nothing
    assert {"items", "propertyNames", "additionalProperties", "pattern", "enum"} <= used


def _properties(schema: dict, path: str = ""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}", sub
        yield from _properties(sub, f"{path}{key}.")
    if isinstance(schema.get("items"), dict):
        yield from _properties(schema["items"], f"{path}*.")


def test_every_key_has_a_description():
    keys = list(_properties(load_schema()))
    assert len(keys) > 40
    undocumented = [path for path, sub in keys if not sub.get("description", "").strip()]
    assert not undocumented


def test_schema_covers_every_key_of_the_design():
    design_keys = {
        "vm": {"name", "cpus", "memory", "hypervisor", "user", "cid", "uid", "gid"},
        "network": {"mode", "ssh_port"}, "workspace": {"mount"},
        "nix": {"packages", "modules", "mariner"}, "storage": {"persist", "nix_store", "docker"},
        "docker": {"enable"}, "dotfiles": {"files", "repository", "install"},
        "hooks": {"post_create", "post_start"}, "ports": {"forward"},
        "ssh": {"identity", "forward_agent"},
    }
    props = load_schema()["properties"]
    for table, keys in design_keys.items():
        assert keys <= set(props[table]["properties"]), table
    assert {"source", "target", "readonly"} <= set(props["shares"]["items"]["properties"])
    assert props["env"]["additionalProperties"]["type"] == "string"


def test_defaults_and_examples_fit_their_own_schema():
    checked = 0
    for path, sub in _properties(load_schema()):
        for value in ([sub["default"]] if "default" in sub else []) + sub.get("examples", []):
            errors = list(jsonschema.Draft202012Validator(sub).iter_errors(value))
            assert not errors, (path, value, errors[0].message)
            checked += 1
    assert checked > 30


def test_enums_agree_with_model_and_upstream():
    props = load_schema()["properties"]
    assert tuple(props["vm"]["properties"]["hypervisor"]["enum"]) == model.HYPERVISORS
    assert tuple(props["network"]["properties"]["mode"]["enum"]) == model.NETWORK_MODES
    options = json.loads((REPO.parent / "shared" / "upstream" / "nix-options.json").read_text())
    upstream = {o["path"]: o for o in options["options"]}
    assert upstream["microvm.hypervisor"]["enum"] == list(model.HYPERVISORS)


def test_documented_defaults_are_the_resolved_defaults(tmp_path):
    (tmp_path / "mariner.toml").write_text("")
    cfg = load_project(project_dir=tmp_path)
    props = load_schema()["properties"]

    def default(table, key):
        return props[table]["properties"][key]["default"]

    assert cfg.vm.cpus == default("vm", "cpus")
    assert cfg.vm.memory_mib == parse_size_mib(default("vm", "memory"))
    assert cfg.vm.hypervisor == default("vm", "hypervisor")
    assert cfg.vm.user == default("vm", "user")
    assert cfg.network.mode == default("network", "mode")
    assert cfg.storage.persist_mib == parse_size_mib(default("storage", "persist"))
    assert cfg.storage.nix_store_mib == parse_size_mib(default("storage", "nix_store"))
    assert cfg.storage.docker_mib == parse_size_mib(default("storage", "docker"))
    assert cfg.docker_enable is default("docker", "enable")
    assert cfg.ssh.forward_agent is False and default("ssh", "forward_agent") == []
    assert cfg.dotfiles.target == default("dotfiles", "target")
    assert list(cfg.nix.packages) == default("nix", "packages")


def _accepted_by_mariner(toml_file: Path, project: Path) -> None:
    project.mkdir(parents=True, exist_ok=True)
    (project / "mariner.toml").write_bytes(toml_file.read_bytes())
    load_project(project_dir=project)


@pytest.mark.parametrize("toml_file", [p / "mariner.toml" for p in EXAMPLES] + VALID,
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_valid_files_are_accepted_by_both(toml_file, tmp_path):
    if toml_file.parent.parent.name == "examples":
        load_project(project_dir=toml_file.parent)
    else:
        _accepted_by_mariner(toml_file, tmp_path / "proj")
    data = tomllib.loads(toml_file.read_text())
    errors = list(reference_validator().iter_errors(data))
    assert not errors, [e.message for e in errors]


STRUCTURAL = [c for c in invalid_cases() if c.jsonschema in ("reject", "accept")]


@pytest.mark.parametrize("case", STRUCTURAL, ids=str)
def test_jsonschema_agrees_with_the_corpus(case):
    """`reject` cases (types, enums, ranges, patterns, unknown keys) fail the reference validator
    where mariner reports them; `accept` cases are semantic checks the schema cannot express."""
    data = tomllib.loads(case.path.read_text())
    errors = list(reference_validator().iter_errors(data))
    if case.jsonschema == "accept":
        assert not errors, [e.message for e in errors]
        return
    assert errors
    expected_keys = [x.key for x in case.expects]
    for error in errors:
        where = dotted(error.absolute_path)
        assert any(key == where or key.startswith(where + ".") or key.startswith(where + "[")
                   or not where for key in expected_keys), (where, error.message)
    # and mariner reports at least one problem for every path jsonschema complains about
    complained = {dotted(e.absolute_path) for e in errors}
    assert all(any(k.startswith(w) for k in expected_keys) for w in complained)


def test_structural_cases_are_rejected_by_both():
    rejected = [c.name for c in STRUCTURAL if c.jsonschema == "reject"]
    # types, enums, ranges, patterns and unknown keys all appear among them
    for marker in ("type-", "hypervisor-", "cpus-", "cid-", "unknown-key", "package-", "port-zero"):
        assert any(name.startswith(marker) for name in rejected), marker


SIZE_SPELLINGS = ["8192", "8GiB", "8G", "8g", "8gib", "8GB", "512MiB", "512M", "1.5GiB", "1T",
                  "1024K", " 8 GiB ", "8Gi", "8 gigs", "8B", "8iB", "8gB", "8Gib", "-1", "",
                  "1.", ".5G", "8 G B", "0x10", "1e3", "1K", "1.3G", "0.5M"]
FRACTIONS_OF_A_MIB = {"1K", "1.3G", "0.5M"}


@pytest.mark.parametrize("text", SIZE_SPELLINGS)
def test_size_spellings_agree_with_the_schema_pattern(text):
    pattern = load_schema()["properties"]["vm"]["properties"]["memory"]["pattern"]
    schema_ok = re.search(pattern, text) is not None
    parsed = parse_size_mib(text)
    # the schema accepts exactly the spellings parse_size_mib understands (a fraction of a
    # MiB is the one thing only parse_size_mib can see)
    if text in FRACTIONS_OF_A_MIB:
        assert schema_ok and parsed is None
    else:
        assert schema_ok == (parsed is not None)
