"""verl's DAPO reward manager plus the turn count the ReTool reward needs.

verl 0.9.1's ``dapo`` manager adds DAPO's overlong shaping but, unlike ``naive``, does not put the
rollout's ``num_turns`` into ``extra_info``, so ReTool's "reward trying the tool" shaping for
wrong answers (reward.py) would silently never apply. This subclass copies ``__num_turns__``
into ``extra_info`` and otherwise defers to verl. Selected in config/dapo.yaml with
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
        if turns is not None:
            infos = last.non_tensor_batch.get("extra_info")
            extra = dict(infos[0]) if infos is not None and infos[0] is not None else {}
            extra["num_turns"] = int(turns[0])
            last.non_tensor_batch["extra_info"] = np.array([extra], dtype=object)
        return await super().run_single(last)
