"""# One request against the deployed Modal sandbox

    modal run recipe/retool/test_sandbox_fusion.py::test_single_request --code 'print(2+2)'

Looks up the deployed web URL of ``recipe/retool/modal_fusion_sandbox.py`` (or uses ``--url``) and
runs one snippet through ``sandbox.client``, the same client the ReTool tool uses, from a
container of the sandbox's own image with the token the sandbox was deployed with (this
shell's ``SANDBOX_API_TOKEN``, else ``.env``). Where ``modal run`` runs only modal is needed
(the README's ``pip install modal``): the client prints what the container found.
"""

from __future__ import annotations

import modal

from recipe.retool import modal_common
from recipe.retool.core.paths import SANDBOX_APP_NAME

app = modal.App(f"{SANDBOX_APP_NAME}-check")


@app.function(
    image=modal_common.sandbox_image(),
    secrets=[modal.Secret.from_dict(modal_common.deploy_token())],
    timeout=5 * 60,
)
def run_snippet(code: str, url: str = "") -> dict:
    """Run ``code`` in the sandbox at ``url`` (default: the deployed one); what came back, or
    ``{"error": line}`` when it could not run there."""
    from sandbox.client import SandboxClient, SandboxRequestError, SandboxUnavailable

    try:
        endpoint = url or modal_common.sandbox_url()
        client = SandboxClient(endpoint, timeout_s=120)  # the token: this function's secret
        try:
            result = client.run_code_sync(code)
        finally:
            client.close()
    except (modal_common.SandboxNotDeployed, SandboxUnavailable, SandboxRequestError) as exc:
        return {"error": str(exc)}
    return {
        "endpoint": endpoint,
        "status": result.status,
        "run_status": result.run_status,
        "latency_ms": round(result.latency_s * 1000),
        "stdout": result.stdout,
        "stderr": result.stderr,
        "ok": result.ok,
    }


@app.local_entrypoint()
def test_single_request(code: str = "print(2+2)", url: str = "") -> None:
    import sys

    result = run_snippet.remote(code, url)
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
        raise SystemExit(1)
    print(f"endpoint: {result['endpoint']}")
    print(f"status: {result['status']} ({result['run_status']}), latency {result['latency_ms']} ms")
    print(result["stdout"], end="")
    if result["stderr"]:
        print(result["stderr"], end="")
    if not result["ok"]:
        raise SystemExit(1)
