"""Fixtures of the host-layer tests: the fake host (tests/support/fakehost.py)."""

from support.fakehost import fakehost  # noqa: F401  (re-exported fixture)
