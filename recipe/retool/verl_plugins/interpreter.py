"""One ``code_interpreter`` call, from the model's raw argument to the text it reads back.

Shared by the verl tool (``tools.py``, training and evaluation) and the serving tool loop
(``serving/tool_chat.py``), so a served model sees exactly the tool output it was trained on.
Nothing here imports verl: the serving container and the chat API import this without pulling in
Ray.

What a call does:

1. take the code: the first fenced python block if the model wrote one, else the raw string;
2. print the last expression, as a notebook would (and as the ReTool recipe does): ``x`` becomes
   ``print(x)``; ``x = 5`` and ``print(x)`` stay as they are (decided with ``ast``, not by
   string matching; code that does not parse is sent as is, so the model sees the SyntaxError);
3. run it through a :class:`sandbox.client.SandboxClient` (timeouts, retries with back-off on
   429/5xx/connection errors, bounded concurrency);
4. answer with stdout/stderr, a time-out notice or an error the model can act on, capped at
   ``output_cap_chars`` keeping head and tail.
"""

from __future__ import annotations

import ast
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from sandbox.client import RunResult, SandboxClient, SandboxRequestError, SandboxUnavailable

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Code preparation
# ---------------------------------------------------------------------------------------------


def extract_code(raw: str) -> str:
    """The first fenced python block in ``raw`` if there is one, else ``raw`` itself."""
    match = _FENCE.search(raw)
    return match.group(1) if match else raw


def _is_print_call(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    )


def print_last_expression(code: str) -> str:
    """Wrap the final top-level expression statement in ``print(...)``, notebook style.

    Only the expression's own characters are replaced, so code before it on the same line
    (``a = 1; a``) and anything after it (a comment) are kept. No-op when the last statement is
    not an expression, is already a ``print`` call, or the code does not parse.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    node = tree.body[-1].value
    if _is_print_call(node) or node.end_lineno is None or node.end_col_offset is None:
        return code
    lines = code.splitlines(keepends=True)
    # ast offsets are in UTF-8 bytes; work on bytes per line to stay exact with non-ASCII code.
    first = lines[node.lineno - 1].encode()
    last = lines[node.end_lineno - 1].encode()
    head = first[: node.col_offset].decode()
    tail = last[node.end_col_offset :].decode()
    segment = ast.get_source_segment(code, node)
    if segment is None:
        return code
    wrapped = f"{head}print({segment}){tail}"
    return "".join([*lines[: node.lineno - 1], wrapped, *lines[node.end_lineno :]])


def truncate_middle(text: str, cap: int) -> tuple[str, bool]:
    """Keep the first and last ``cap // 2`` characters with a marker saying how much was cut."""
    if cap <= 0 or len(text) <= cap:
        return text, False
    head = cap // 2
    tail = cap - head
    cut = len(text) - cap
    return f"{text[:head]}\n...[{cut} characters truncated]...\n{text[-tail:]}", True


def format_result(result: RunResult, run_timeout: float) -> str:
    """What the model reads back: output, or why there is none, in plain words.

    Trailing newlines are dropped so a tool turn looks like the SFT data's ``<interpreter>``
    blocks (``print(120)`` reads back as ``120``, not ``120\\n``).
    """
    text = (result.stdout + result.stderr).rstrip("\n")
    if result.timed_out:
        notice = f"TimeoutError: execution exceeded the {run_timeout:g} s time limit."
        return f"{text}\n{notice}" if text else notice
    if result.status == "Success":
        return text if text.strip() else "(no output)"
    if result.status == "Failed":
        return text if text.strip() else f"Execution failed (exit code {result.return_code})."
    return f"SandboxError: {result.message or 'the sandbox could not run the code'}"


# ---------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------

INVALID_CODE_MESSAGE = "Error: `code` must be a non-empty string of Python code."


# Statuses of a call the sandbox failed to run (it never reached a result of the code), as
# opposed to code that ran and failed (Failed), timed out, or a malformed call (InvalidArguments).
SANDBOX_FAILURES = frozenset({"SandboxError", "Unavailable", "RequestError"})


@dataclass(frozen=True)
class CodeRun:
    """What one call produced: the text for the model, and how the sandbox fared."""

    text: str
    status: str  # Success / Failed / SandboxError, or InvalidArguments / Unavailable / RequestError
    run_status: str | None  # Finished / Error / TimeLimitExceeded; None if the code never ran
    latency_s: float
    truncated: bool = False

    @property
    def timed_out(self) -> bool:
        return self.run_status == "TimeLimitExceeded"

    def metrics(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "run_status": self.run_status,
            "latency_s": round(self.latency_s, 6),
            "timed_out": self.timed_out,
            "truncated": self.truncated,
        }


async def run_code_call(
    client: SandboxClient,
    raw: Any,
    *,
    run_timeout: float = 30.0,
    memory_limit_mb: int = 1024,
    language: str = "python",
    output_cap_chars: int = 4096,
) -> CodeRun:
    """Run the model's ``code`` argument; never raises for bad input or a sandbox outage."""
    if not isinstance(raw, str) or not raw.strip():
        return CodeRun(INVALID_CODE_MESSAGE, "InvalidArguments", None, 0.0)
    code = print_last_expression(extract_code(raw))
    start = time.perf_counter()
    run_status: str | None = None
    try:
        result = await client.run_code(
            code, language=language, run_timeout=run_timeout, memory_limit_mb=memory_limit_mb
        )
    except (SandboxUnavailable, SandboxRequestError) as exc:
        logger.warning("code_interpreter: %s", exc)
        status = "Unavailable" if isinstance(exc, SandboxUnavailable) else "RequestError"
        text = f"SandboxError: the code was not run ({type(exc).__name__}). Try again."
    else:
        status, run_status = result.status, result.run_status
        text = format_result(result, run_timeout)
    latency = time.perf_counter() - start
    text, truncated = truncate_middle(text, output_cap_chars)
    return CodeRun(text, status, run_status, latency, truncated)
