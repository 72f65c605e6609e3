"""Evaluation settings (``config/eval.yaml``) and the errors a user sees, in one line each.

:class:`EvalConfig` is the ReTool paper's evaluation by default; every field can be set in the
yaml or on the command line (``python -m recipe.retool.eval ... n=4 tool_timeout_s=10``), and a
value that cannot work is refused, with the field named, before anything loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from recipe.retool.core.paths import EVAL_SETS

CONFIG_FILE = Path(__file__).parents[1] / "config" / "eval.yaml"
DEFAULT_DATASETS = EVAL_SETS
DEFAULT_SANDBOX_URL = "http://127.0.0.1:8080"
SCHEMA_VERSION = 1


class EvalError(RuntimeError):
    """A user-facing failure (bad path, missing data, unreachable sandbox): one line, no trace."""


class EvalConfigError(EvalError, ValueError):
    """Settings that cannot work (unknown key, wrong type, out of range, unreadable yaml)."""


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_problem(name: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the field's annotation (``int``, ``float | None``, ...), if so."""
    allowed = get_args(hint) or (hint,)
    if value is None:
        fits = type(None) in allowed
    elif isinstance(value, bool):
        fits = bool in allowed
    else:
        fits = any(isinstance(value, t) for t in allowed if t not in (bool, type(None)))
        fits = fits or (float in allowed and isinstance(value, int))
    if fits:
        return None
    words = " or ".join(_TYPE_WORDS.get(t, "null") for t in allowed)
    return f"{name}={value!r}: expected {words}"


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings. Defaults: the ReTool paper's evaluation (mirrored in eval.yaml)."""

    n: int = 32  # samples per problem
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = -1
    max_response_tokens: int = 16384  # whole multi-turn response, tool output included
    max_prompt_tokens: int = 2048  # as in DAPO training (vLLM context = prompt + response)
    max_assistant_turns: int = 16
    max_user_turns: int = 16  # tool-response turns
    max_tool_response_length: int | None = None  # chars; None: DAPO training's (dapo.yaml)
    tool_config: str | None = None  # tool yaml; None: the training one
    tool_timeout_s: float | None = None  # None: the tool yaml's (training: 30 s; paper: 10 s)
    max_concurrency: int = 64  # rollouts in flight (the backend may allow fewer)
    max_problems: int | None = None  # first N problems only (smoke runs)
    max_rollout_error_rate: float = 0.0  # fail the run when more rollouts than this crash
    # Fail the run when the sandbox failed to run more than this share of the tool calls (a
    # wrong token, a dead service): its scores would measure a model without its tool.
    max_tool_failure_rate: float = 0.2
    save_samples: bool = True  # samples_<dataset>.jsonl with every response
    seed: int = 0
    # vLLM only
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    dtype: str = "bfloat16"
    enforce_eager: bool = False  # True: no torch.compile or CUDA graphs (small models start fast)

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        wrong = [
            _type_problem(f.name, getattr(self, f.name), hints[f.name])
            for f in dataclasses.fields(self)
        ]
        if any(wrong):
            raise EvalConfigError("invalid eval config: " + "; ".join(filter(None, wrong)))
        problems = []
        if self.n < 1:
            problems.append("n must be >= 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.max_response_tokens < 1 or self.max_prompt_tokens < 1:
            problems.append("token budgets must be >= 1")
        if self.max_assistant_turns < 1 or self.max_user_turns < 0:
            problems.append("max_assistant_turns must be >= 1 and max_user_turns >= 0")
        if self.max_concurrency < 1:
            problems.append("max_concurrency must be >= 1")
        if not 0 <= self.max_tool_failure_rate <= 1:
            problems.append("max_tool_failure_rate must be in [0, 1]")
        if self.max_problems is not None and self.max_problems < 1:
            problems.append("max_problems must be >= 1")
        if self.tool_config is not None and not Path(self.tool_config).is_file():
            problems.append(
                f"tool_config {self.tool_config} is not a file (omit it for the training tool yaml)"
            )
        if problems:
            raise EvalConfigError("invalid eval config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise EvalConfigError(f"unknown eval config keys: {unknown}; known: {sorted(fields)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Path = CONFIG_FILE, **overrides: Any) -> EvalConfig:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise EvalConfigError(f"{path} is not valid YAML{line}: {problem}") from None
        if not isinstance(raw, dict):
            raise EvalConfigError(f"{path} must be a mapping of eval settings (key: value)")
        return cls.from_dict({**raw, **overrides})

    def replace(self, **changes: Any) -> EvalConfig:
        return dataclasses.replace(self, **changes)
