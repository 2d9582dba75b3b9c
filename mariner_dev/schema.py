"""The JSON Schema of mariner.toml, and the small validator that checks files against it.

Validation runs against `schema/mariner.schema.json` itself, so the documented schema and
what mariner accepts cannot drift apart. Only the keywords the schema uses are implemented
(type, properties, additionalProperties, required, items, enum, minimum, maximum, pattern,
minLength, propertyNames); a test checks that the schema uses no others.
"""

from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

SUPPORTED_KEYWORDS = frozenset({
    "$schema", "$id", "title", "description", "default", "examples",
    "type", "properties", "additionalProperties", "required", "items", "enum",
    "minimum", "maximum", "pattern", "minLength", "propertyNames",
})

_TYPE_NAMES = {
    "object": "a table", "array": "an array", "string": "a string",
    "integer": "an integer", "boolean": "true or false", "number": "a number",
}


def schema_path() -> Path:
    """The schema file: shipped inside the package, or the repository's copy in a checkout."""
    packaged = Path(__file__).with_name("mariner.schema.json")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "schema" / "mariner.schema.json"


@lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(schema_path().read_text())


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def describe(value: Any) -> str:
    """A short rendering of a TOML value for messages."""
    kind = _type_of(value)
    if kind == "string":
        return json.dumps(value, ensure_ascii=False)
    if kind == "boolean":
        return "true" if value else "false"
    if kind in ("integer", "number"):
        return str(value)
    if kind == "array":
        return "an array"
    if kind == "object":
        return "a table"
    return repr(value)


def expected_types(types: list[str]) -> str:
    names = [_TYPE_NAMES.get(t, t) for t in types]
    return names[0] if len(names) == 1 else " or ".join(names)


Emit = Callable[[tuple, str, bool], None]  # (key path, message, about_key)


def validate(value: Any, schema: dict, path: tuple, emit: Emit) -> None:
    """Check `value` against `schema`, reporting every problem through `emit`."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if _type_of(value) not in types:
            emit(path, f"expected {expected_types(types)}, got {describe(value)}", False)
            return
    kind = _type_of(value)
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(json.dumps(c) for c in schema["enum"])
        close = difflib.get_close_matches(str(value), [str(c) for c in schema["enum"]], n=1)
        hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
        emit(path, f"{describe(value)} is not one of {choices}{hint}", False)
    if kind == "integer":
        if "minimum" in schema and value < schema["minimum"]:
            emit(path, f"{value} is below the minimum {schema['minimum']}", False)
        if "maximum" in schema and value > schema["maximum"]:
            emit(path, f"{value} is above the maximum {schema['maximum']}", False)
    if kind == "string":
        if "minLength" in schema and len(value) < schema["minLength"]:
            emit(path, "must not be empty", False)
        elif "pattern" in schema and not re.search(schema["pattern"], value):
            emit(path, f"{describe(value)} {_pattern_hint(path, schema)}", False)
    if kind == "array" and "items" in schema:
        for index, item in enumerate(value):
            validate(item, schema["items"], path + (index,), emit)
    if kind == "object":
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                emit(path, f"missing required key `{req}`", False)
        names_schema = schema.get("propertyNames")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if names_schema is not None and "pattern" in names_schema and not re.search(
                    names_schema["pattern"], key):
                emit(path + (key,), f"{describe(key)} is not a valid name "
                                    f"(letters, digits and _, not starting with a digit)", True)
                continue
            if key in props:
                validate(item, props[key], path + (key,), emit)
            elif extra is False:
                emit(path + (key,), _unknown_key(key, list(props)), True)
            elif isinstance(extra, dict):
                validate(item, extra, path + (key,), emit)


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key `{key}` (did you mean `{close[0]}`?)"
    if known:
        return f"unknown key `{key}` (expected one of: {', '.join(known)})"
    return f"unknown key `{key}`"


# What a value that fails a key's `pattern` should have been, by key path ("*": an element).
_PATTERN_HINTS = {
    "vm.name": 'is not a valid VM name: lower-case letters, digits and "-", at most 63 '
               'characters, starting and ending with a letter or digit (e.g. "api")',
    "vm.user": 'is not a valid user name: lower-case letters, digits, "_" and "-", at most 32 '
               'characters, not starting with a digit or "-" (e.g. "vm")',
    "network.interface": 'is not a valid interface id: letters, digits, "_", "." and "-" '
                         '(e.g. "microvm-api")',
    "shares.*.tag": 'is not a valid virtiofs tag: 1 to 36 letters, digits, "_", "." or "-"',
    "nix.packages.*": 'is not a nixpkgs attribute path (e.g. "ripgrep" or '
                      '"python312Packages.pip")',
    "nix.mariner": 'is not a flake reference (e.g. "github:mksafavi/nix-mariner/<rev>")',
    "ports.forward.*": 'is not a port or "HOST:GUEST" (e.g. 8000 or "15432:5432")',
}


def _pattern_hint(path: tuple, schema: dict) -> str:
    examples = schema.get("examples")
    example = f" (e.g. {json.dumps(examples[0])})" if examples and isinstance(examples[0], str) else ""
    leaf = next((p for p in reversed(path) if isinstance(p, str)), "")
    key = ".".join("*" if isinstance(p, int) else str(p) for p in path)
    if key in _PATTERN_HINTS:
        return _PATTERN_HINTS[key]
    if schema.get("pattern") == "^/":
        return f"must be an absolute path{example}"
    if leaf in ("memory", "persist", "nix_store", "docker"):
        return 'is not a size (try "8GiB" or 8192)'
    return f"does not match the pattern {schema['pattern']}{example}"


def walk_keywords(schema: Any) -> Iterator[str]:
    """Every keyword the schema uses (for the test that the validator supports them all)."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            yield key
            if key in ("properties",):
                for sub in value.values():
                    yield from walk_keywords(sub)
            elif key in ("items", "additionalProperties", "propertyNames"):
                yield from walk_keywords(value)


def subschema(*path: str) -> dict:
    """The schema of a key path like ("vm", "memory")."""
    node = load_schema()
    for part in path:
        node = node["properties"][part] if "properties" in node else node["items"]["properties"][part]
    return node
