"""The recipe's fixed strings, in one place: tool name and schema, prompt format, dataset ids.

The SFT parquet, the RL parquet, the tool yaml and the tool class all render the code tool into
the model's system prompt. If any of them spelt the schema differently, the policy would see one
system prompt in SFT and another in RL, so every module imports it from here.
"""

from __future__ import annotations

from typing import Any, Final

TOOL_NAME: Final = "code_interpreter"

# Key order matters: it is the order the chat template's `tojson` renders, and it matches the
# field order of verl's `OpenAIFunctionToolSchema.model_dump(exclude_unset=True)`, so the SFT
# system prompt (from the parquet `tools` column) equals the RL one (from the tool object).
TOOL_SCHEMA: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "A tool for executing code.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The code to execute."}},
            "required": ["code"],
        },
    },
}

# Appended to every RL/validation question (the upstream recipe's wording, verbatim).
ANSWER_FORMAT: Final = "\nThe answer format must be: \\boxed{'The final answer goes here.'}"

# Where the tool appends each call's sandbox record (status, latency) in the trajectory's
# extra fields; the reward manager hands them to compute_score, evaluation reads them back.
TOOL_CALLS_KEY: Final = "code_interpreter_calls"

AGENT_NAME: Final = "tool_agent"  # selects verl's ToolAgentLoop
ABILITY: Final = "MATH"
REWARD_STYLE: Final = "rule"

# Hugging Face dataset ids (public; HF_TOKEN is honoured when set, never required).
SFT_DATASET: Final = "JoeYing/ReTool-SFT"
RL_DATASET: Final = "BytedTsinghua-SIA/DAPO-Math-17k"
AIME_2024_DATASET: Final = "Maxwell-Jia/AIME_2024"
AIME_2025_DATASET: Final = "yentinglin/aime_2025"

# The Ray token of a multi-node DAPO launch: every node must hold the same one
# (stages/ray_cluster.py's join_ray_cluster); the Modal app makes it where `modal run` runs
# (modal_common.py).
RAY_TOKEN_ENV: Final = "RAY_AUTH_TOKEN"

# The wandb project of every evaluation: the Modal app links it, workflows/evaluation.py logs
# to it.
EVAL_PROJECT: Final = "retool-eval"
