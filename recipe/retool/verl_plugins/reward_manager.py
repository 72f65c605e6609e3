"""verl's DAPO reward manager plus the turn count and tool calls the ReTool reward needs.

verl 0.9.1's ``dapo`` manager adds DAPO's overlong shaping but, unlike ``naive``, puts neither the
rollout's ``num_turns`` nor the agent loop's ``tool_extra_fields`` into ``extra_info``, so
ReTool's "reward trying the tool" shaping for wrong answers (reward.py) would silently never
apply and the per-call sandbox records (tools.py) would never reach the reward's metrics. This
subclass copies both into ``extra_info`` and otherwise defers to verl. Selected in
config/dapo.yaml with
``reward.reward_manager.source=importlib``.
"""

from __future__ import annotations

import numpy as np
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.dapo import DAPORewardManager


class ReToolRewardManager(DAPORewardManager):
    """DAPO overlong shaping + ``extra_info["num_turns"]`` for ``compute_score``."""

    async def run_single(self, data: DataProto) -> dict:
        last = data[-1:]
        turns = last.non_tensor_batch.get("__num_turns__")
        tool_fields = last.non_tensor_batch.get("tool_extra_fields")
        if turns is not None or tool_fields is not None:
            infos = last.non_tensor_batch.get("extra_info")
            extra = dict(infos[0]) if infos is not None and infos[0] is not None else {}
            if tool_fields is not None and isinstance(tool_fields[0], dict):
                extra.update(tool_fields[0])
            if turns is not None:
                extra["num_turns"] = int(turns[0])
            last.non_tensor_batch["extra_info"] = np.array([extra], dtype=object)
        return await super().run_single(last)
