"""Scoring many checkpoints with one engine: weights swapped between steps, scored like eval."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipe.retool.eval.config import EvalConfig
from recipe.retool.eval.problems import load_problems
from recipe.retool.eval.sweep import score_steps
from tests.recipe.eval.test_evaluate import data_dir, datasets  # noqa: F401  (data_dir: fixture)


class StepBackend:
    """A stand-in engine whose answers depend on the weights it holds: the step named by the
    directory it last loaded answers ``right[step]`` of the problems correctly."""

    max_concurrency = 1

    def __init__(self, tokenizer, truths: list[str], right: dict[str, int]) -> None:
        self.tokenizer, self.truths, self.right = tokenizer, truths, right
        self.loaded: list[str] = []
        self.problem = 0

    async def load_weights(self, model_dir: Path) -> None:
        self.loaded.append(model_dir.name)
        self.problem = 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        step = self.loaded[-1] if self.loaded else "first"
        index = self.problem
        self.problem += 1
        answer = self.truths[index] if index < self.right[step] else "-1"
        text = f"\\boxed{{{answer}}}" + self.tokenizer.eos_token
        return TokenOutput(token_ids=self.tokenizer.encode(text, add_special_tokens=False))

    def close(self) -> None:
        pass


@pytest.fixture
def problems(data_dir: Path):  # noqa: F811
    return load_problems(datasets(data_dir, "aime_2024")["aime_2024"])


def test_each_step_is_scored_with_its_own_weights_until_stop(
    problems, local_endpoint: str, tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path
):
    truths = [p.ground_truth for p in problems]
    steps = [(100, tiny_model_dir), (200, tmp_path / "s200"), (300, tmp_path / "s300")]
    backend = StepBackend(tiny_tokenizer, truths, {"first": 0, "s200": 1, "s300": 2})
    cfg = EvalConfig(n=1, max_response_tokens=64, max_concurrency=1)
    acc = score_steps(steps, problems, cfg, local_endpoint, backend)
    assert acc == {100: 0.0, 200: 0.5, 300: 1.0}
    assert backend.loaded == ["s200", "s300"]  # the first step's weights came with the engine

    backend = StepBackend(tiny_tokenizer, truths, {"first": 0, "s200": 1, "s300": 2})
    acc = score_steps(steps, problems, cfg, local_endpoint, backend, stop=lambda a: a > 0.25)
    assert acc == {100: 0.0, 200: 0.5} and backend.loaded == ["s200"]


def test_no_steps_is_an_error(problems):
    with pytest.raises(ValueError, match="no checkpoints"):
        score_steps([], problems, EvalConfig(n=1), "http://127.0.0.1:1", "hf")


def test_hf_backend_swaps_in_another_checkpoints_weights(tiny_model_dir: Path, tmp_path: Path):
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM

    from recipe.retool.eval.backends import HFBackend

    other = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.save_pretrained(tmp_path / "other")
    backend = HFBackend(tiny_model_dir, None, max_new_tokens=4)
    asyncio.run(backend.load_weights(tmp_path / "other"))
    loaded = dict(backend.server.model.named_parameters())
    for name, p in other.named_parameters():
        assert torch.equal(loaded[name], p), name


@pytest.mark.gpu
def test_vllm_backend_swaps_weights_in_place(vllm_model_dir: Path, tmp_path: Path):
    """Greedy tokens follow the weights loaded: A, then B (different), then A again (same)."""
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.retool.eval.backends import VLLMBackend

    other = AutoModelForCausalLM.from_pretrained(str(vllm_model_dir))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.0)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(str(vllm_model_dir)).save_pretrained(tmp_path / "other")
    params = {"temperature": 0.0, "max_tokens": 16}

    async def generate_three() -> list[list[int]]:
        backend = VLLMBackend(
            vllm_model_dir, max_model_len=256, gpu_memory_utilization=0.2, enforce_eager=True
        )
        out = []
        try:
            for weights in (None, tmp_path / "other", vllm_model_dir):
                if weights is not None:
                    await backend.load_weights(weights)
                result = await backend.generate("r", prompt_ids=[1, 2, 3], sampling_params=params)
                out.append(result.token_ids)
        finally:
            backend.close()
        return out

    first, swapped, back = asyncio.run(generate_three())
    assert swapped != first and back == first


class ToolCallingBackend(StepBackend):
    """Every turn calls the tool (no answer), so each sample's calls reach the sandbox."""

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        from tests.recipe.eval.test_evaluate import call

        text = call("print(1)") + self.tokenizer.eos_token
        return TokenOutput(token_ids=self.tokenizer.encode(text, add_special_tokens=False))


def test_a_step_whose_tool_calls_fail_stops_the_sweep(
    problems, tiny_model_dir: Path, tiny_tokenizer, monkeypatch
):
    """The sweep keeps evaluation's checks: scores without a working tool are refused in one
    line (here the sandbox's port is closed after the start-up check)."""
    from recipe.retool.eval import sweep
    from recipe.retool.eval.config import EvalError

    monkeypatch.setattr(sweep, "check_sandbox", lambda url: None)
    backend = ToolCallingBackend(tiny_tokenizer, [], {"first": 0})
    cfg = EvalConfig(n=1, max_response_tokens=256, max_assistant_turns=2, max_concurrency=1,
                     tool_timeout_s=2.0)  # fmt: skip
    with pytest.raises(EvalError, match=r"failed to run 2/2 tool calls .*\(scoring step 100\)"):
        score_steps([(100, tiny_model_dir)], problems, cfg, "http://127.0.0.1:9/run_code", backend)
