"""DAPO dynamic sampling with a bound: verl's V1 replay buffer, refilling at most N batches a step.

verl 0.9.1's built-in V1 ``ReplayBuffer`` drops every prompt group whose rollouts all score the
same (no advantage, no gradient) and refills from the dataloader until a batch of groups with
signal is ready. It ignores ``algorithm.filter_groups.max_num_gen_batches`` (its log says so), so a
model whose groups all score the same (a fresh model that never solves anything, or one that
solves everything) refills forever and no step ever finishes.

This sampler keeps verl's group classification and eviction and adds the bound: once a step has
generated ``max_num_gen_batches`` batches of prompts, it stops filtering and trains on the groups
it has, zero-signal ones included (their advantage is zero, so they add nothing but cost nothing),
and says so in the log and in the metric ``training/filter_groups/budget_exhausted``. A run ends;
it never spins. ``max_num_gen_batches <= 0`` keeps verl's unbounded behaviour.

It is plugged in through verl's own hook, ``trainer.v1.sampler.custom_sampler`` (config/dapo.yaml),
and reads ``algorithm.filter_groups`` through interpolations in ``sampler_kwargs``, so the filter's
settings keep one source of truth.

**Control runs.** With ``sampler_kwargs.shuffle_rewards_seed`` set, every training batch's rewards
are permuted across its trajectories after filtering and before advantages: the batch keeps its
reward distribution but a reward no longer says which trajectory earned it. The learning curve's
control arm uses this to show that a rise comes from the reward, not from updates alone.
Validation batches are never touched.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from typing import Any

import torch
from tensordict import TensorDict
from verl.trainer.ppo.v1 import replay_buffer
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

logger = logging.getLogger(__name__)

PREFIX = "training/filter_groups"
CONTROL_PREFIX = "training/control"


def shuffle_rewards(scores: list[torch.Tensor], rng: random.Random) -> list[torch.Tensor]:
    """Each trajectory's total reward, permuted across the trajectories and put on its new
    trajectory's last response token (where verl's reward managers put it; GRPO reads the sum)."""
    totals = [float(s.sum()) for s in scores]
    order = list(range(len(scores)))
    rng.shuffle(order)
    shuffled = []
    for row, source in zip(scores, order, strict=True):
        new = torch.zeros_like(row)
        new[-1] = totals[source]
        shuffled.append(new)
    return shuffled


class BoundedDAPOReplayBuffer(ReplayBuffer):
    """verl's sync replay buffer with DAPO filtering whose refills stop after a budget."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = dict(kwargs.get("sampler_kwargs") or {})
        enabled = bool(options.get("enable", False))
        kwargs["filter_groups_metric"] = str(options["metric"]) if enabled else None
        super().__init__(*args, **kwargs)
        self.max_num_gen_batches = int(options.get("max_num_gen_batches", 0))
        self.gen_batch_size = int(options.get("gen_batch_size", 0) or 0) or None
        seed = options.get("shuffle_rewards_seed")
        self.reward_rng = random.Random(int(seed)) if seed is not None else None
        if self.reward_rng is not None:
            logger.warning("control run: training rewards are shuffled across each batch")

    def sample(self, global_steps: int, partition_id: str, batch_size: int):
        """A training batch as :meth:`_sample_groups` picks it, its rewards shuffled in a control
        run."""
        batch, metrics = self._sample_groups(global_steps, partition_id, batch_size)
        if partition_id != "val" and self.reward_rng is not None:
            metrics[f"{CONTROL_PREFIX}/moved_rewards"] = self._shuffle_batch_rewards(batch)
        return batch, metrics

    def _shuffle_batch_rewards(self, batch: Any) -> float:
        """Permute ``rm_scores`` across the batch in the TransferQueue; returns the share of
        trajectories whose reward changed."""
        tq = replay_buffer.tq
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["rm_scores"]
        )
        rows = list(data["rm_scores"].unbind())
        shuffled = shuffle_rewards(rows, self.reward_rng)
        fields = TensorDict(
            {"rm_scores": torch.nested.as_nested_tensor(shuffled, layout=torch.jagged)},
            batch_size=[len(rows)],
        )
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
        moved = sum(float(a.sum()) != float(b.sum()) for a, b in zip(rows, shuffled, strict=True))
        return moved / max(1, len(rows))

    def _sample_groups(self, global_steps: int, partition_id: str, batch_size: int):
        """``batch_size`` groups with signal, or, once the budget is spent, any groups."""
        if partition_id == "val" or self.filter_groups_metric is None:
            return super().sample(global_steps, partition_id, batch_size)
        unit = self.gen_batch_size or batch_size
        budget = self.max_num_gen_batches * unit if self.max_num_gen_batches > 0 else math.inf
        generated = batch_size  # the trainer's prepare_step submitted the first batch
        exhausted = False
        metrics: dict[str, Any] = {f"{PREFIX}/evicted_samples": 0}
        while True:
            self._sync_metadata_from_transfer_queue()
            if exhausted:
                failed = self._terminal_eviction_reasons(global_steps, partition_id)[2]
                reasons = (set(), set(), failed, Counter())
            else:
                reasons = self._terminal_eviction_reasons(global_steps, partition_id)
            _, _, dapo_count, _ = self._evict_terminal_groups(global_steps, partition_id, reasons)
            metrics[f"{PREFIX}/evicted_samples"] += dapo_count
            ready = self._sampleable_terminal_keys(partition_id, reasons)
            inflight = len(self.pending_keys[partition_id]) + len(self.running_keys[partition_id])
            if len(ready) >= batch_size and inflight == 0:
                break
            shortfall = batch_size - len(ready) - inflight
            if shortfall > 0:
                if not exhausted and generated + shortfall > budget:
                    exhausted = True
                    logger.warning(
                        "dynamic sampling: %d prompts generated this step (max_num_gen_batches=%d) "
                        "without %d groups whose rewards differ; training on the groups at hand",
                        generated,
                        self.max_num_gen_batches,
                        batch_size,
                    )
                    continue  # re-read without filtering: what has finished is now usable
                count = math.ceil(shortfall / unit) * unit
                self.refill_fn(count)
                generated += count
                continue
            time.sleep(self.poll_interval)

        selected, snapshot, _ = self._select_prompt_uids(partition_id, ready, batch_size)
        surplus = ready - set(selected)
        self._clear_groups(partition_id, surplus)
        metrics[f"{PREFIX}/discarded_surplus_samples"] = len(surplus)
        metrics[f"{PREFIX}/generated_prompts"] = generated
        metrics[f"{PREFIX}/budget_exhausted"] = int(exhausted)
        return self._materialize_batch(partition_id, selected, snapshot), metrics
