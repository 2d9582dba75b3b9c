"""Contract: every microvm.* and mariner.* value a rendered module sets, as Nix evaluates it,
is an option the pinned upstream declares, with a value of the declared type, enum and range.

The inventory is ../shared/upstream/nix-options.json (beside the repository; CI puts a copy of
shared/ there). What microvm.nix asserts only at build time is evaluated for real in
test_upstream_eval.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from render_cases import REPO, SPEC_NAMES, evaluated, rendered  # noqa: F401

INVENTORY = REPO.parent / "shared" / "upstream" / "nix-options.json"


def load_inventory() -> tuple[dict, set]:
    if not INVENTORY.is_file():
        pytest.fail(f"{INVENTORY} is missing: the contract test needs the upstream option "
                    f"inventory (a copy of shared/ beside the repository)")
    data = json.loads(INVENTORY.read_text())
    return {o["path"]: o for o in data["options"]}, {o["path"] for o in data["removed_options"]}


# -- the declared types -----------------------------------------------------------------------

_TOKEN = re.compile(r'"[^"]*"|[()\[\]]|[^\s()\[\]]+')


def parse_type(text: str):
    """`nullOr (enum [ "a" "b" ])` -> ("nullOr", ("enum", ["a", "b"])), and so on."""
    tokens = _TOKEN.findall(text)

    def expr(i):
        tok = tokens[i]
        if tok == "(":
            node, i = expr(i + 1)
            assert tokens[i] == ")", text
            return node, i + 1
        if tok in ("nullOr", "listOf", "attrsOf"):
            arg, i = expr(i + 1)
            return (tok, arg), i
        if tok in ("enum", "oneOf"):
            assert tokens[i + 1] == "[", text
            items, i = [], i + 2
            while tokens[i] != "]":
                if tok == "enum":
                    items.append(json.loads(tokens[i]))
                    i += 1
                else:
                    node, i = expr(i)
                    items.append(node)
            return (tok, items), i + 1
        if tok == "mkOptionType":
            return ("opaque", tokens[i + 1]), i + 2
        return (tok,), i + 1

    node, end = expr(0)
    assert end == len(tokens), text
    return node


class Checker:
    """Walks evaluated option values against the inventory, collecting every problem."""

    def __init__(self, options: dict, removed: set):
        self.options, self.removed = options, removed
        self.problems: list[str] = []
        self.checked: set[str] = set()

    def option(self, path: str, value) -> None:
        if path in self.removed:
            self.problems.append(f"{path}: removed upstream, setting it is an evaluation error")
            return
        entry = self.options.get(path)
        if entry is None:
            if isinstance(value, dict) and any(p.startswith(path + ".") for p in self.options):
                for key, sub in value.items():
                    self.option(f"{path}.{key}", sub)
            else:
                self.problems.append(f"{path}: not declared by nix-mariner or microvm.nix")
            return
        self.checked.add(path)
        self.value(parse_type(entry["type_expr"]), _unwrap(value), path, entry)

    def value(self, t, value, path: str, entry: dict | None) -> None:
        kind = t[0]
        bad = lambda why: self.problems.append(  # noqa: E731
            f"{path}: {json.dumps(value)[:80]} {why} ({entry['type'] if entry else kind})")
        if kind == "nullOr":
            if value is not None:
                self.value(t[1], value, path, entry)
        elif kind == "listOf":
            if not isinstance(value, list):
                return bad("is not a list")
            for item in value:
                self.value(t[1], _unwrap(item), path + ".*", None)
        elif kind == "attrsOf":
            if not isinstance(value, dict):
                return bad("is not an attribute set")
            for item in value.values():
                self.value(t[1], _unwrap(item), path + ".<name>", None)
        elif kind == "submodule":
            if not isinstance(value, dict):
                return bad("is not an attribute set")
            freeform = (self.options.get(path) or {}).get("freeform") or any(
                self.options.get(p, {}).get("freeform") for p in (path.rsplit(".", 1)[0],))
            for key, sub in value.items():
                sub_path = f"{path}.{key}"
                if freeform and not any(p == sub_path or p.startswith(sub_path + ".")
                                        for p in self.options):
                    continue
                self.option(sub_path, sub)
        elif kind == "enum":
            if value not in t[1]:
                bad(f"is not one of {t[1]}")
        elif kind == "oneOf":
            before = list(self.problems)
            for alternative in t[1]:
                self.problems = list(before)
                self.value(alternative, value, path, entry)
                if self.problems == before:
                    return
            self.problems = before
            bad("fits none of the alternatives")
        elif kind in ("str", "lines"):
            if not isinstance(value, str):
                bad("is not a string")
        elif kind == "nonEmptyStr":
            if not isinstance(value, str) or not value.strip():
                bad("is not a non-empty string")
        elif kind == "bool":
            if not isinstance(value, bool):
                bad("is not a boolean")
        elif kind in ("int", "ints.positive", "ints.unsigned", "port"):
            if not isinstance(value, int) or isinstance(value, bool):
                return bad("is not an integer")
            low, high = {"int": (None, None), "ints.positive": (1, None),
                         "ints.unsigned": (0, None), "port": (0, 65535)}[kind]
            rng = (entry or {}).get("int_range") or {}
            low, high = rng.get("min", low), rng.get("max", high)
            if (low is not None and value < low) or (high is not None and value > high):
                bad(f"is outside {low}..{high}")
        elif kind == "path":
            if not isinstance(value, str) or not value.startswith("/"):
                bad("is not an absolute path")
        else:
            bad("has a type this test cannot check: mariner should not set it")


def _unwrap(value):
    """The content of a lib.mkForce / mkDefault / mkBefore record (the stub lib keeps their
    shape)."""
    while isinstance(value, dict) and value.get("_type") in ("override", "order"):
        value = value["content"]
    return value


# -- the tests --------------------------------------------------------------------------------

def test_inventory_is_the_pinned_one():
    options, removed = load_inventory()
    assert "mariner.ssh.authorizedKey" in options and "mariner.hostAuthorizedKey" not in options
    assert "microvm.balloonMem" in removed
    # every type the inventory uses parses, so no declared option escapes the checker
    for entry in options.values():
        parse_type(entry["type_expr"])


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_rendered_values_fit_the_upstream_declarations(evaluated, name):  # noqa: F811
    options, removed = load_inventory()
    vm = evaluated[name]["vm"]
    checker = Checker(options, removed)
    for top in ("microvm", "mariner"):
        checker.option(top, vm[top])
    assert not checker.problems, "\n".join(checker.problems)
    assert {"mariner.cid", "mariner.ssh.authorizedKey", "mariner.username", "microvm.vcpu",
            "microvm.mem", "microvm.hypervisor", "microvm.shares"} <= checker.checked
    assert not (checker.checked & removed)
    # what microvm.nix asserts beyond the types: tests/render/test_upstream_eval.py evaluates
    # the real assertions


def test_the_spread_covers_what_mariner_can_set(evaluated):  # noqa: F811
    options, removed = load_inventory()
    checker = Checker(options, removed)
    for result in evaluated.values():
        for top in ("microvm", "mariner"):
            checker.option(top, result["vm"][top])
    assert {"microvm.interfaces", "microvm.forwardPorts", "mariner.network.address",
            "mariner.network.gateway", "mariner.network.dns", "mariner.docker.enable",
            "mariner.storage.persistSizeMiB", "mariner.storage.nixStoreSizeMiB",
            "mariner.storage.dockerSizeMiB"} <= checker.checked
    hypervisors = {r["vm"]["microvm"]["hypervisor"] for r in evaluated.values()}
    assert {"qemu", "crosvm"} <= hypervisors


def test_checker_finds_what_upstream_would_reject():
    """The checker itself can fail: each defect below is reported."""
    options, removed = load_inventory()
    bad = {
        "microvm": {
            "vcpu": 0, "mem": "4096", "hypervisor": "virtualbox", "balloonMem": 512,
            "shares": [{"proto": "nfs", "tag": "ro-store", "source": "", "mountPoint": "data",
                        "readOnly": "no", "bogus": 1}],
            "forwardPorts": [{"from": "host", "proto": "tcp",
                              "host": {"address": "", "port": 70000}, "guest": {"port": 22}}],
            "interfaces": [{"type": "user", "id": "a-very-long-interface", "mac": "x"}],
            "vsock": {"cid": "seven"},
        },
        "mariner": {"cid": -1, "hostAuthorizedKey": "ssh-ed25519 AAAA",
                    "storage": {"persistSizeMiB": 0}, "docker": {"enable": "yes"}},
    }
    checker = Checker(options, removed)
    for top in ("microvm", "mariner"):
        checker.option(top, bad[top])
    report = "\n".join(checker.problems)
    for fragment in ("microvm.vcpu: 0 is outside 1", 'microvm.mem: "4096" is not an integer',
                     "microvm.hypervisor", "microvm.balloonMem: removed",
                     "microvm.shares.*.proto", "microvm.shares.*.source",
                     "microvm.shares.*.mountPoint", "microvm.shares.*.readOnly",
                     "microvm.shares.*.bogus: not declared",
                     "microvm.forwardPorts.*.host.port: 70000 is outside 0..65535",
                     "microvm.vsock.cid", "mariner.cid: -1 is outside 0",
                     "mariner.hostAuthorizedKey: not declared",
                     "mariner.storage.persistSizeMiB: 0", "mariner.docker.enable"):
        assert fragment in report, (fragment, report)
