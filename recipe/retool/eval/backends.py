"""Generation backends for evaluation: one small interface, two engines.

A backend is what verl's ``ToolAgentLoop`` calls its ``server_manager``: an object with

    async def generate(request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput

(token ids in, token ids out; ``prompt_ids`` is the whole running context on every turn), plus
``max_concurrency`` (how many rollouts it can usefully serve at once; None: no limit of its own)
and ``close()``. Any object with that shape works, e.g. ``local.scripted_server.ScriptedServer``
in tests. Both engines also ``load_weights(model_dir)``: another checkpoint of the same model,
swapped in without building a new engine (``sweep.py`` scores many SFT steps with one vLLM start).

* ``hf``: :class:`HFBackend` around :class:`HFGenerateServer` (``model.generate`` on CPU; the
  tiny model in tests and the local smoke run; also the ``hf_cpu`` rollout replica's sampler).
  One rollout generates at a time.
* ``vllm``: :class:`VLLMBackend`, vLLM's ``AsyncLLM`` engine (the engine verl's own rollout server
  wraps) in this process, continuous batching across all in-flight rollouts.

:class:`TurnBudget` sits in front of either and sets each turn's ``max_tokens`` to what is left
of the sample's response budget, as verl's vLLM server does during training, so a turn never
generates tokens the loop would cut off anyway.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

from recipe.retool.eval.config import EvalConfig, EvalError

BACKENDS = ("hf", "vllm")


class GenerationBackend(Protocol):
    max_concurrency: int | None

    async def generate(
        self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **kw: Any
    ) -> Any: ...

    def close(self) -> None: ...


class TurnBudget:
    """Per-rollout wrapper: ``max_tokens`` = response budget left (first prompt = turn 0)."""

    def __init__(self, backend: Any, response_tokens: int) -> None:
        self.backend = backend
        self.response_tokens = response_tokens
        self._first_prompt_len: int | None = None

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        **kwargs: Any,
    ):
        if self._first_prompt_len is None:
            self._first_prompt_len = len(prompt_ids)
        used = len(prompt_ids) - self._first_prompt_len
        params = {**sampling_params, "max_tokens": max(1, self.response_tokens - used)}
        return await self.backend.generate(
            request_id, prompt_ids=prompt_ids, sampling_params=params, **kwargs
        )


def generate_kwargs(
    sampling_params: dict[str, Any], eos_ids: list[int], pad_id: int | None, max_new: int
) -> dict[str, Any]:
    """``model.generate`` arguments for verl's sampling params (``temperature``, ``top_p``,
    ``top_k``, ``stop_token_ids``); temperature 0 is greedy, as in vLLM."""
    temperature = float(sampling_params.get("temperature", 1.0) or 0.0)
    top_k = int(sampling_params.get("top_k", -1) or -1)
    stop = {*eos_ids, *(sampling_params.get("stop_token_ids") or [])}
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new,
        "eos_token_id": sorted(stop),
        "pad_token_id": pad_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(
            temperature=temperature,
            top_p=float(sampling_params.get("top_p", 1.0)),
            top_k=top_k if top_k > 0 else 0,
        )
    return kwargs


class HFGenerateServer:
    """Stands in for verl's LLM server with real sampling from a HF causal LM (CPU smoke runs).

    Honours verl's sampling params (``temperature``, ``top_p``, ``top_k``, ``max_tokens``,
    ``stop_token_ids``); ``max_new_tokens`` caps each turn so a tiny random model cannot run long.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 128, seed: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.calls = 0

    def _generate(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> list[int]:
        import torch

        max_new = min(
            int(sampling_params.get("max_tokens") or self.max_new_tokens), self.max_new_tokens
        )
        kwargs = generate_kwargs(
            sampling_params, [self.tokenizer.eos_token_id], self.tokenizer.pad_token_id, max_new
        )
        torch.manual_seed(self.seed + self.calls)
        self.calls += 1
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.no_grad():
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
            )
        return out[0, len(prompt_ids) :].tolist()

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ):
        from verl.workers.rollout.replica import TokenOutput

        ids = await asyncio.to_thread(self._generate, list(prompt_ids), sampling_params)
        return TokenOutput(token_ids=ids, stop_reason="completed")


class HFBackend:
    """CPU generation with Hugging Face ``generate`` (tests, the local smoke run)."""

    max_concurrency = 1  # generate() is CPU-bound; tool calls of other rollouts still overlap

    def __init__(self, model_dir: Path, tokenizer: Any, *, max_new_tokens: int, seed: int = 0):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        model.eval()
        self.server = HFGenerateServer(model, tokenizer, max_new_tokens=max_new_tokens, seed=seed)

    async def generate(self, request_id: str, **kwargs: Any):
        return await self.server.generate(request_id, **kwargs)

    async def load_weights(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        model.eval()
        self.server.model = model

    def close(self) -> None:
        pass


class VLLMBackend:
    """GPU generation with vLLM's ``AsyncLLM`` (token in, token out), in this process.

    Not exercised by the CPU tests: vLLM is not installed in CI or on CPU machines, so it is
    imported here, lazily, and only the trainer image (vLLM 0.24, verl 0.9.1's pin) runs it. Build
    it inside the running event loop (``AsyncLLM`` binds its output handler to that loop).
    """

    max_concurrency = None

    def __init__(
        self,
        model_dir: Path,
        *,
        max_model_len: int,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "bfloat16",
        seed: int = 0,
        enforce_eager: bool = False,
    ) -> None:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.async_llm import AsyncLLM

        self._sampling_params_cls = SamplingParams
        self._prompt_cls = TokensPrompt
        self.max_model_len = max_model_len
        args = AsyncEngineArgs(
            model=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=True,  # every turn re-sends the whole context
            enforce_eager=enforce_eager,  # no compile or CUDA graphs: starts in seconds
        )
        # vLLM forks its engine process by default, and a forked child cannot use CUDA once this
        # process has touched it (seen on an H100: "Cannot re-initialize CUDA in forked
        # subprocess", every evaluation failed). Spawn is always safe; the CLI guards __main__.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        self.engine = AsyncLLM.from_engine_args(args)

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        **kwargs: Any,
    ):
        from verl.workers.rollout.replica import TokenOutput

        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"context of {len(prompt_ids)} tokens leaves no room to generate")
        params = self._sampling_params_cls(
            max_tokens=max(1, min(int(sampling_params.get("max_tokens", room)), room)),
            temperature=float(sampling_params.get("temperature", 1.0)),
            top_p=float(sampling_params.get("top_p", 1.0)),
            top_k=int(sampling_params.get("top_k", -1)),
            repetition_penalty=float(sampling_params.get("repetition_penalty", 1.0)),
            stop_token_ids=list(sampling_params.get("stop_token_ids") or []),
        )
        final = None
        # verl reuses one request id for every turn of a rollout; vLLM wants it unique
        async for output in self.engine.generate(
            prompt=self._prompt_cls(prompt_token_ids=list(prompt_ids)),
            sampling_params=params,
            request_id=f"{request_id}-{uuid.uuid4().hex[:8]}",
        ):
            final = output
        if final is None or not final.outputs:
            return TokenOutput(token_ids=[], stop_reason="aborted")
        return TokenOutput(token_ids=list(final.outputs[0].token_ids), stop_reason="completed")

    async def load_weights(self, model_dir: Path) -> None:
        """vLLM's in-place reload (the worker's ``reload_weights`` from a path), then a cleared
        prefix cache: cached KV blocks were computed by the old weights."""
        await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        await self.engine.reset_prefix_cache()

    def close(self) -> None:
        self.engine.shutdown()


def make_backend(backend: str, model_dir: Path, tokenizer: Any, cfg: EvalConfig) -> Any:
    """The engine a backend name (:data:`BACKENDS`) stands for, sized by the evaluation's
    settings; the caller closes it."""
    if backend == "hf":
        return HFBackend(
            model_dir, tokenizer, max_new_tokens=cfg.max_response_tokens, seed=cfg.seed
        )
    if backend == "vllm":
        return VLLMBackend(
            model_dir,
            max_model_len=cfg.max_prompt_tokens + cfg.max_response_tokens,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            dtype=cfg.dtype,
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
        )
    raise EvalError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
