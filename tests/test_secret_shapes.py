"""One table of secret shapes (mariner_dev/secret_shapes.py) serves both places that look for
secrets by content: `validate`'s warning about an [env] value and `[dotfiles]`' refusal of a
file. A token kind one of them knows, the other knows too, under the same name."""

from __future__ import annotations

import pytest

from mariner_dev.advisories import secret_reason
from mariner_dev.secret_shapes import SHAPES
from mariner_dev.sync.credentials import secret_by_content

# (a value of that shape, what both call it, how a refused file's message shows it)
TOKENS = [
    ("ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8", "a GitHub token", "ghp_..."),
    ("ghs_" + "a1b2c3d4e5" * 2, "a GitHub token", "ghp_..."),
    ("github_pat_11ABCDEFG0123456789_abcdef", "a GitHub token", "github_pat_..."),
    ("npm_" + "a1B2c3D4e5" * 3 + "f6G7h8", "an npm token", "npm_..."),
    ("AKIAIOSFODNN7EXAMPLE", "an AWS access key id", "AKIA..."),
    ("xoxb-123456789012-abcdefABCDEF", "a Slack token", "xoxb-/xoxp-..."),
    ("xoxr-123456789012-abcdefABCDEF", "a Slack token", "xoxb-/xoxp-..."),
    ("//registry.npmjs.org/:_authToken=abc", "a registry token", "_authToken=..."),
    ("glpat-" + "x1Y2z3" * 4, "a GitLab token", "glpat-..."),
    ("pypi-AgEIcHlwaS5vcmc" + "Ab1_" * 6, "a PyPI token", "pypi-..."),
]


@pytest.mark.parametrize("token, what, shown", TOKENS, ids=[t[0][:12] for t in TOKENS])
def test_a_token_is_found_in_an_env_value_and_in_a_file_under_one_name(token, what, shown):
    assert secret_reason("HARMLESS_NAME", token) == f"its value looks like {what}"
    assert secret_reason("HARMLESS_NAME", f"Bearer {token}") == f"its value looks like {what}"
    assert secret_by_content(f"line one\nkey = {token}\n".encode()) == \
        f"a file holding {what} ({shown})"


@pytest.mark.parametrize("header", ["OPENSSH PRIVATE KEY", "RSA PRIVATE KEY",
                                    "PGP PRIVATE KEY BLOCK", "ENCRYPTED PRIVATE KEY"])
def test_a_private_key_header_is_found_in_both_and_a_file_names_its_kind(header):
    pem = f"-----BEGIN {header}-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
    assert secret_reason("X", pem) == "its value looks like a private key"
    assert secret_by_content(pem.encode()) == f"a file holding a private key ({header})"


def test_value_only_shapes_judge_a_whole_value_not_a_files_text():
    """A URL with a password or an `sk-` key as an [env] value is a secret; in a file's free
    text (docs, examples, option names) those shapes would match too much."""
    github = "ghp_" + "a" * 36
    for value, what in (("postgres://app:s3cret@db:5432/app", "a URL with a password"),
                        (f"https://x:{github}@github.com/o/r", "a URL with a password"),
                        ("sk-" + "a1B2c3D4e5" * 3, "an API secret key")):
        assert secret_reason("X", value) == f"its value looks like {what}"
    # in a file only the other shapes count: here the GitHub token in the URL
    assert secret_by_content(b"export DATABASE_URL=postgres://dev:dev@localhost/db\n") is None
    assert secret_by_content(b"alias x='tool --sk-" + b"a" * 30 + b"'\n") is None
    assert secret_by_content(f"url = https://x:{github}@github.com\n".encode()) == \
        "a file holding a GitHub token (ghp_...)"
    assert [s.what for s in SHAPES if not s.in_files] == ["an API secret key",
                                                          "a URL with a password"]


def test_near_misses_are_no_secret_in_either():
    for text in ("ghp_short", "npm_install", "xoxo-hugs", "see docs/AKIA.md", "github_pat_",
                 "authToken = none", "postgres://localhost:5432/app", "development"):
        assert secret_reason("X", text) is None, text
        assert secret_by_content(text.encode()) is None, text
