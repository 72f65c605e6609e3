"""# One request against the deployed Modal sandbox

    modal run recipe/retool/test_sandbox_fusion.py::test_single_request --code 'print(2+2)'

Looks up the deployed web URL of ``recipe/retool/modal_fusion_sandbox.py`` (or uses ``--url``) and
runs one snippet through ``sandbox.client``, the same client the ReTool tool uses.
"""

from __future__ import annotations

import modal

from recipe.retool.paths import SANDBOX_APP_NAME as APP_NAME
from recipe.retool.paths import SANDBOX_FUNCTION_NAME as FUNCTION_NAME

app = modal.App(f"{APP_NAME}-check")


@app.local_entrypoint()
def test_single_request(code: str = "print(2+2)", url: str = "") -> None:
    from sandbox.client import SandboxClient

    if not url:
        url = modal.Function.from_name(APP_NAME, FUNCTION_NAME).get_web_url()
    client = SandboxClient(url, timeout_s=120)
    try:
        result = client.run_code_sync(code)
    finally:
        client.close()
    print(f"endpoint: {url}")
    print(
        f"status: {result.status} ({result.run_status}), latency {result.latency_s * 1000:.0f} ms"
    )
    print(result.stdout, end="")
    if result.stderr:
        print(result.stderr, end="")
    if not result.ok:
        raise SystemExit(1)
