"""Where the tool's calls run: this node's sandbox, a pool of Modal Sandboxes, or the deployed one.

**One URL on every node.** Each DAPO node starts its tool sandbox on
``127.0.0.1:NODE_SANDBOX_PORT`` *before* Ray starts there, and the tool's URL is that same
loopback address everywhere: ``SANDBOX_FUSION_ENDPOINT`` in the environment of ``main_ppo`` and
of each node's ``ray start``, which the Ray workers of that node inherit (verl's runtime_env does
not set it). verl builds the tool inside every agent-loop worker (``AgentLoopWorker.__init__``
loads the tool yaml, where OmegaConf resolves the variable) and spreads those workers over the
nodes, so the one URL means, on each node, that node's own endpoint. Evaluation, the learning
curve and ``/chat`` take the same URL (``--sandbox-url``).

**What serves it, in a fixed order, logged at start** (``--sandbox=`` forces one):

1. ``node``: the project's sandbox on this node, in the strongest mode whose start-up self-test
   passes here (bwrap, bwrap-ownnet, unshare; ``sandbox/selftest.py``): no call leaves the node
   and the nodes' idle CPUs run the code (docs/benchmarks.md, "Tool calls"). Never ``none``.
2. ``modal``: else a pool of Modal Sandboxes (``sandbox/fleet.py``) behind the same loopback
   ``/run_code`` (``python -m sandbox serve-pool``): no network, no secrets, no volumes, CPU,
   memory and time limits, and each sandbox's worker self-tests its own isolation before its
   first call. The pool is sized from the step's expected concurrency
   (:func:`expected_tool_concurrency`) and reports its calls and cost at exit.
3. else the run stops before training, with both reasons in one line.

``deployed`` (only when asked for) sends the calls to the deployed ``modal_fusion_sandbox.py``
endpoint, whose own start runs the same self-test inside its container. ``SANDBOX_FUSION_ENDPOINT``
set (compose, tests, an external SandboxFusion) is used as is.

The node's sandbox and the pool get no token (loopback only, and user code has a network
namespace of its own); the pool's server does get the ``MODAL_*`` settings it needs to make
sandboxes (it runs no user code itself: that runs remotely).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import yaml

from recipe.retool.core.request import SANDBOX_CHOICES
from recipe.retool.launch.commands import TOOL_CONFIG_FILE, load_stage_config
from sandbox.client import ENDPOINT_ENV, TOKEN_ENV
from sandbox.fleet import size_for
from sandbox.local import ServerDidNotStart, claim_port, start_server, stop

NODE_SANDBOX_PORT = 18080  # the same on every node; not 8080, which `make sandbox` takes
NODE_SANDBOX_URL = f"http://127.0.0.1:{NODE_SANDBOX_PORT}/run_code"
# The pool's shape: 16 calls at once per sandbox, up to 2 per core (as the deployed app's
# containers) but only 2 cores reserved, the rest a burst (Modal bills max(request, use)); 1 GiB
# per call (the default run memory). SANDBOX_POOL_SANDBOXES overrides the size from concurrency.
POOL_SLOTS = 16
POOL_CPU = 2.0
POOL_CPU_LIMIT = 8.0
POOL_MEMORY_MB = 16 * 1024
POOL_MAX_SANDBOXES = 32
POOL_SIZE_ENV = "SANDBOX_POOL_SANDBOXES"
POOL_START_S = 900  # the first start builds the sandbox image on Modal
Starter = Callable[[], contextlib.AbstractContextManager[str]]


class NodeSandboxError(RuntimeError):
    """No tool sandbox can start here; the message says why and what to use instead."""


def _reason(exc: ServerDidNotStart) -> str:
    """The server's own one-line ``error: ...``, when its stderr ended with one."""
    return str(exc).rsplit("error: ", 1)[-1]


def _isolation_line(base: str) -> str:
    """What the started server says of its isolation (``GET /v1/isolation``), as one phrase."""
    info = httpx.get(f"{base}/v1/isolation", timeout=10).json()
    strength = "secure" if info.get("secure") else "INSECURE, allowed on nodes"
    passed = info.get("selftest")
    checks = ", ".join(passed) if isinstance(passed, list) else passed
    modes = info.get("worker_modes")
    inside = f" (inside: {', '.join(f'{n}x {m}' for m, n in modes.items())})" if modes else ""
    return f"isolation {info['mode']}{inside} ({strength}); self-test: {checks}"


@contextlib.contextmanager
def _serving(argv: Sequence[str], env: dict[str, str | None], wait_s: float) -> Iterator[str]:
    port = claim_port(NODE_SANDBOX_PORT)
    proc = start_server([sys.executable, "-m", "sandbox", *argv, "--port", str(port)], port,
                        env=env, wait_s=wait_s)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextlib.contextmanager
def node_sandbox(targets: str = "") -> Iterator[str]:
    """The project's sandbox on this node's loopback for the duration; yields its ``/run_code``.

    ``SANDBOX_ISOLATION`` (auto, or one mode the node must have) is the server's to apply: it
    starts only in a mode whose self-test passes. ``targets``: the cluster's ``host:port`` that
    no call may reach (the Ray head), checked by that self-test too."""
    from sandbox.isolation import DEV_MODES, IsolationUnavailable, detect
    from sandbox.settings import Settings, SettingsError

    or_else = "or run with --sandbox=modal or --sandbox=deployed"
    try:
        settings = Settings.from_env(allow_insecure=True)
        wanted = settings.isolation
        if wanted not in DEV_MODES:
            detect(settings)  # the probes, here: no server starts where no mode can
    except SettingsError as exc:
        raise NodeSandboxError(f"node sandbox: {exc}") from None
    except IsolationUnavailable as exc:
        raise NodeSandboxError(f"node sandbox: {exc}; {or_else}") from None
    if wanted in DEV_MODES:
        raise NodeSandboxError(
            f"node sandbox: SANDBOX_ISOLATION={wanted} is for development only (it shares one "
            "/tmp, or the trainer's uid and secrets, between calls); unset it, or run with "
            "--sandbox=modal or --sandbox=deployed"
        )
    argv = ["serve", "--isolation", wanted, "--allow-insecure", "--log-level", "warning"]
    env = {TOKEN_ENV: None, "SANDBOX_SELFTEST_TARGETS": targets or None}
    with contextlib.ExitStack() as stack:
        try:
            base = stack.enter_context(_serving(argv, env, wait_s=120))
        except ServerDidNotStart as exc:
            raise NodeSandboxError(f"node sandbox: {_reason(exc)}; {or_else}") from None
        print(f"node sandbox: {base}/run_code, {_isolation_line(base)}", flush=True)
        yield f"{base}/run_code"


def expected_tool_concurrency(overrides: Sequence[str] = ()) -> int:
    """Tool calls a DAPO step can have in flight at once: every trajectory of the batch
    (``train_batch_size x rollout.n``), but at most the tool's ``max_concurrency`` per agent-loop
    worker times verl's agent-loop workers (``rollout.agent.num_workers``)."""
    import verl

    values = {k: str(v) for k, v in load_stage_config("dapo").overrides.items()}
    values |= dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith("~"))
    values = {k.lstrip("+"): v for k, v in values.items()}
    rollout = Path(verl.__file__).parent / "trainer" / "config" / "rollout" / "rollout.yaml"
    workers = yaml.safe_load(rollout.read_text())["agent"]["num_workers"]
    workers = int(values.get("actor_rollout_ref.rollout.agent.num_workers", workers))
    tool = yaml.safe_load(TOOL_CONFIG_FILE.read_text())["tools"][0]["config"]
    batch = int(values["data.train_batch_size"]) * int(values["actor_rollout_ref.rollout.n"])
    return min(batch, workers * int(tool["max_concurrency"]))


def pool_size(overrides: Sequence[str] = (), nodes: int = 1) -> int:
    """Sandboxes for this node's share of the expected concurrency (verl spreads its agent-loop
    workers over the ``nodes``, and each node's tool calls go to its own pool);
    ``SANDBOX_POOL_SANDBOXES`` overrides it."""
    forced = os.environ.get(POOL_SIZE_ENV)
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise NodeSandboxError(f"{POOL_SIZE_ENV}={forced!r}: expected a count >= 1")
        return int(forced)
    share = math.ceil(expected_tool_concurrency(overrides) / max(nodes, 1))
    return size_for(share, POOL_SLOTS, POOL_MAX_SANDBOXES)


@contextlib.contextmanager
def modal_sandbox(
    *,
    overrides: Sequence[str] = (),
    nodes: int = 1,
    name: str | None = None,
    report_dir: Path | None = None,
    targets: str = "",
    backend: str = "modal",
) -> Iterator[str]:
    """A pool of Modal Sandboxes behind this node's loopback ``/run_code`` for the duration.

    ``name`` tags the pool's sandboxes (a start ends those a killed run left under it: give each
    run and node its own, e.g. ``<experiment>-node<rank>``); ``report_dir`` receives its report
    at exit (``sandbox-pool.md``/``.json``); ``backend="local"`` runs it on this machine's own
    containers (tests)."""
    sandboxes = pool_size(overrides, nodes)
    name = name or f"retool-{socket.gethostname()}"
    argv = ["serve-pool", "--backend", backend, "--name", name, "--sandboxes", str(sandboxes)]
    argv += ["--slots-per-sandbox", str(POOL_SLOTS), "--cpu", str(POOL_CPU)]
    argv += ["--cpu-limit", str(POOL_CPU_LIMIT)]
    argv += ["--memory-mb", str(POOL_MEMORY_MB), "--die-with-parent", "--log-level", "warning"]
    argv += ["--report", str(report_dir)] if report_dir else []
    argv += ["--targets", targets] if targets else []
    cores = sandboxes * POOL_CPU
    print(
        f"tool sandbox pool {name} ({backend}): {sandboxes} sandboxes x {POOL_SLOTS} calls, "
        f"{POOL_CPU:g} cores reserved each (bursts to {POOL_CPU_LIMIT:g}) = {cores:g} cores: at "
        f"least {math.ceil(cores)} CPU-h per hour of the run, beside the GPU cost",
        flush=True,
    )
    modal_env = {k: v for k, v in os.environ.items() if k.startswith("MODAL_")}
    with contextlib.ExitStack() as stack:
        try:
            base = stack.enter_context(
                _serving(argv, {TOKEN_ENV: None, **modal_env}, wait_s=POOL_START_S)
            )
        except ServerDidNotStart as exc:
            raise NodeSandboxError(f"{backend} sandboxes: {_reason(exc)}") from None
        print(f"tool sandbox: {base}/run_code, {_isolation_line(base)}", flush=True)
        yield f"{base}/run_code"


@contextlib.contextmanager
def tool_sandbox(
    choice: str | None,
    *,
    deployed_url: Callable[[], str],
    start_node: Starter | None = None,
    start_pool: Starter | None = None,
) -> Iterator[str]:
    """The ``/run_code`` URL the tool uses on this node (the module docstring says which);
    ``start_node``/``start_pool`` default to :func:`node_sandbox` and :func:`modal_sandbox`."""
    start_node = start_node or node_sandbox
    start_pool = start_pool or modal_sandbox
    explicit = os.environ.get(ENDPOINT_ENV)
    if explicit:
        yield explicit
        return
    if choice == "deployed":
        yield deployed_url()
        return
    if choice not in (None, *SANDBOX_CHOICES):
        raise NodeSandboxError(f"--sandbox={choice}: choose {' or '.join(SANDBOX_CHOICES)}")
    with contextlib.ExitStack() as stack:
        if choice == "node":
            url = stack.enter_context(start_node())
        elif choice == "modal":
            url = stack.enter_context(start_pool())
        else:
            url = _first_that_starts(stack, start_node, start_pool)
        yield url


def _first_that_starts(stack: contextlib.ExitStack, start_node: Starter, start_pool: Starter):
    print(
        "tool sandbox: auto: this node's (bwrap/unshare, if its self-test passes), else Modal "
        "Sandboxes, else stop",
        flush=True,
    )
    try:
        return stack.enter_context(start_node())
    except NodeSandboxError as exc:
        node_failed = str(exc)
    print(f"tool sandbox: not this node's ({node_failed}); trying Modal Sandboxes", flush=True)
    try:
        return stack.enter_context(start_pool())
    except NodeSandboxError as exc:
        raise NodeSandboxError(f"no tool sandbox works: {node_failed}; {exc}") from None
