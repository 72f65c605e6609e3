"""The ``code_interpreter`` tool: verl's ``BaseTool`` in front of the sandbox's ``/run_code``.

verl 0.9.1 ships no SandboxFusion tool, so this is ours. verl builds it from
``sandbox_fusion_modal_config.yaml`` (``initialize_tools_from_config`` → ``cls(config=dict,
tool_schema=...)``) and, per tool call, ``ToolAgentLoop._call_tool`` does ``create`` →
``execute(instance_id, parsed_args, agent_data=...)`` → ``release``.

What a call does:

1. take the code: the first fenced python block if the model wrote one, else the raw string;
2. print the last expression, as a notebook would (and as the ReTool recipe does): ``x`` becomes
   ``print(x)``; ``x = 5`` and ``print(x)`` stay as they are (decided with ``ast``, not by
   string matching; code that does not parse is sent as is, so the model sees the SyntaxError);
3. run it through the one shared :class:`sandbox.client.SandboxClient` (timeouts, retries with
   back-off on 429/5xx/connection errors, bounded concurrency);
4. answer with stdout/stderr, a time-out notice or an error the model can act on, capped at
   ``output_cap_chars`` keeping head and tail (verl's ``max_tool_response_length`` cuts again
   after us, in the middle, so set it at least as large to keep our marker visible);
5. return per-call metrics (latency, status). verl 0.9.1's ``ToolAgentLoop`` drops the metrics
   dict that ``execute`` returns, so they are also appended to the trajectory's
   ``agent_data.extra_fields["code_interpreter_calls"]``, which verl carries into the batch's
   non-tensor fields (and into ``extra_info`` of the reward).
"""

from __future__ import annotations

import ast
import logging
import re
import time
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from recipe.retool.constants import TOOL_SCHEMA
from sandbox.client import RunResult, SandboxClient, SandboxRequestError, SandboxUnavailable

logger = logging.getLogger(__name__)

EXTRA_FIELDS_KEY = "code_interpreter_calls"
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
# The tool
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSettings:
    """The ``config:`` block of the tool yaml (all optional except ``type``)."""

    sandbox_fusion_url: str | None = None  # None: $SANDBOX_FUSION_ENDPOINT, then 127.0.0.1:8080
    default_timeout: float = 30.0  # seconds the code may run
    memory_limit_mb: int = 1024
    max_concurrency: int = 64  # in-flight requests per tool object (i.e. per agent-loop worker)
    max_retries: int = 4
    output_cap_chars: int = 4096
    language: str = "python"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ToolSettings:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(config) - known - {"type"}
        if unknown:
            raise ValueError(f"unknown code_interpreter config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in config.items() if k in known})


class CodeInterpreterTool(BaseTool):
    """verl tool that runs Python in the sandbox and returns what it printed."""

    def __init__(
        self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None = None
    ) -> None:
        schema = tool_schema or OpenAIFunctionToolSchema.model_validate(TOOL_SCHEMA)
        super().__init__(config, schema)
        self.settings = ToolSettings.from_config(config)
        self.client = SandboxClient(
            self.settings.sandbox_fusion_url or None,
            # the HTTP request must outlive the run it waits for
            timeout_s=self.settings.default_timeout + 30.0,
            max_retries=self.settings.max_retries,
            max_concurrency=self.settings.max_concurrency,
        )
        self._instances: dict[str, dict[str, Any]] = {}

    async def create(
        self, instance_id: str | None = None, **kwargs: Any
    ) -> tuple[str, ToolResponse]:
        instance_id = instance_id or str(uuid4())
        self._instances[instance_id] = {"create_kwargs": kwargs.get("create_kwargs") or {}}
        return instance_id, ToolResponse()

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict[str, Any]]:
        raw = parameters.get("code") if isinstance(parameters, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            text = "Error: `code` must be a non-empty string of Python code."
            return ToolResponse(text=text), 0.0, self._record(kwargs, "InvalidArguments", 0.0)

        code = print_last_expression(extract_code(raw))
        start = time.perf_counter()
        run_status: str | None = None
        try:
            result = await self.client.run_code(
                code,
                language=self.settings.language,
                run_timeout=self.settings.default_timeout,
                memory_limit_mb=self.settings.memory_limit_mb,
            )
        except (SandboxUnavailable, SandboxRequestError) as exc:
            logger.warning("code_interpreter: %s", exc)
            status = "Unavailable" if isinstance(exc, SandboxUnavailable) else "RequestError"
            text = f"SandboxError: the code was not run ({type(exc).__name__}). Try again."
        else:
            status, run_status = result.status, result.run_status
            text = format_result(result, self.settings.default_timeout)
        latency = time.perf_counter() - start
        text, truncated = truncate_middle(text, self.settings.output_cap_chars)
        metrics = self._record(kwargs, status, latency, run_status=run_status, truncated=truncated)
        return ToolResponse(text=text), 0.0, metrics

    def _record(
        self,
        kwargs: dict[str, Any],
        status: str,
        latency_s: float,
        *,
        run_status: str | None = None,
        truncated: bool = False,
    ) -> dict[str, Any]:
        """Build the call's metrics and append them to the trajectory (see module docstring)."""
        metrics = {
            "status": status,
            "run_status": run_status,
            "latency_s": round(latency_s, 6),
            "timed_out": run_status == "TimeLimitExceeded",
            "truncated": truncated,
        }
        agent_data = kwargs.get("agent_data")
        extra = getattr(agent_data, "extra_fields", None)
        if isinstance(extra, dict):
            extra.setdefault(EXTRA_FIELDS_KEY, []).append(metrics)
        return metrics

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._instances.pop(instance_id, None)
