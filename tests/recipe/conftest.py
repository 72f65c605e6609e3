"""Recipe tests share the sandbox package's real local server (a session fixture)."""

from tests.sandbox.conftest import local_endpoint  # noqa: F401  (re-exported fixture)
