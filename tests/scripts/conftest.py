"""Fixtures shared with the sandbox tests."""

from tests.sandbox.conftest import local_endpoint  # noqa: F401  (re-exported fixture)
