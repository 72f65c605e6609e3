"""The one start path of every sandbox service: pick a mode, start its zygote, self-test it.

``python -m sandbox serve`` and ``run``, the FastAPI app's lifespan (so the deployed Modal app
too) and the worker inside each Modal Sandbox (``sandbox/stdio_worker.py``) all start here, so no
mode serves a call before it has passed ``sandbox/selftest.py`` where it runs. Modes come
strongest first from :func:`sandbox.isolation.usable_modes`; one that probes fine but fails its
self-test is stopped, its failing check is listed, and the next is tried. When none is left the
error names every mode and why, in one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from sandbox.isolation import DEV_MODES, Isolation, IsolationUnavailable, usable_modes
from sandbox.pool import SandboxFault, ZygotePool
from sandbox.selftest import SelfTestFailed, SelfTestReport, self_test
from sandbox.settings import Settings

log = logging.getLogger("sandbox.startup")


class CallPool(Protocol):
    """What the executor and the app need of a pool: a zygote here, or Modal Sandboxes."""

    async def run(self, request: dict[str, Any]) -> dict[str, Any]: ...

    async def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class IsolatedPool:
    """A started zygote pool whose mode passed its self-test: what the executor runs calls on.

    ``selftest`` is None only for a development mode asked for by name that failed it (logged)."""

    pool: ZygotePool
    isolation: Isolation
    selftest: SelfTestReport | None

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.pool.run(request)

    async def close(self) -> None:
        await self.pool.close()

    @property
    def queued(self) -> int:
        return self.pool.queued

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/isolation`` answers: the mode, and what its self-test showed."""
        return {
            "backend": "local",
            "mode": self.isolation.mode,
            "secure": self.isolation.secure,
            "selftest": list(self.selftest.passed) if self.selftest else None,
        }


async def start_isolated(
    settings: Settings,
    isolation: Isolation | None = None,
    *,
    profile: bool = False,
    strict: bool = False,
) -> IsolatedPool:
    """The first mode (``isolation``, else :func:`usable_modes`) whose pool starts and passes its
    self-test, running; raises :class:`IsolationUnavailable` (one line) when none does.

    One exception, for development only: a mode of :data:`DEV_MODES` asked for by name (which
    takes ``--allow-insecure`` already) starts although its self-test fails, and says so. No
    production path can ask for one: ``auto`` never does, the node sandbox and the deployed app
    refuse them, and the pool's worker starts ``strict``."""
    tried: list[str] = []
    candidates = [isolation] if isolation is not None else usable_modes(settings, tried)
    for iso in candidates:
        pool = ZygotePool(settings, iso, profile=profile)
        try:
            await pool.start()
            report = await self_test(pool.run, settings, slots=settings.slots)
        except SelfTestFailed as exc:
            if not strict and iso.mode in DEV_MODES and settings.isolation == iso.mode:
                log.warning(
                    "isolation %s (by name, development only) starts anyway: %s", iso.mode, exc
                )
                return IsolatedPool(pool, iso, None)
            await pool.close()
            tried.append(f"{iso.mode}: {exc}")
            log.warning("isolation %s refused: %s", iso.mode, exc)
            continue
        except (SandboxFault, OSError) as exc:
            await pool.close()
            tried.append(f"{iso.mode}: the zygote did not start ({exc})")
            log.warning("isolation %s refused: %s", iso.mode, tried[-1])
            continue
        except BaseException:
            await pool.close()
            raise
        log.info("sandbox isolation %s: %s", iso.mode, report.summary())
        return IsolatedPool(pool, iso, report)
    raise IsolationUnavailable(f"no isolation mode works here ({'; '.join(tried)})")
