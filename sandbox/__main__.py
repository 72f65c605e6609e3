"""CLI: ``python -m sandbox serve`` runs the service; ``python -m sandbox run`` runs one snippet;
``python -m sandbox serve-pool`` serves the same API from a pool of sandboxes (``pool_server.py``).

``run`` talks to ``--url`` if given, else starts the service in-process for a one-shot check.
User mistakes (bad flags, unreachable URL, insecure host) print one clear line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from sandbox import pool_server
from sandbox.isolation import MODES, InsecureIsolation, IsolationUnavailable
from sandbox.settings import Settings, SettingsError


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        allow_insecure=True if args.allow_insecure else None,
        isolation=args.isolation,
        slots=args.slots,
    )


class NoIsolation(Exception):
    """The mode asked for needs a program this host lacks (``--isolation bwrap`` without
    bubblewrap): a user mistake (exit 2), unlike a host that cannot isolate at all (exit 3)."""


async def _started(settings: Settings):
    """:func:`sandbox.startup.start_isolated` (a mode, its zygote, its self-test), with a missing
    ``bwrap`` for an explicit bwrap mode as :class:`NoIsolation`, its fix named."""
    import shutil

    from sandbox.isolation import BWRAP_MODES
    from sandbox.startup import start_isolated

    try:
        return await start_isolated(settings)
    except InsecureIsolation:
        raise
    except IsolationUnavailable as exc:
        if settings.isolation in BWRAP_MODES and shutil.which("bwrap") is None:
            raise NoIsolation(
                f"{exc}; bwrap is not on PATH: install bubblewrap, or pick --isolation auto"
            ) from None
        raise


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sandbox.api import create_app
    from sandbox.client import TOKEN_ENV
    from sandbox.environ import scrub_environ

    settings = _settings(args)
    scrub_environ(TOKEN_ENV)  # read; now out of /proc/<pid>/environ before any user code runs

    async def main() -> None:
        pool = await _started(settings)  # fail fast, before binding the port
        try:
            config = uvicorn.Config(
                create_app(settings, pool=pool),
                host=args.host,
                port=args.port,
                log_level=args.log_level,
                access_log=False,
            )
            await uvicorn.Server(config).serve()
        finally:
            await pool.close()

    asyncio.run(main())
    return 0


async def _run_in_process(args: argparse.Namespace) -> dict:
    import httpx

    from sandbox.api import create_app

    settings = _settings(args)
    app = create_app(settings, pool=await _started(settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as http:
            resp = await http.post("/run_code", json=_payload(args))
            if resp.status_code != 200:
                raise SystemExit(f"error: HTTP {resp.status_code}: {resp.text}")
            return resp.json()


def _payload(args: argparse.Namespace) -> dict:
    from sandbox.client import SandboxClient

    return SandboxClient.build_payload(
        args.code, language=args.language, run_timeout=args.timeout, stdin=args.stdin
    )


def run(args: argparse.Namespace) -> int:
    if args.code is None:
        args.code = sys.stdin.read()
    if args.url:
        from sandbox.client import SandboxClient, SandboxRequestError, SandboxUnavailable

        client = SandboxClient(args.url, max_retries=1)
        try:
            raw = client.run_code_sync(
                args.code, language=args.language, run_timeout=args.timeout, stdin=args.stdin
            ).raw
        except (SandboxUnavailable, SandboxRequestError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            client.close()
    else:
        raw = asyncio.run(_run_in_process(args))
    if args.json:
        print(json.dumps(raw, indent=2))
    else:
        result = raw.get("run_result") or {}
        sys.stdout.write(result.get("stdout") or "")
        sys.stderr.write(result.get("stderr") or "")
        if raw.get("status") != "Success":
            print(
                f"[{raw.get('status')}: {result.get('status')} {raw.get('message')}]".strip(),
                file=sys.stderr,
            )
    return 0 if raw.get("status") == "Success" else 1


def tcp_port(text: str) -> int:
    """A port uvicorn can bind as given: beyond 65535 it would log one port and listen on another
    (the kernel keeps the low 16 bits), and 0 would pick one nobody knows."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--allow-insecure",
        action="store_true",
        help="run even if only a mode weaker than bubblewrap is available",
    )
    common.add_argument("--isolation", choices=["auto", *MODES])
    common.add_argument("--slots", type=int, help="concurrent runs (default 2 x cores, min 4)")
    p_serve = sub.add_parser("serve", parents=[common], help="serve the HTTP API")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=tcp_port, default=8080, help="1-65535")
    p_serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    p_run = sub.add_parser("run", parents=[common], help="run one snippet and print its output")
    p_run.add_argument("--code", help="code to run (default: read stdin)")
    p_run.add_argument("--url", help="service URL (default: an in-process server)")
    p_run.add_argument("--language", default="python")
    p_run.add_argument("--timeout", type=float, default=10)
    p_run.add_argument("--stdin", help="data for the program's stdin")
    p_run.add_argument("--json", action="store_true", help="print the full JSON response")
    p_pool = sub.add_parser(
        "serve-pool", help="serve the HTTP API from a pool of Modal (or local) sandboxes"
    )
    pool_server.add_arguments(p_pool)
    p_pool.add_argument("--port", type=tcp_port, default=8080, help="1-65535")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    commands = {"serve": serve, "run": run, "serve-pool": pool_server.main}
    try:
        return commands[args.cmd](args)
    except (SettingsError, NoIsolation, pool_server.BadPool) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (IsolationUnavailable, pool_server.PoolRefused) as exc:  # no mode passes, or the pool
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
