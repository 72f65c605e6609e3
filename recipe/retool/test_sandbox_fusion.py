"""# One request against the deployed Modal sandbox

    modal run recipe/retool/test_sandbox_fusion.py::test_single_request --code 'print(2+2)'

Looks up the deployed web URL of ``recipe/retool/modal_fusion_sandbox.py`` (or uses ``--url``) and
runs one snippet through ``sandbox.client``, the same client the ReTool tool uses.
"""

from __future__ import annotations

import modal

from recipe.retool.paths import SANDBOX_APP_NAME as APP_NAME

app = modal.App(f"{APP_NAME}-check")


@app.local_entrypoint()
def test_single_request(code: str = "print(2+2)", url: str = "") -> None:
    import sys

    from recipe.retool.modal_common import SandboxNotDeployed, sandbox_url
    from recipe.retool.modal_fusion_sandbox import deploy_token
    from sandbox.client import TOKEN_ENV, SandboxClient, SandboxRequestError, SandboxUnavailable

    try:
        url = url or sandbox_url()
        # the token the endpoint was deployed with (this shell's SANDBOX_API_TOKEN, else .env)
        client = SandboxClient(url, timeout_s=120, api_token=deploy_token().get(TOKEN_ENV))
        try:
            result = client.run_code_sync(code)
        finally:
            client.close()
    except (SandboxNotDeployed, SandboxUnavailable, SandboxRequestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"endpoint: {url}")
    print(
        f"status: {result.status} ({result.run_status}), latency {result.latency_s * 1000:.0f} ms"
    )
    print(result.stdout, end="")
    if result.stderr:
        print(result.stderr, end="")
    if not result.ok:
        raise SystemExit(1)
