"""``python -m sandbox serve-pool``: the pool of sandboxes behind a loopback SandboxFusion endpoint.

The tool, evaluation, the learning curve and ``/chat`` reach any sandbox through one URL, a
``/run_code`` on this node. Here that URL is the project's own FastAPI app (same validation,
same statuses, same 504 back-pressure) with its calls sent to a :class:`sandbox.fleet.Fleet` of
sandboxes (``--backend modal``: Modal Sandboxes; ``local``: containers on this machine, for tests
and benchmarks) instead of a local zygote. So verl's tool works unchanged.

Start-up, before the port is bound:

1. the pool starts (``Fleet.start``): it ends what a killed run left under ``--name``, and waits
   for one sandbox whose worker passed the self-test *inside* its sandbox;
2. from this node, the self-test's checks that only the caller can make run through the pool
   (``sandbox/selftest.py``, :data:`~sandbox.selftest.REMOTE_CHECKS`): a call must reach none of
   this node's addresses (listeners on them), the cluster's (``--targets``) or the internet,
   and see no GPU device, volume or secret.

Either failing is one line and exit 3. On exit (SIGTERM too; with ``--die-with-parent``, when
the launcher dies) every sandbox is ended and the pool's report written (``--report DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import signal
from pathlib import Path

from sandbox.backends import Backend
from sandbox.fleet import Fleet, FleetConfig
from sandbox.selftest import REMOTE_CHECKS, SelfTestFailed, parse_targets, self_test
from sandbox.settings import Settings

log = logging.getLogger("sandbox.pool_server")
PR_SET_PDEATHSIG = 1
BACKENDS = ("modal", "local")


class BadPool(ValueError):
    """A pool shape that cannot work (zero sandboxes, an age limit past the timeout)."""


class PoolRefused(RuntimeError):
    """The pool did not start or failed its self-test; the message is the one line to show."""


def make_backend(name: str, runtime: str | None = None) -> Backend:
    if name == "modal":
        from sandbox.modal_backend import ModalBackend

        return ModalBackend(runtime=runtime)
    from sandbox.local_backend import LocalBackend

    return LocalBackend()


def config_from(args: argparse.Namespace) -> FleetConfig:
    try:
        parse_targets(args.targets or "")
        return FleetConfig(
            name=args.name,
            sandboxes=args.sandboxes,
            slots=args.slots_per_sandbox,
            cpu=args.cpu,
            cpu_limit=max(args.cpu, args.cpu_limit),
            memory_mb=args.memory_mb,
            targets=args.targets or "",
        )
    except ValueError as exc:
        raise BadPool(f"serve-pool: {exc}") from None


async def start_checked(backend: Backend, config: FleetConfig, settings: Settings, report_dir):
    """A started :class:`Fleet` whose sandboxes pass this node's checks; else :class:`PoolRefused`
    (and nothing left running)."""
    fleet = Fleet(backend, config, report_dir=report_dir)
    try:
        await fleet.start()
    except Exception as exc:  # FleetUnavailable, or the backend's own (Modal: no token, ...)
        await fleet.close()
        raise PoolRefused(f"{backend.name} sandboxes: {exc}") from None
    try:
        report = await self_test(fleet.run, settings, slots=1, checks=REMOTE_CHECKS)
    except SelfTestFailed as exc:
        await fleet.close()
        raise PoolRefused(f"{backend.name} sandboxes: {exc} (checked from this node)") from None
    except BaseException:
        await fleet.close()
        raise
    log.info("%s sandboxes, from this node: %s", backend.name, report.summary())
    return fleet


def die_with_parent() -> None:
    """SIGTERM when the launching process dies (Linux): the pool then ends its sandboxes."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


async def serve_pool(args: argparse.Namespace) -> None:
    import uvicorn

    from sandbox.api import create_app

    settings = Settings.from_env(selftest_targets=args.targets)
    backend = make_backend(args.backend, args.runtime)
    config = config_from(args)
    report_dir = Path(args.report) if args.report else None
    loop = asyncio.get_running_loop()
    starting = asyncio.ensure_future(start_checked(backend, config, settings, report_dir))
    # A SIGTERM while the pool starts ends it cleanly (uvicorn takes the signal over later).
    loop.add_signal_handler(signal.SIGTERM, starting.cancel)
    try:
        fleet = await starting
    except asyncio.CancelledError:
        raise PoolRefused("stopped by SIGTERM while the pool was starting") from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    try:
        app = create_app(settings, pool=fleet)  # its lifespan closes the fleet at shutdown
        server = uvicorn.Server(
            uvicorn.Config(
                app, host=args.host, port=args.port, log_level=args.log_level, access_log=False
            )
        )
        await server.serve()
    finally:
        await fleet.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="modal")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="retool-tools", help="the pool's tag (one per run)")
    parser.add_argument("--sandboxes", type=int, default=4)
    parser.add_argument("--slots-per-sandbox", type=int, default=8, help="calls at once in one")
    parser.add_argument("--cpu", type=float, default=2.0, help="cores reserved per sandbox")
    parser.add_argument("--cpu-limit", type=float, default=8.0, help="cores it may burst to")
    parser.add_argument("--memory-mb", type=int, default=8 * 1024)
    parser.add_argument(
        "--runtime", choices=["gvisor", "vm"], help="Modal's runtime (default: its)"
    )
    parser.add_argument("--targets", help="host:port,... (the cluster's) no call may reach")
    parser.add_argument("--report", help="directory for sandbox-pool.json/.md at exit")
    parser.add_argument("--die-with-parent", action="store_true")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )


def main(args: argparse.Namespace) -> int:
    if args.die_with_parent:
        die_with_parent()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_pool(args))
    return 0
