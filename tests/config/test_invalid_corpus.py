"""Every file of the invalid corpus: exit 2, the key, line and column, nothing written or run."""

from __future__ import annotations

import json
import os

import pytest

from config_corpus import fake_host_commands, invalid_cases, place, snapshot

CASES = invalid_cases()

# The "Bad input" classes of issue 2, each with the corpus files that cover it.
CLASSES = {
    "TOML syntax error": ["syntax-unclosed-table", "syntax-duplicate-key", "syntax-bad-number",
                          "syntax-unterminated-string", "syntax-duplicate-table",
                          "syntax-not-utf8", "user-config-syntax"],
    "wrong type": ["type-cpus-string", "type-memory-bool", "type-docker-enable-string",
                   "type-vm-array-of-tables", "type-env-value-integer", "type-packages-string",
                   "type-share-readonly-string", "type-cpus-float"],
    "cpus < 1": ["cpus-zero", "cpus-negative-inline"],
    "memory under 256 MiB": ["memory-int-below-minimum", "memory-string-below-minimum"],
    "cid outside 3-254": ["cid-below-range", "cid-above-range"],
    "unknown hypervisor": ["hypervisor-typo", "hypervisor-unknown"],
    "share target not absolute": ["share-target-relative"],
    "share target duplicated": ["share-target-duplicate"],
    "share target overlapping the workspace": ["share-target-inside-workspace",
                                               "share-target-above-workspace"],
    "share source missing": ["share-source-missing"],
    "share source not a directory": ["share-source-not-a-directory"],
    "package not an attribute path": ["package-with-space", "package-empty-segment",
                                      "package-nix-expression"],
    "env name not a variable name": ["env-name-leading-digit", "env-name-dash"],
    "ports out of range": ["port-zero", "port-too-large", "port-pair-out-of-range",
                           "ssh-port-out-of-range"],
    "ports duplicated": ["port-duplicate", "port-same-as-ssh-port"],
    "name that cannot be made valid": ["name-from-directory", "name-from-directory-no-vm-table",
                                       "name-invalid-characters", "name-too-long"],
    "user-mode networking without qemu": ["user-mode-crosvm", "user-mode-crosvm-dotted"],
    "hypervisor that cannot boot nix-mariner's shares": [
        "hypervisor-cannot-boot-cloud-hypervisor", "hypervisor-cannot-boot-firecracker-user-mode"],
    "exactly 2 GiB with QEMU": ["memory-exactly-2gib-qemu", "memory-2048-qemu"],
    "[network] dns not an IP address": ["network-dns-not-an-address"],
    "duplicate share tags": ["share-tag-duplicate", "share-tag-reserved"],
    "interface id over 15 characters": ["interface-too-long", "interface-user-mode-too-long"],
    "unknown key with did-you-mean": ["unknown-key-did-you-mean", "unknown-table-did-you-mean",
                                      "unknown-key-in-share", "unknown-key-inline-table"],
    "per-user config errors name that file": ["user-config-type", "user-config-project-table",
                                              "user-config-project-key", "user-config-syntax",
                                              "user-config-identity-missing"],
    "several errors at once": ["several-errors"],
}


def test_corpus_covers_every_bad_input_class():
    names = {case.name for case in CASES}
    assert len(CASES) >= 40
    missing = {cls: [n for n in files if n not in names] for cls, files in CLASSES.items()}
    assert not {cls: files for cls, files in missing.items() if files}
    for case in CASES:
        assert case.expects, f"{case.path} has no `# expect:` line"
        assert case.jsonschema in ("reject", "accept", "n/a"), f"{case.path}: `# jsonschema:`"
    assert sum(len(c.expects) > 1 for c in CASES) >= 1


@pytest.fixture
def host_log(isolated_env, monkeypatch):
    """Host commands on PATH that log any call: an invalid config must run none of them."""
    # beside the isolated tree, so that the snapshot of the tree does not include them
    log = isolated_env.parent / f"{isolated_env.name}-host-commands.log"
    bindir = isolated_env.parent / f"{isolated_env.name}-bin"
    fake_host_commands(bindir, log)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return log


def _error_lines(stderr: str) -> list[str]:
    lines = [line.strip() for line in stderr.splitlines()]
    lines = [line.removeprefix("mariner: error:").strip() for line in lines]
    return [line for line in lines if line]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_invalid_file(case, isolated_env, run_cli, host_log):
    project, bad_file = place(case, isolated_env)
    before = snapshot(isolated_env)

    code, out, err = run_cli("validate", cwd=project)
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == len(case.expects), err
    for expect in case.expects:
        where = f"{bad_file}:{expect.line}:{expect.column}: "
        prefix = where + (f"{expect.key}: " if expect.key else "")
        hits = [line for line in lines if line.startswith(prefix)]
        assert hits, f"no error at {prefix!r} in:\n{err}"
        assert any(expect.fragment in line[len(prefix):] for line in hits), (expect, err)

    code, out, err = run_cli("validate", "--json", cwd=project)
    assert code == 2
    assert "Traceback" not in err
    data = json.loads(out)
    assert set(data) == {"version", "outcome", "valid", "message", "hint", "exit_code",
                         "errors"} and data["valid"] is False
    assert all(set(e) == {"file", "line", "column", "key", "message"} for e in data["errors"])
    got = sorted((e["file"], e["key"], e["line"], e["column"]) for e in data["errors"])
    want = sorted((str(bad_file), x.key, x.line, x.column) for x in case.expects)
    assert got == want
    for expect in case.expects:
        assert any(e["key"] == expect.key and e["line"] == expect.line
                   and expect.fragment in e["message"] for e in data["errors"]), expect

    # render refuses the same file before it reserves, generates or writes anything
    code, out, err = run_cli("render", cwd=project)
    assert code == 2 and out == "" and "Traceback" not in err

    assert snapshot(isolated_env) == before
    assert not host_log.exists(), host_log.read_text()
