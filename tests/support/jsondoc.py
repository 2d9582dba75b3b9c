"""The --json contract: one document per invocation, valid against schema/<command>.output.schema.json."""

from __future__ import annotations

import json
from functools import lru_cache

from support.tools import REPO


@lru_cache(maxsize=None)
def validator(command: str):
    from jsonschema import Draft202012Validator

    schema = json.loads((REPO / "schema" / f"{command}.output.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def document(command: str, stdout: str, exit_code: int | None = None) -> dict:
    """The one JSON document `mariner COMMAND --json` printed, checked against its schema (and
    its outcome against the exit code, when given)."""
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected exactly one JSON line, got: {stdout!r}"
    data = json.loads(lines[0])
    errors = sorted(validator(command).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, f"{command} --json: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    if exit_code is not None:
        assert (data["outcome"] == "success") == (exit_code == 0), (exit_code, data)
        if data["outcome"] == "error":
            assert data["exit_code"] == exit_code
    return data
