"""``make local-smoke``: the whole pipeline end to end on one CPU machine, in a few minutes.

Every stage runs the production code; only *where* differs (see cpu_compat.py for what is
CPU-only). Output lands in ``./runs/<timestamp>/`` laid out exactly like the Modal volumes:

1. model    - the tiny random-init Qwen2 + Qwen2.5-format tokenizer (tiny_model.py)
2. prep     - the real prep code on shipped samples in the hub datasets' exact schemas
3. sandbox  - the local sandbox service (or the one at SANDBOX_FUSION_ENDPOINT), checked
              with ``print(2+2)``
4. sft      - verl's SFT trainer through ``run_sft`` (the code Modal's ``train`` runs)
5. dapo     - the latest SFT checkpoint found by the code ``train_dapo`` uses; the full DAPO
              config composed against verl; two real main_ppo steps (vLLM rollouts on a GPU,
              the hf_cpu rollout of rollout_replica_cpu.py on a CPU), reported from verl's
              metrics; plus one scripted tool-call rollout through verl's tool agent loop, which
              proves the tool path (the tiny model rarely writes a well-formed call)
6. eval     - AIME-format evaluation of the SFT checkpoint with the evaluation code

It prints one summary table and exits non-zero if any stage failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from recipe.retool.core import paths
from recipe.retool.core.constants import TOOL_NAME
from recipe.retool.core.paths import resolve_sft_checkpoint
from recipe.retool.core.request import LaunchRequest
from recipe.retool.core.topology import Topology
from recipe.retool.launch.commands import dapo_overrides
from recipe.retool.launch.validation import validate
from recipe.retool.records import run_metrics
from recipe.retool.stages.dapo import run_dapo
from recipe.retool.stages.sft import run_sft

REPO_ROOT = Path(__file__).resolve().parents[3]
TINY_MODEL_ID = "local/tiny-qwen2"
# Small SFT settings for a 2-core laptop; everything else comes from config/sft.yaml.
# Real main_ppo steps with the tiny model on one GPU or the CPU: the production DAPO config with
# only sizes scaled down.
SMOKE_DAPO = LaunchRequest("dapo", experiment="smoke", overrides=(
    "actor_rollout_ref.rollout.n=2",
    "actor_rollout_ref.rollout.enforce_eager=true",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=2048",
    "data.train_batch_size=2",
    "data.max_prompt_length=512",
    "data.max_response_length=256",
    "reward.reward_kwargs.max_resp_len=256",
    "reward.reward_kwargs.overlong_buffer_cfg.len=64",
    "trainer.total_training_steps=2",
    "trainer.total_epochs=100",  # 3 rows at batch 2: the step count, not the data, ends the run
    "algorithm.filter_groups.max_num_gen_batches=2",  # a barely trained model's groups score alike
    "trainer.val_before_train=False",
    "actor_rollout_ref.rollout.val_kwargs.n=1",  # the last step validates: one answer a problem
    "trainer.logger=[console,file]",
))  # fmt: skip
SMOKE_SFT = LaunchRequest("sft", experiment="smoke", overrides=(
    "data.max_length=1024",
    "data.train_batch_size=4",
    "data.micro_batch_size_per_gpu=2",
    "data.max_token_len_per_gpu=2048",
    "trainer.total_epochs=1",
    "trainer.logger=[console]",
))  # fmt: skip


@dataclass
class StageReport:
    name: str
    status: str = "skipped"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


@contextlib.contextmanager
def sandbox_server(allow_insecure: bool) -> Iterator[str]:
    """Start ``python -m sandbox serve`` on a free port; yield its /run_code URL.

    ``allow_insecure`` (the default for a non-root user): as root that allows a mode weaker than
    bwrap; as any other user the one mode left is ``bwrap-userns``, which ``auto`` never takes
    (it shares one /tmp between calls: development only), so it is named."""
    from sandbox.local import ServerDidNotStart, sandbox_service

    extra = ["--log-level", "warning"]
    if allow_insecure:
        extra += ["--allow-insecure"] + (["--isolation", "bwrap-userns"] if os.geteuid() else [])
    try:
        with sandbox_service(*extra) as base:
            yield f"{base}/run_code"
    except ServerDidNotStart as exc:
        hint = "" if os.geteuid() == 0 else " (not root: try --allow-insecure)"
        raise RuntimeError(f"the sandbox did not start: {exc}{hint}") from None


class Smoke:
    """Runs the stages in order against one ``runs/<ts>`` root, recording a report per stage."""

    def __init__(self, root: Path, *, allow_insecure: bool) -> None:
        self.root = root
        self.layout = paths.Layout.local(root)
        self.allow_insecure = allow_insecure
        self.reports: list[StageReport] = []
        self.sandbox_url = ""

    def stage(self, name: str, fn: Callable[[StageReport], None]) -> bool:
        report = StageReport(name)
        self.reports.append(report)
        _banner(f"[{len(self.reports)}] {name}")
        start = time.time()
        try:
            fn(report)
            report.status = "ok"
        except Exception as exc:
            report.status = "FAILED"
            report.notes.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            traceback.print_exc()
        report.seconds = time.time() - start
        return report.status == "ok"

    # -- stages -------------------------------------------------------------------------------

    def build_model(self, report: StageReport) -> None:
        from recipe.retool.data.tiny_model import build

        target = self.layout.model_dir(TINY_MODEL_ID)
        build(target)
        report.notes.append(f"tiny Qwen2 at {target.relative_to(self.root)}")

    def prep(self, report: StageReport) -> None:
        from recipe.retool.data import prep
        from recipe.retool.local import samples

        sources = samples.write_sources(
            self.root / "sources", retool=samples.retool_table(smoke_traces(16))
        )
        summaries = prep.prepare(
            self.layout.data,
            source_dir=sources,
            on_error="skip",
            tokenizer=self.layout.model_dir(TINY_MODEL_ID),
            sft_max_length=1024,
        )
        for name, summary in summaries.items():
            report.notes.append(f"{name}: {summary.rows_in}→{summary.rows_out}")

    def sft(self, report: StageReport) -> None:
        topo = Topology(gpus_per_node=1, device="cpu")
        result = run_sft(
            self.layout,
            topo,
            SMOKE_SFT,
            model_path=self.layout.model_dir(TINY_MODEL_ID),
        )
        if result.returncode != 0 or result.checkpoint is None:
            raise RuntimeError(f"SFT exited with {result.returncode}; see the log above")
        report.notes.append(f"global_step_{result.checkpoint.step} saved with HF weights")

    def dapo(self, report: StageReport) -> None:
        start_from = resolve_sft_checkpoint(self.layout, None)  # what train_dapo uses
        report.notes.append(f"from {start_from.relative_to(self.root)}")
        topo = Topology(gpus_per_node=8)
        overrides = dapo_overrides(self.layout, "smoke", start_from, topo)
        validate("dapo", overrides, topo)
        report.notes.append(f"DAPO config composed ({len(overrides)} overrides, 8-GPU layout)")
        where = Topology(gpus_per_node=1, device="cuda" if _gpu_rollout_available() else "cpu")
        result = run_dapo(self.layout, where, SMOKE_DAPO, sandbox_url=self.sandbox_url)
        logged = run_metrics.read_run(self.layout.experiment_dir("dapo", "smoke"))
        report.notes.append(run_metrics.describe(run_metrics.summarize(logged)))
        if result.returncode != 0:
            raise RuntimeError(f"main_ppo exited with {result.returncode}")
        scripted = asyncio.run(self._scripted_tool_rollout(start_from))
        if scripted < 1.0:
            raise RuntimeError(f"scripted tool-call rollout scored {scripted}, expected +1")
        report.notes.append("scripted tool-call rollout: code ran in the sandbox, reward +1")

    async def _scripted_tool_rollout(self, model_dir: Path) -> float:
        """One rollout through verl's tool agent loop with a scripted policy that calls the tool:
        hermes parser -> our tool -> sandbox -> tool response -> reward, end to end."""
        import json

        import pandas as pd
        from transformers import AutoTokenizer

        from recipe.retool.eval.agent_loop import run_tool_agent, score_rollout
        from recipe.retool.local.scripted_server import ScriptedServer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        first = pd.read_parquet(self.layout.rl_file("train")).iloc[0]
        truth = first["reward_model"]["ground_truth"]
        call = {"name": TOOL_NAME, "arguments": {"code": f"print({truth!r})"}}
        script = [
            f"Let me check with Python.\n<tool_call>\n{json.dumps(call)}\n</tool_call>",
            f"The interpreter confirms it. \\boxed{{{truth}}}",
        ]
        messages = [dict(m) for m in first["prompt"]]
        scripted = ScriptedServer(script, tokenizer)
        output = await run_tool_agent(messages, server=scripted, tokenizer=tokenizer)
        response = tokenizer.decode(output.response_ids)
        if f"<tool_response>\n{truth}" not in response:
            raise RuntimeError("the sandbox's output did not reach the tool response")
        return float(score_rollout(output, tokenizer, truth)["score"])

    def evaluate(self, report: StageReport) -> None:
        """The evaluation code, on the SFT checkpoint, with settings small enough for a CPU."""
        from recipe.retool.eval.checkpoints import eval_dir, report_dir, resolve_checkpoint
        from recipe.retool.eval.config import EvalConfig
        from recipe.retool.eval.runner import evaluate_checkpoint

        ref = resolve_checkpoint("latest", self.layout)  # what `make eval` resolves on Modal
        datasets = {n: self.layout.rl_file(n) for n in paths.EVAL_SETS}
        cfg = EvalConfig(n=2, max_response_tokens=48, max_assistant_turns=2, max_concurrency=1)
        out = report_dir(eval_dir(self.layout, ref.label), force=True)  # a re-run keeps the old
        summary = evaluate_checkpoint(
            ref.path, datasets, out, cfg, self.sandbox_url, "hf", checkpoint=ref
        )
        scores = ", ".join(
            f"{name} mean@2 {overall['mean@k']:.2f}"
            for name, overall in summary["datasets"].items()
        )
        report.notes.append(f"{ref.label}: {scores}; report {out.relative_to(self.root)}")

    # -- driver ----------------------------------------------------------------------------------

    def run(self) -> int:
        ok = self.stage("model", self.build_model) and self.stage("prep", self.prep)
        if ok:
            with contextlib.ExitStack() as stack:
                sandbox_ok = self.stage("sandbox", lambda r: self._start_sandbox(stack, r))
                if self.stage("sft", self.sft) and sandbox_ok:
                    self.stage("dapo", self.dapo)
                    self.stage("eval", self.evaluate)
        print(self.summary(), flush=True)
        return 0 if all(r.status == "ok" for r in self.reports) else 1

    def _start_sandbox(self, stack: contextlib.ExitStack, report: StageReport) -> None:
        """Use the sandbox at SANDBOX_FUSION_ENDPOINT (e.g. compose's) or start a local one."""
        from sandbox.client import SandboxClient

        external = os.environ.get("SANDBOX_FUSION_ENDPOINT")
        if external:
            self.sandbox_url = external
            report.notes.append(f"using {external}")
        else:
            self.sandbox_url = stack.enter_context(sandbox_server(self.allow_insecure))
            os.environ["SANDBOX_FUSION_ENDPOINT"] = self.sandbox_url  # read by the tool config
        result = SandboxClient(self.sandbox_url, max_retries=1).run_code_sync("print(2+2)")
        if result.stdout.strip() != "4":
            raise RuntimeError(f"print(2+2) gave {result.status}: {result.stderr[-200:]}")
        report.notes.append(f"print(2+2) -> 4 in {result.latency_s * 1000:.0f} ms")

    def summary(self) -> str:
        lines = ["", f"local smoke: {self.root}", f"{'stage':<8} {'status':<8} {'time':>7}  notes"]
        for r in self.reports:
            lines.append(f"{r.name:<8} {r.status:<8} {r.seconds:>6.1f}s  {'; '.join(r.notes)}")
        return "\n".join(lines)


def smoke_traces(n: int) -> list[tuple[str, str]]:
    """``n`` well-formed ReTool-SFT traces (question, assistant text) with a code call each."""
    from recipe.retool.local.samples import code, interp

    traces = []
    for i in range(n):
        answer = (i + 3) ** 2
        body = (
            f"Square {i + 3} with Python.\n\n"
            + code(f"print({i + 3} ** 2)")
            + "\n"
            + interp(str(answer))
            + f"\n\nSo the answer is {answer}.\n\n<answer>\n\\boxed{{{answer}}}\n</answer>"
        )
        traces.append((f"What is {i + 3} squared?", body))
    return traces


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _gpu_rollout_available() -> bool:
    import importlib.util

    return _gpu_count() > 0 and importlib.util.find_spec("vllm") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="output root (default: runs/<timestamp>)")
    parser.add_argument(
        "--allow-insecure",
        action="store_true",
        default=os.geteuid() != 0,
        help="let the sandbox run without per-run uids (default when not root)",
    )
    args = parser.parse_args(argv)
    root = args.root or REPO_ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there, or no permission
        print(f"error: --root {root} cannot be a directory: {exc.strerror}", file=sys.stderr)
        return 2
    return Smoke(root.resolve(), allow_insecure=args.allow_insecure).run()


if __name__ == "__main__":
    sys.exit(main())
