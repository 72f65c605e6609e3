"""A CPU rollout backend for verl's PPO trainer: Hugging Face ``generate`` behind verl's
rollout-server interface. CPU-only infrastructure (tests, ``make local-smoke``); GPUs use vLLM.

verl 0.9.1's ``main_ppo`` generates through rollout *replicas*: a replica starts one server
actor per node, the agent loop sends it ``generate(prompt_ids, sampling_params, request_id)``
(token in, token out), and after every actor update the trainer pushes the new weights to it
through an adapter object living inside each actor worker. verl registers replicas for vLLM,
SGLang and TRT-LLM only, all GPU engines. This module adds a fourth under the rollout name
:data:`NAME`, through verl's own two lookups:

* ``RolloutReplicaRegistry.register(NAME, loader)`` (``verl/workers/rollout/replica.py``) for
  :class:`CpuReplica`, which the trainer's ``LLMServerManager`` builds;
* ``verl.workers.rollout.base._ROLLOUT_REGISTRY[(NAME, "async")]``, the table
  ``get_rollout_class`` reads in the actor worker (``engine_workers.py``, "build rollout
  engine") for :class:`CpuServerAdapter`. verl offers no public setter for it.

Weights travel as verl sends them to vLLM in colocated mode (``checkpoint_engine.backend``
``naive``, which the V1 trainer forces): the actor worker calls
``adapter.update_weights(<(name, tensor) generator>, global_steps=...)``; the adapter gathers the
tensors and hands them to its replica's server over Ray, which loads them into its model. The
server stamps every output with the weights' ``global_steps`` as vLLM does, and returns the
sampled tokens' log-probs under the weights it sampled with, so verl's own
``training/rollout_probs_diff_*`` metrics compare the rollout's policy with the actor's.

Sampling is seeded as vLLM's is, from ``rollout.seed`` plus the replica's rank, but per request
(:func:`request_seed`): the agent loop sends a step's requests concurrently, so a seed drawn in
arrival order would still vary from run to run.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator

from recipe.retool.eval.backends import generate_kwargs

NAME = "hf_cpu"


def _server_name(replica_rank: int) -> str:
    """The Ray actor name of a replica's server: one server per replica (CPU replicas are one
    rank, so they never span nodes)."""
    return f"{NAME}_server_{replica_rank}"


def request_seed(
    seed: int, global_steps: int | None, prompt_ids: Sequence[int], occurrence: int
) -> int:
    """The sampling seed of one request: a hash of what the request is, not of when it arrived.

    ``occurrence`` counts earlier requests with the same prompt under the same weights
    (``global_steps``), so a group's n rollouts of one prompt draw n different samples, and two
    rollouts whose contexts are identical so far go on differently. Which of them gets which
    count depends on arrival order, but identical prompts make that order immaterial.
    """
    step = -1 if global_steps is None else global_steps
    key = ",".join(map(str, (seed, step, occurrence, *prompt_ids))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class HFRolloutServer:
    """The server actor: one HF causal LM on CPU, sampling one request at a time.

    Requests are serialised with a lock: on a CPU, concurrent ``generate`` calls only fight over
    the same cores, and a weight update must never land in the middle of one. The lock also
    keeps each request's seeded RNG (:meth:`_sample`) to itself.
    """

    def __init__(
        self, model_path: str, prompt_length: int, response_length: int, seed: int
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, torch_dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        self.prompt_length = prompt_length
        self.response_length = response_length
        self.global_steps: int | None = None
        self.lock = asyncio.Lock()
        self.seed = seed
        self.occurrences: Counter[tuple[int, ...]] = Counter()

    def _next_seed(self, prompt_ids: list[int]) -> int:
        """:func:`request_seed` for this prompt's next occurrence under the current weights."""
        key = tuple(prompt_ids)
        occurrence = self.occurrences[key]
        self.occurrences[key] += 1
        return request_seed(self.seed, self.global_steps, prompt_ids, occurrence)

    def _max_tokens(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> int:
        """vLLM's rule (``vllm_async_server.generate``): the caller's ``max_tokens``, else what is
        left of the prompt + response budget, capped by ``response_length``; at least 1."""
        requested = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens"))
        budget = self.prompt_length + self.response_length - len(prompt_ids)
        limit = requested if requested is not None else min(self.response_length, budget)
        return max(1, int(limit))

    @torch.no_grad()
    def _sample(
        self, prompt_ids: list[int], sampling_params: dict[str, Any], seed: int
    ) -> dict[str, Any]:
        """``generate`` under ``seed``: HF samples from torch's global RNG, which is forked so
        that nothing else in this process draws from the seeded stream or sees it changed."""
        config = self.model.generation_config
        eos = config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        max_new = self._max_tokens(prompt_ids, sampling_params)
        kwargs = generate_kwargs(sampling_params, eos_ids, config.pad_token_id or 0, max_new)
        temperature = float(sampling_params.get("temperature", 1.0) or 0.0)
        prompt = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        token_ids = out[0, len(prompt_ids) :].tolist()
        # The actor's definition of a token's log-prob: log_softmax(logits / temperature).
        logits = self.model(out).logits[0, len(prompt_ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
        chosen = logprobs.gather(-1, out[0, len(prompt_ids) :, None])[:, 0]
        return {"token_ids": token_ids, "log_probs": chosen.tolist()}

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ):
        """verl's token-in-token-out call (the signature ``LLMServerClient.generate`` uses)."""
        if image_data is not None or video_data is not None:
            raise ValueError(f"the {NAME} rollout is text-only")
        async with self.lock:  # the seed reads the weights' global_steps: inside the lock
            seed = self._next_seed(list(prompt_ids))
            sample = await asyncio.to_thread(
                self._sample, list(prompt_ids), dict(sampling_params), seed
            )
        return TokenOutput(
            token_ids=sample["token_ids"],
            log_probs=sample["log_probs"] if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def update_weights(self, weights: dict[str, torch.Tensor], global_steps: int | None):
        """Load the actor's weights (HF names) and stamp later outputs with ``global_steps``."""
        async with self.lock:
            own = self.model.state_dict()
            unknown = sorted(set(weights) - set(own))
            if unknown:
                raise KeyError(f"weights the rollout model does not have: {unknown[:5]}")
            self.model.load_state_dict(weights, strict=False)
            if global_steps is not None:
                self.global_steps = global_steps
            self.occurrences.clear()  # new weights, new seeds (global_steps is in the key)
        return len(weights)

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def noop(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Memory and scheduling controls a GPU engine needs (sleep, KV cache, abort): on a CPU
        with one request at a time there is nothing to free or abort."""
        return {}

    sleep = wake_up = clear_kv_cache = release_kv_cache = resume_kv_cache = noop
    abort_all_requests = resume_generation = start_profile = stop_profile = noop


class CpuReplica(RolloutReplica):
    """One :class:`HFRolloutServer` per replica, on the node of the replica's actor worker."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        if self.world_size != 1:
            raise ValueError(
                f"the {NAME} rollout runs one rank per replica; set tensor, data and pipeline "
                f"parallel sizes to 1 (world size now {self.world_size})"
            )
        node_id = await self.workers[0].__ray_call__.remote(
            lambda _self: ray.get_runtime_context().get_node_id()
        )
        server = (
            ray.remote(HFRolloutServer)
            .options(
                name=_server_name(self.replica_rank),
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                max_concurrency=self.max_concurrency,
                num_cpus=0,
            )
            .remote(
                str(self.model_config.path),
                int(self.config.prompt_length),
                int(self.config.response_length),
                int(self.config.seed) + self.replica_rank,  # vLLM's engine seed
            )
        )
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{NAME}-replica-{self.replica_rank}"  # no HTTP endpoint


async def _gather(weights: Iterable[tuple[str, torch.Tensor]] | AsyncIterator) -> dict:
    """The full tensors of a weight stream, copied to CPU (FSDP hands out DTensors)."""
    gathered = {}
    async for name, tensor in ensure_async_iterator(weights):
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        gathered[name] = full.detach().to("cpu", dtype=torch.float32, copy=True)
    return gathered


class CpuServerAdapter(BaseRollout):
    """Lives in each actor worker; rank 0 of a replica pushes weights to its server."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, **kwargs: Any):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ["RANK"])
        ranks_per_replica = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // ranks_per_replica
        self.has_server = rank % ranks_per_replica == 0
        self.server: Any = None

    async def resume(self, tags: list[str]) -> None:
        return None

    async def release(self) -> None:
        return None

    async def update_weights(
        self, weights: Any, global_steps: int | None = None, wire_format: str = "named_tensors",
        **kwargs: Any,
    ) -> None:  # fmt: skip
        if wire_format != "named_tensors":
            raise ValueError(f"the {NAME} rollout takes full tensors, not {wire_format!r}")
        gathered = await _gather(weights)  # every rank takes part in FSDP's all-gathers
        if not self.has_server:
            return
        if self.server is None:
            self.server = ray.get_actor(_server_name(self.replica_rank))
        await self.server.update_weights.remote(gathered, global_steps)


def register() -> None:
    """Make ``actor_rollout_ref.rollout.name=hf_cpu`` known to verl in this process
    (idempotent). Runs in every Ray worker (the CPU ``worker_process_setup_hook``)."""
    RolloutReplicaRegistry.register(NAME, lambda: CpuReplica)
    _ROLLOUT_REGISTRY[(NAME, "async")] = f"{__name__}.{CpuServerAdapter.__name__}"
