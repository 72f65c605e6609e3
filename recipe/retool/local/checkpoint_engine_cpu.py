"""A CPU checkpoint engine for verl's fully-async trainer: the CPU counterpart of NCCL weight sync.

In async DAPO the trainer and the rollout replicas live in different processes on different GPUs,
and ``CheckpointEngineManager.update_weights`` moves the weights between them: every actor rank
calls ``send_weights(<(name, tensor) generator>)``, every rollout worker
``receive_weights()``, and verl's NCCL engine broadcasts buckets from actor rank 0 to the rollout
workers. NCCL needs GPUs. This engine, registered under :data:`BACKEND`, keeps that protocol and
moves the tensors through Ray's object store instead: actor rank 0 deposits the full tensors,
tagged with the weights' ``global_steps``, in a named mailbox actor; each rollout worker waits for
that version and takes it. The other actor ranks still walk the generator, since producing each
full tensor is an FSDP all-gather every rank takes part in.

Selected by ``actor_rollout_ref.rollout.checkpoint_engine.backend`` (``cpu_async_ppo.py``), and
imported in every worker through verl's ``checkpoint_engine.custom_backend_module``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterable
from typing import Any

import ray
import torch
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry
from verl.workers.rollout.utils import ensure_async_iterator

BACKEND = "cpu_object_store"
MAILBOX_NAME = "retool_cpu_weight_mailbox"


class WeightMailbox:
    """Holds the newest weights actor rank 0 sent, until the next version replaces them."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.weights: dict[str, torch.Tensor] = {}
        self.arrived = asyncio.Condition()

    async def put(self, version: int | None, weights: dict[str, torch.Tensor]) -> None:
        async with self.arrived:
            self.version, self.weights = version, weights
            self.arrived.notify_all()

    async def get(self, version: int | None) -> dict[str, torch.Tensor]:
        """The weights of ``version``, once rank 0 has sent them (``None``: whatever is there)."""
        async with self.arrived:
            await self.arrived.wait_for(
                lambda: self.weights and (version is None or self.version == version)
            )
            return self.weights


@functools.cache
def _mailbox() -> Any:
    """The mailbox of this Ray job, created by whichever side asks first. The handle is kept for
    the life of the process: Ray ends a (non-detached) actor once its creator holds no handle,
    and a dropped one killed the mailbox between a send and a receive ("actor died
    unexpectedly", seen once in a CI run)."""
    return (
        ray.remote(WeightMailbox)
        .options(name=MAILBOX_NAME, get_if_exists=True, num_cpus=0, max_concurrency=64)
        .remote()
    )


@CheckpointEngineRegistry.register(BACKEND)
class ObjectStoreCheckpointEngine(CheckpointEngine):
    """``send_weights`` on actor rank 0 deposits full tensors; rollout workers collect them."""

    def __init__(self, bucket_size: int, is_master: bool = False, **_: Any) -> None:
        self.bucket_size = bucket_size  # unused: tensors travel whole
        self.is_master = is_master
        self.rank: int | None = None

    def prepare(self) -> None:
        return None

    @classmethod
    def build_topology(
        cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list
    ) -> tuple[dict[str, list], dict[str, list]]:
        """Actor ranks 0..A-1 send (rank 0 deposits), rollout workers are ranks A.. and receive."""
        actor = {"rank": list(range(actor_wg_world_size))}
        rollout = {
            "rank": list(range(actor_wg_world_size, actor_wg_world_size + rollout_world_size))
        }
        return actor, rollout

    def init_process_group(self, rank: int) -> None:
        self.rank = rank

    def finalize(self) -> None:
        return None

    async def send_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], global_steps: int | None = None
    ) -> dict:
        gathered = {}
        async for name, tensor in ensure_async_iterator(weights):
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if self.rank == 0:
                gathered[name] = full.detach().to("cpu", copy=True)
        if self.rank == 0:
            await _mailbox().put.remote(global_steps, gathered)
        return {}

    async def receive_weights(
        self, global_steps: int | None = None
    ) -> AsyncIterator[tuple[str, torch.Tensor]]:
        weights = await _mailbox().get.remote(global_steps)
        for item in weights.items():
            yield item
