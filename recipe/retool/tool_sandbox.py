"""Where DAPO's tool calls run: a sandbox on every training node (the default), or the deployed one.

**One mechanism for every node.** Each DAPO node starts the project's sandbox on
``127.0.0.1:NODE_SANDBOX_PORT`` *before* Ray starts there, and the tool's URL is that same
loopback address everywhere: ``SANDBOX_FUSION_ENDPOINT`` in the environment of ``main_ppo`` and
of each node's ``ray start``, which the Ray workers of that node inherit (verl's runtime_env does
not set it). verl builds the tool inside every agent-loop worker (``AgentLoopWorker.__init__``
loads the tool yaml, where OmegaConf resolves the variable) and spreads those workers over the
nodes, so the one URL means, on each node, that node's own sandbox: no tool call leaves the node,
and the nodes' idle CPUs run the code. Why local is the default: docs/benchmarks.md ("Tool calls:
node sandbox vs a remote endpoint").

**Choosing.** ``SANDBOX_FUSION_ENDPOINT`` set (compose, tests, an external SandboxFusion) is used
as is; else ``--sandbox=deployed`` looks up the deployed ``modal_fusion_sandbox.py`` endpoint;
else (``--sandbox=node``) this node's sandbox starts.

**Isolation.** The node's sandbox takes the strongest mode the node allows (Modal's gVisor:
docs/sandbox-security.md) but never ``none``: there user code would run as the trainer's uid and
could read its secrets. ``SANDBOX_ISOLATION=bwrap`` (or ``unshare``) makes that mode a
requirement: the node then refuses to start without it (the lent GPU machines run ``bwrap`` from
a ``dpkg -x`` copy put first on ``PATH``, e.g. ``/tmp/bw/usr/bin``). Only a mode that is not
secure is started with ``--allow-insecure``. It gets no token (loopback only, and user code has
its own network namespace in every other mode), so the deployed endpoint's token stays out of it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from recipe.retool.core.request import SANDBOX_CHOICES
from sandbox.client import ENDPOINT_ENV, TOKEN_ENV
from sandbox.local import ServerDidNotStart, sandbox_service

NODE_SANDBOX_PORT = 18080  # the same on every node; not 8080, which `make sandbox` takes
NODE_SANDBOX_URL = f"http://127.0.0.1:{NODE_SANDBOX_PORT}/run_code"


class NodeSandboxError(RuntimeError):
    """This node cannot run the tool's sandbox; the message says why and what to use instead."""


@contextlib.contextmanager
def node_sandbox() -> Iterator[str]:
    """The project's sandbox on this node's loopback for the duration; yields its ``/run_code``."""
    from sandbox.isolation import IsolationUnavailable, detect
    from sandbox.settings import Settings

    try:
        iso = detect(Settings.from_env(allow_insecure=True))  # SANDBOX_ISOLATION: auto or one
    except IsolationUnavailable as exc:
        raise NodeSandboxError(f"node sandbox: {exc}; or run with --sandbox=deployed") from None
    if iso.mode == "none":
        raise NodeSandboxError(
            "no isolation stronger than 'none' on this node (user code could read the trainer's "
            "secrets); run with --sandbox=deployed"
        )
    strength = "secure" if iso.secure else "INSECURE, allowed on nodes"
    print(f"node sandbox: {NODE_SANDBOX_URL}, isolation {iso.mode} ({strength})", flush=True)
    insecure = () if iso.secure else ("--allow-insecure",)
    args = ("--isolation", iso.mode, *insecure, "--log-level", "warning")
    with contextlib.ExitStack() as stack:
        try:
            service = sandbox_service(*args, port=NODE_SANDBOX_PORT, env={TOKEN_ENV: None})
            base = stack.enter_context(service)
        except ServerDidNotStart as exc:
            raise NodeSandboxError(f"node sandbox: {exc}; or run with --sandbox=deployed") from None
        yield f"{base}/run_code"


@contextlib.contextmanager
def tool_sandbox(
    choice: str | None,
    *,
    deployed_url: Callable[[], str],
    start_node: Callable[[], contextlib.AbstractContextManager[str]] = node_sandbox,
) -> Iterator[str]:
    """The ``/run_code`` URL DAPO's tool uses on this node (see the module docstring)."""
    explicit = os.environ.get(ENDPOINT_ENV)
    if explicit:
        yield explicit
    elif (choice or SANDBOX_CHOICES[0]) == "deployed":
        yield deployed_url()
    else:
        with start_node() as url:
            yield url
