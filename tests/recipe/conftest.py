"""Recipe tests share the sandbox's real local server (a session fixture) and a Dockerfile spy."""

from pathlib import Path

import pytest

from tests.sandbox.conftest import local_endpoint  # noqa: F401  (re-exported fixture)


@pytest.fixture
def dockerfile_builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path | None]]:
    """Every ``modal.Image.from_dockerfile(path, context_dir=...)`` made while the test runs."""
    import modal

    seen: list[tuple[Path, Path | None]] = []
    real = modal.Image.from_dockerfile

    def spy(path, **kwargs):
        seen.append((Path(path), kwargs.get("context_dir")))
        return real(path, **kwargs)

    monkeypatch.setattr(modal.Image, "from_dockerfile", staticmethod(spy))
    return seen


@pytest.fixture
def attempt_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """``time.strftime(fmt)`` gives a later second on each call, so each simulated attempt gets
    its own experiment stamp and metrics file; calls with a time tuple (other libraries) are
    left alone."""
    import time

    real = time.strftime
    clock = iter(range(1_000))
    monkeypatch.setattr(
        time, "strftime", lambda fmt, *t: real(fmt, *t) if t else f"20261127-{next(clock):06d}"
    )
