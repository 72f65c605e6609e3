"""The ``code_interpreter`` tool: verl's ``BaseTool`` in front of the sandbox's ``/run_code``.

verl 0.9.1 ships no SandboxFusion tool, so this is ours. verl builds it from
``sandbox_fusion_modal_config.yaml`` (``initialize_tools_from_config`` → ``cls(config=dict,
tool_schema=...)``) and, per tool call, ``ToolAgentLoop._call_tool`` does ``create`` →
``execute(instance_id, parsed_args, agent_data=...)`` → ``release``.

What a call does is :func:`recipe.retool.verl_plugins.interpreter.run_code_call`, shared with the
serving tool loop: take the first fenced python block (else the raw string), print the last
expression notebook-style, run it in the sandbox through the one shared
:class:`sandbox.client.SandboxClient`, and answer with its output or an error the model can act on,
capped at ``output_cap_chars`` keeping head and tail (verl's ``max_tool_response_length`` cuts
again after us, in the middle, so set it at least as large to keep our marker visible).

Each call's metrics (latency, status) are returned, and, because verl 0.9.1's ``ToolAgentLoop``
drops the metrics dict that ``execute`` returns, also appended to the trajectory's
``agent_data.extra_fields["code_interpreter_calls"]``, which verl carries into the batch's
non-tensor fields (and into ``extra_info`` of the reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from recipe.retool.core.constants import TOOL_CALLS_KEY, TOOL_SCHEMA
from recipe.retool.verl_plugins.interpreter import run_code_call
from sandbox.client import SandboxClient

__all__ = ["CodeInterpreterTool", "ToolSettings"]


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
        run = await run_code_call(
            self.client,
            raw,
            run_timeout=self.settings.default_timeout,
            memory_limit_mb=self.settings.memory_limit_mb,
            language=self.settings.language,
            output_cap_chars=self.settings.output_cap_chars,
        )
        metrics = self._record(kwargs, run.metrics())
        return ToolResponse(text=run.text), 0.0, metrics

    @staticmethod
    def _record(kwargs: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
        """Append the call's metrics to the trajectory (see module docstring) and return them."""
        agent_data = kwargs.get("agent_data")
        extra = getattr(agent_data, "extra_fields", None)
        if isinstance(extra, dict):
            extra.setdefault(TOOL_CALLS_KEY, []).append(metrics)
        return metrics

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._instances.pop(instance_id, None)
