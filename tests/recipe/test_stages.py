"""Stage functions on temporary directories, with a fake runner or the real CPU trainer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoModelForCausalLM

from recipe.retool import stages
from recipe.retool.core.constants import RAY_TOKEN_ENV, TOOL_SCHEMA
from recipe.retool.core.paths import (
    CheckpointNotFound,
    Layout,
    Origin,
    read_checkpoint_info,
    resolve_sft_checkpoint,
)
from recipe.retool.core.request import LaunchError, LaunchRequest, parse
from recipe.retool.core.topology import Topology
from recipe.retool.records import run_metrics
from recipe.retool.records.tracking import check_credentials, default_experiment
from recipe.retool.stages import record
from recipe.retool.stages.checkpoints import (
    WeightsExist,
    describe_checkpoints,
    download_model,
    merge_checkpoint,
)
from recipe.retool.stages.dapo import dapo_env, run_dapo
from recipe.retool.stages.ray_cluster import join_ray_cluster
from recipe.retool.stages.record import record_run
from recipe.retool.stages.sft import run_sft
from recipe.retool.verl_plugins.varlen_attention import NAME
from tests.recipe.test_paths import make_step, mark_tracked

CPU = Topology(gpus_per_node=1, device="cpu")
TOOLS = [TOOL_SCHEMA]


def sft_rows(n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        call = {
            "type": "function",
            "function": {"name": "code_interpreter", "arguments": {"code": f"print({i}+2)"}},
        }
        messages = [
            {"role": "user", "content": f"What is {i}+2?"},
            {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]},
            {"role": "tool", "content": str(i + 2)},
            {"role": "assistant", "content": f"The answer is \\boxed{{{i + 2}}}."},
        ]  # fmt: skip
        rows.append({"messages": messages, "tools": TOOLS})
    return pd.DataFrame(rows)


@pytest.fixture
def layout(tmp_path: Path, tiny_model_dir: Path) -> Layout:
    layout = Layout.local(tmp_path)
    layout.sft_train_file().parent.mkdir(parents=True)
    sft_rows(8).to_parquet(layout.sft_train_file())
    return layout


class FakeRunner:
    """Records the command and writes what verl would: one complete step."""

    def __init__(self, layout: Layout, stage: str, returncode: int = 0) -> None:
        self.layout, self.stage, self.returncode = layout, stage, returncode
        self.commands: list[list[str]] = []
        self.envs: list[dict[str, str]] = []

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        self.commands.append(list(command))
        self.envs.append(env)
        exp = next(a.split("=", 1)[1] for a in command if a.startswith("trainer.experiment_name="))
        make_step(self.layout, self.stage, exp, 7)
        mark_tracked(self.layout, self.stage, exp, 7)
        return self.returncode


def test_run_sft_validates_runs_and_records_checkpoint_info(layout: Layout, tiny_model_dir) -> None:
    runner = FakeRunner(layout, "sft")
    result = run_sft(layout, Topology(gpus_per_node=2), LaunchRequest("sft", experiment="a"),
                            model_path=tiny_model_dir, runner=runner)  # fmt: skip
    assert result.returncode == 0 and result.checkpoint.step == 7
    assert runner.envs[0]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
    info = read_checkpoint_info(layout, "sft", "a")
    assert info.step == 7 and info.path.endswith("global_step_7/huggingface")
    assert info.base_model == str(tiny_model_dir)


def test_cost_line_only_for_the_configured_model_and_data(
    layout: Layout, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The estimate is for Qwen2.5-7B on ReTool-SFT; a small model's run must not print "$47"."""
    two_gpus = Topology(gpus_per_node=2)
    run_sft(
        layout,
        two_gpus,
        LaunchRequest("sft", experiment="small"),
        model_path=tiny_model_dir,
        runner=FakeRunner(layout, "sft"),
    )
    assert "GPU-h" not in capsys.readouterr().out
    shutil.copytree(tiny_model_dir, layout.model_dir())
    run_sft(
        layout, two_gpus, LaunchRequest("sft", experiment="big"), runner=FakeRunner(layout, "sft")
    )
    assert "sft: ~" in capsys.readouterr().out
    dapo = FakeRunner(layout, "dapo")
    for start, line in (("small", False), ("big", True)):
        args = [f"--sft-checkpoint={start}", f"--experiment-name=rl-{start}"]
        run_dapo(layout, two_gpus, parse("dapo", args), sandbox_url="http://sb", runner=dapo)
        assert ("dapo: ~" in capsys.readouterr().out) is line, start


class LoggingRunner:
    """verl with its file logger: each attempt writes its ``(step, metrics)`` rows where
    VERL_FILE_LOGGER_PATH points and saves a complete checkpoint of its last step."""

    def __init__(self, layout: Layout, stage: str, attempts: list[list[tuple[int, dict]]],
                 returncodes: list[int]) -> None:  # fmt: skip
        self.layout, self.stage = layout, stage
        self.attempts, self.returncodes = list(attempts), list(returncodes)
        self.envs: list[dict[str, str]] = []

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        self.envs.append(env)
        rows = self.attempts.pop(0)
        lines = [json.dumps({"step": step, "data": data}) for step, data in rows]
        Path(env["VERL_FILE_LOGGER_PATH"]).write_text("\n".join(lines) + "\n")
        exp = next(a.split("=", 1)[1] for a in command if a.startswith("trainer.experiment_name="))
        make_step(self.layout, self.stage, exp, rows[-1][0])
        mark_tracked(self.layout, self.stage, exp, rows[-1][0])
        return self.returncodes.pop(0)


def sft_step(loss: float, tokens: int = 100) -> dict:
    return {"train/loss": loss, "train/global_tokens": tokens, "train/lr": 1e-5}


def test_checkpoint_info_records_the_sft_runs_logged_metrics_over_attempts(
    layout: Layout, tiny_model_dir, attempt_clock
) -> None:
    """A killed attempt logged steps 1-3, the retry resumed from step 2 and logged 3-4."""
    attempts = [
        [(1, sft_step(2.0)), (2, sft_step(1.5)), (3, sft_step(1.4))],
        [(3, sft_step(1.2)), (4, sft_step(0.9)), (4, {"val/loss": 1.1})],
    ]
    runner = LoggingRunner(layout, "sft", attempts, returncodes=[137, 0])
    args = ["--experiment-name=m", "data.max_length=512", "trainer.logger=[console,file]"]
    for _ in range(2):
        run_sft(layout, CPU, parse("sft", args), model_path=tiny_model_dir, runner=runner)
    log_dir = layout.experiment_dir("sft", "m") / "metrics"
    assert [Path(env["VERL_FILE_LOGGER_PATH"]).parent for env in runner.envs] == [log_dir] * 2
    assert len(set(env["VERL_FILE_LOGGER_PATH"] for env in runner.envs)) == 2  # one per attempt
    metrics = read_checkpoint_info(layout, "sft", "m").metrics
    assert metrics == {"steps": 4, "train_loss": 0.9, "tokens": 400, "val_loss": 1.1}


def test_checkpoint_info_records_the_dapo_runs_reward_and_validation(
    layout: Layout, attempt_clock
) -> None:
    make_step(layout, "sft", "s1", 62)
    mark_tracked(layout, "sft", "s1", 62)
    val = "val-core/aime_2024/acc/mean@4"
    rows = [(0, {val: 0.1}), (1, {"critic/score/mean": -0.5}),
            (2, {"critic/score/mean": 0.25, val: 0.3})]  # fmt: skip
    runner = LoggingRunner(layout, "dapo", [rows], returncodes=[0])
    run_dapo(layout, Topology(gpus_per_node=4), LaunchRequest("dapo", experiment="d"),
                    sandbox_url="http://sb/run_code", runner=runner)  # fmt: skip
    assert read_checkpoint_info(layout, "dapo", "d").metrics == {
        "steps": 2, "reward_mean": 0.25, "val_steps": [0, 2], "val_acc": [0.1, 0.3],
    }  # fmt: skip


def test_checkpoint_info_says_when_no_metrics_were_logged_or_readable(layout, tiny_model_dir):
    args = ["--experiment-name=quiet", "trainer.logger=[console]"]
    run_sft(
        layout, CPU, parse("sft", args), model_path=tiny_model_dir, runner=FakeRunner(layout, "sft")
    )
    assert read_checkpoint_info(layout, "sft", "quiet").metrics == {}
    runner = LoggingRunner(layout, "sft", [[(1, sft_step(1.0))]], returncodes=[0])
    run_sft(layout, CPU, LaunchRequest("sft", experiment="torn"), model_path=tiny_model_dir,
                   runner=runner)  # fmt: skip
    (layout.experiment_dir("sft", "torn") / "metrics" / "torn.jsonl").write_text('{"step": 2, "da')
    record_run(layout, "sft", "torn", Origin("base", "data"), 0)
    assert "unreadable" in read_checkpoint_info(layout, "sft", "torn").metrics


def test_run_sft_bad_override_fails_before_running(layout: Layout, tiny_model_dir) -> None:
    runner = FakeRunner(layout, "sft")
    with pytest.raises(LaunchError, match="unknown key"):
        run_sft(
            layout,
            CPU,
            parse("sft", ["trainer.epochs=1"]),
            model_path=tiny_model_dir,
            runner=runner,
        )
    assert runner.commands == []


def test_run_sft_without_data_or_model_says_which_stage_to_run(tmp_path: Path) -> None:
    layout = Layout.local(tmp_path)
    with pytest.raises(LaunchError, match="run prep_dataset first"):
        run_sft(layout, CPU, LaunchRequest("sft"), runner=FakeRunner(layout, "sft"))
    layout.sft_train_file().parent.mkdir(parents=True)
    layout.sft_train_file().write_bytes(b"")
    with pytest.raises(LaunchError, match="run download_model first"):
        run_sft(layout, CPU, LaunchRequest("sft"), runner=FakeRunner(layout, "sft"))


def test_run_dapo_starts_from_latest_sft_and_passes_the_sandbox(layout: Layout) -> None:
    make_step(layout, "sft", "s1", 62)
    mark_tracked(layout, "sft", "s1", 62)
    runner = FakeRunner(layout, "dapo")
    topo = Topology(gpus_per_node=4)
    result = run_dapo(layout, topo, LaunchRequest("dapo", experiment="d"), sandbox_url="http://sb/run_code",
                             runner=runner)  # fmt: skip
    command = runner.commands[0]
    expected = layout.experiment_dir("sft", "s1") / "global_step_62" / "huggingface"
    assert f"actor_rollout_ref.model.path={expected}" in command
    assert runner.envs[0]["SANDBOX_FUSION_ENDPOINT"] == "http://sb/run_code"
    assert result.checkpoint.hf_dir.name == "huggingface"
    assert read_checkpoint_info(layout, "dapo", "d").base_model == str(expected)


def test_run_dapo_without_sft_checkpoint_is_a_clear_error(layout: Layout) -> None:
    with pytest.raises(CheckpointNotFound, match="no complete sft checkpoint"):
        run_dapo(layout, Topology(gpus_per_node=4), LaunchRequest("dapo"), sandbox_url="x",
                        runner=FakeRunner(layout, "dapo"))  # fmt: skip


def test_download_model_is_skipped_once_complete(tmp_path: Path) -> None:
    layout = Layout.local(tmp_path)
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        (Path(kwargs["local_dir"]) / "config.json").write_text("{}")
        return kwargs["local_dir"]

    path = download_model(layout, "org/m", "rev1", downloader=fake_download)
    assert path == layout.model_dir("org/m") and len(calls) == 1
    assert calls[0]["revision"] == "rev1" and calls[0]["repo_id"] == "org/m"
    download_model(layout, "org/m", "rev1", downloader=fake_download)
    assert len(calls) == 1
    download_model(layout, "org/m", "rev2", downloader=fake_download)
    assert len(calls) == 2


def test_check_credentials_names_missing_keys_without_values() -> None:
    notes = check_credentials({"WANDB_API_KEY": "secret-value"})
    assert any("HF_TOKEN" in n for n in notes)
    assert not any("secret-value" in n for n in notes)
    assert check_credentials({"HF_TOKEN": "x"}) == []  # wandb's key: tracking.check_wandb


def test_describe_checkpoints_marks_partial_and_missing_info(layout: Layout) -> None:
    assert "no checkpoints yet" in describe_checkpoints(layout)
    make_step(layout, "sft", "run", 1)
    mark_tracked(layout, "sft", "run", 1)
    make_step(layout, "sft", "run", 2)
    table = describe_checkpoints(layout)
    assert "complete" in table and "partial" in table
    assert "checkpoint_info.json missing" in table


@pytest.mark.slow
def test_cpu_sft_runs_verl_and_final_checkpoint_loads_with_from_pretrained(
    layout: Layout, tiny_model_dir: Path
) -> None:
    args = [
        "--experiment-name=cpu",
        "data.max_length=512",
        "data.train_batch_size=4",
        "data.micro_batch_size_per_gpu=2",
        "data.max_token_len_per_gpu=1024",
        "trainer.total_epochs=1",
        "trainer.logger=[console,file]",
    ]
    result = run_sft(layout, CPU, parse("sft", args), model_path=tiny_model_dir)
    assert result.returncode == 0
    assert result.checkpoint is not None and result.checkpoint.step == 2  # 8 rows / batch 4
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint.hf_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    changed = [
        name
        for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True)
        if not (p == q).all()
    ]
    assert changed, "SFT steps should have updated the weights"
    info = read_checkpoint_info(layout, "sft", "cpu")
    assert info.step == 2
    assert info.metrics["steps"] == 2 and info.metrics["tokens"] > 0  # what verl logged
    assert info.metrics["train_loss"] > 0

    # merge_checkpoint rebuilds the same weights from the FSDP shards with verl's model merger
    # (what users run for steps saved without hf_model, e.g. by an older config).
    (result.checkpoint.hf_dir / "model.safetensors").unlink()
    merged = merge_checkpoint(layout, "sft", "cpu", 2)
    remerged = AutoModelForCausalLM.from_pretrained(merged)
    for (name, p), (_, q) in zip(
        model.named_parameters(), remerged.named_parameters(), strict=True
    ):
        assert (p == q).all(), name
    with pytest.raises(WeightsExist, match="pass --force"):  # the real merger's too
        merge_checkpoint(layout, "sft", "cpu", 2)
    with pytest.raises(CheckpointNotFound, match=r"fsdp_config\.json"):
        merge_checkpoint(layout, "sft", "cpu", 99)


@pytest.mark.gpu
@pytest.mark.timeout(1800)
def test_one_dapo_step_of_main_ppo_on_a_small_model(
    tmp_path: Path, vllm_model_dir: Path, local_endpoint: str
) -> None:
    """verl's main_ppo for real (Ray, vLLM rollouts, the tool in the local sandbox, the reward),
    with the learning curve's one-GPU sizes and model, one step."""
    from recipe.retool.data.synthetic import SyntheticSizes, write_dataset
    from recipe.retool.workflows.learning_curve import proof as learning_curve

    layout = Layout.local(tmp_path)
    files = write_dataset(tmp_path / "synthetic", SyntheticSizes())
    settings = learning_curve.CurveSettings(dapo_steps=1, test_freq=1, val_n=1)
    arm = learning_curve.Arm("seed1", 1, control=False)
    request = learning_curve.dapo_request(files, settings, vllm_model_dir, arm, tmp_path / "val")
    result = run_dapo(layout, Topology(gpus_per_node=1), request,
                      sandbox_url=local_endpoint + "/run_code")  # fmt: skip
    assert result.returncode == 0
    assert result.checkpoint is not None and result.checkpoint.step == 1
    info = read_checkpoint_info(layout, "dapo", result.experiment)
    assert info.metrics["steps"] == 1 and isinstance(info.metrics["reward_mean"], float)
    assert info.metrics["val_acc"]  # validated before and after the step


def test_multinode_needs_a_shared_experiment_name_and_only_rank0_records(
    layout: Layout, tiny_model_dir
) -> None:
    two_nodes = Topology(gpus_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.5")
    with pytest.raises(LaunchError, match="--experiment-name"):
        run_sft(
            layout,
            two_nodes,
            LaunchRequest("sft"),
            model_path=tiny_model_dir,
            runner=FakeRunner(layout, "sft"),
        )
    runner = FakeRunner(layout, "sft")
    result = run_sft(
        layout,
        two_nodes,
        LaunchRequest("sft", experiment="big"),
        model_path=tiny_model_dir,
        runner=runner,
    )
    assert "--node_rank=1" in runner.commands[0] and "--master_addr=10.0.0.5" in runner.commands[0]
    assert result.checkpoint is None and read_checkpoint_info(layout, "sft", "big") is None


def test_multinode_dapo_joins_the_ray_cluster(layout: Layout) -> None:
    make_step(layout, "sft", "s1", 1)
    mark_tracked(layout, "sft", "s1", 1)
    runner = FakeRunner(layout, "dapo")
    head = Topology(gpus_per_node=8, nnodes=2, node_rank=0, master_addr="10.0.0.5")
    run_dapo(layout, head, LaunchRequest("dapo", experiment="d"), sandbox_url="u", runner=runner)
    assert runner.envs[0]["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert runner.envs[0]["RAY_AUTH_MODE"] == "token"
    assert "trainer.nnodes=2" in runner.commands[0]
    # The Ray actor that logs inherits its node's `ray start` env: the path goes in the job's.
    logger_path = runner.envs[0]["VERL_FILE_LOGGER_PATH"]
    job_env = f"++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={logger_path}"
    assert job_env in runner.commands[0]


def test_failed_run_keeps_its_checkpoint_but_writes_no_done_marker(layout, tiny_model_dir) -> None:
    runner = FakeRunner(layout, "sft", returncode=1)
    result = run_sft(
        layout,
        CPU,
        LaunchRequest("sft", experiment="crash"),
        model_path=tiny_model_dir,
        runner=runner,
    )
    assert result.returncode == 1 and result.checkpoint.step == 7
    assert read_checkpoint_info(layout, "sft", "crash") is None


class VarlenConfigRunner(FakeRunner):
    """Writes the checkpoint's HF config as verl does after training with the varlen plugin."""

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        code = super().__call__(command, env)
        for config in self.layout.stage_root(self.stage).glob("*/global_step_7/**/config.json"):
            config.write_text(json.dumps({"attn_implementation": NAME, "hidden_size": 8}))
        return code


@pytest.mark.parametrize(("stage", "returncode"), [("sft", 0), ("sft", 1), ("dapo", 0)])
def test_checkpoints_load_without_the_attention_plugin(layout, tiny_model_dir, stage, returncode):
    """A GPU run's checkpoint names the project's varlen attention in config.json, which plain
    transformers refuses (the CPU evaluation of a GPU smoke run failed on it): every stage run,
    finished or not, leaves its checkpoints' configs without it."""
    runner = VarlenConfigRunner(layout, stage, returncode)
    if stage == "sft":
        run_sft(layout, CPU, LaunchRequest("sft", experiment="v"), model_path=tiny_model_dir,
                       runner=runner)  # fmt: skip
    else:
        run_sft(layout, CPU, LaunchRequest("sft", experiment="s"), model_path=tiny_model_dir,
                       runner=FakeRunner(layout, "sft"))  # fmt: skip
        run_dapo(layout, CPU, LaunchRequest("dapo", experiment="v"), sandbox_url="http://sb/run_code",
                        runner=runner)  # fmt: skip
    (config,) = layout.experiment_dir(stage, "v").glob("global_step_7/**/config.json")
    assert json.loads(config.read_text()) == {"hidden_size": 8}


def test_sft_checkpoint_option_takes_experiments_and_paths_but_not_weightless_steps(layout) -> None:
    make_step(layout, "sft", "s1", 62)
    mark_tracked(layout, "sft", "s1", 62)
    step = layout.experiment_dir("sft", "s1") / "global_step_62"
    assert resolve_sft_checkpoint(layout, "s1") == step / "huggingface"
    assert resolve_sft_checkpoint(layout, str(step)) == step / "huggingface"
    bare = make_step(layout, "sft", "s1", 70, weights=False)  # verl's default: config only
    with pytest.raises(CheckpointNotFound, match="merge the checkpoint first"):
        resolve_sft_checkpoint(layout, str(bare))
    with pytest.raises(CheckpointNotFound):
        resolve_sft_checkpoint(layout, "nope")


class RayRunner:
    """Fake ``ray start``: fails ``fail_first`` times (head not up yet), records env and command."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, command, env) -> int:
        self.calls.append((list(command), env))
        return 1 if len(self.calls) <= self.fail_first else 0


@pytest.fixture
def ray_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token every node of a multi-node run holds (the Modal app's per-launch secret)."""
    monkeypatch.setenv(RAY_TOKEN_ENV, "t" * 64)


def test_joining_a_ray_cluster_needs_the_shared_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without RAY_AUTH_TOKEN the nodes could not authenticate to each other (Modal containers
    share no ~/.ray): one line, before any `ray start`."""
    monkeypatch.delenv(RAY_TOKEN_ENV, raising=False)
    runner = RayRunner()
    for rank in (0, 1):
        node = Topology(gpus_per_node=8, nnodes=2, node_rank=rank, master_addr="10.0.0.5")
        with pytest.raises(LaunchError, match="needs RAY_AUTH_TOKEN, the same on every node"):
            join_ray_cluster(node, {}, runner=runner)
    assert runner.calls == []


@pytest.mark.usefixtures("ray_token")
def test_ray_head_waits_for_every_node_and_passes_the_sandbox_to_workers() -> None:
    head = Topology(gpus_per_node=8, nnodes=3, node_rank=0, master_addr="10.0.0.5")
    counts = iter([1, 2, 3])
    runner = RayRunner()
    join_ray_cluster(head, dapo_env("http://sb/run_code"), runner=runner,
                            alive_nodes=lambda env: next(counts), poll_s=0)  # fmt: skip
    ((command, env),) = runner.calls
    assert "--head" in command
    assert env["SANDBOX_FUSION_ENDPOINT"] == "http://sb/run_code"  # reaches the tool's actors
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["RAY_AUTH_MODE"] == "token"  # Ray 2.60 leaves it off for joining nodes


@pytest.mark.usefixtures("ray_token")
def test_ray_head_gives_up_when_nodes_never_join() -> None:
    head = Topology(gpus_per_node=8, nnodes=2, node_rank=0, master_addr="10.0.0.5")
    with pytest.raises(RuntimeError, match="1 of 2 nodes joined"):
        join_ray_cluster(head, {}, runner=RayRunner(), alive_nodes=lambda env: 1,
                                timeout_s=0, poll_s=0)  # fmt: skip


@pytest.mark.usefixtures("ray_token")
def test_ray_worker_retries_until_the_head_is_up() -> None:
    worker = Topology(gpus_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.5")
    listens = iter([False, False, True, True, True])  # no `ray start` before the head listens
    runner = RayRunner(fail_first=2)
    join_ray_cluster(worker, {"X": "1"}, runner=runner, poll_s=0,
                            head_listens=lambda topo: next(listens))  # fmt: skip
    assert len(runner.calls) == 3
    assert all("--address=10.0.0.5:6379" in c for c, _ in runner.calls)
    assert all(e["RAY_AUTH_MODE"] == "token" and e["X"] == "1" for _, e in runner.calls)
    with pytest.raises(RuntimeError, match="could not join"):
        join_ray_cluster(worker, {}, runner=RayRunner(fail_first=99), timeout_s=0,
                                poll_s=0, head_listens=lambda topo: True)  # fmt: skip


def test_the_default_name_follows_the_launch_not_the_clock(monkeypatch) -> None:
    clock = iter(range(1_000))
    monkeypatch.setattr(record.time, "strftime", lambda fmt: f"t{next(clock)}")
    assert default_experiment("dapo", "fc-1") == default_experiment("dapo", "fc-1")
    assert default_experiment("dapo", "fc-1") == "dapo-fc-1"
    assert default_experiment("sft") != default_experiment("sft")


class KillAfterCheckpoint:
    """Runs the real command in its own process group; the first run is SIGKILLed once verl's
    tracker file names ``step`` (a preemption right after a save), later ones run to the end.
    Records what each run printed.

    ``metrics_dir``: also wait until verl's file logger has written ``step``'s row there. verl
    logs a step's metrics after saving its checkpoint, so a kill in between loses that row for
    good (the relaunch resumes after the step); under load that window is seconds wide."""

    def __init__(
        self, tracker: Path, step: int, timeout_s: float = 300, metrics_dir: Path | None = None
    ) -> None:
        self.tracker, self.step, self.timeout_s, self.outputs = tracker, step, timeout_s, []
        self.metrics_dir = metrics_dir

    def _logged(self) -> bool:
        if self.metrics_dir is None:
            return True
        try:
            return any(step == self.step for step, _ in run_metrics.read_steps(self.metrics_dir))
        except ValueError:  # a row being written
            return False

    def __call__(self, command: Sequence[str], env: dict[str, str]) -> int:
        import contextlib
        import os
        import signal
        import subprocess
        import time

        import psutil

        merged = {**os.environ, **env, "PYTHONPATH": str(Path(stages.__file__).parents[3])}
        log = self.tracker.parent.parent / f"run{len(self.outputs)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                list(command), env=merged, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + self.timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                tracked = self.tracker.exists() and self.tracker.read_text().strip()
                if not self.outputs and tracked == str(self.step) and self._logged():
                    # the whole tree: torchrun's workers live in sessions of their own
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        with contextlib.suppress(psutil.NoSuchProcess):  # exited meanwhile
                            child.send_signal(signal.SIGKILL)
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
            code = proc.wait()
        self.outputs.append(log.read_text())
        return code


@pytest.mark.slow
def test_sft_killed_after_a_checkpoint_resumes_from_it(layout: Layout, tiny_model_dir) -> None:
    """A SIGKILL right after step 2's save; the relaunch with the same name goes on at step 3
    (model, optimizer and dataloader position from the checkpoint), loses nothing, and only the
    clean finish writes checkpoint_info.json."""
    args = [
        "--experiment-name=preempted",
        "data.max_length=512",
        "data.train_batch_size=1",  # 8 steps: the kill at step 2's save lands long before the end
        "data.micro_batch_size_per_gpu=1",
        "data.max_token_len_per_gpu=1024",
        "trainer.total_epochs=1",
        "trainer.save_freq=2",
        "trainer.logger=[console]",
    ]
    exp_dir = layout.experiment_dir("sft", "preempted")
    killer = KillAfterCheckpoint(exp_dir / "latest_checkpointed_iteration.txt", step=2)
    first = run_sft(layout, CPU, parse("sft", args), model_path=tiny_model_dir, runner=killer)
    assert first.returncode == -9 and first.checkpoint is not None and first.checkpoint.step == 2
    assert read_checkpoint_info(layout, "sft", "preempted") is None  # not done: no marker

    second = run_sft(layout, CPU, parse("sft", args), model_path=tiny_model_dir, runner=killer)
    assert second.returncode == 0 and second.checkpoint.step == 8  # 8 rows / batch 1
    resumed = killer.outputs[1]
    assert "step:3 " in resumed and "step:8 " in resumed
    assert "step:1 " not in resumed and "step:2 " not in resumed  # nothing redone
    assert (exp_dir / "global_step_2").is_dir() and (exp_dir / "global_step_8").is_dir()
    assert read_checkpoint_info(layout, "sft", "preempted").step == 8


NODE_SCRIPT = """
import sys
from pathlib import Path
from recipe.retool.core import paths
from recipe.retool.core.request import parse
from recipe.retool.core.topology import Topology
from recipe.retool.stages.sft import run_sft
root, rank, port, model, *args = sys.argv[1:]
topo = Topology(gpus_per_node=1, nnodes=2, node_rank=int(rank), master_addr="127.0.0.1",
                       master_port=int(port), device="cpu")
raise SystemExit(run_sft(paths.Layout.local(Path(root)), topo, parse("sft", args),
                                model_path=Path(model)).returncode)
"""


@pytest.mark.slow
def test_two_node_sft_on_one_machine_with_static_rendezvous(layout: Layout, tiny_model_dir) -> None:
    """Two torchrun "nodes" on localhost, joined by the arguments Modal's clustered SFT uses
    (--nnodes 2 --node_rank --master_addr --master_port): one world of 2 ranks, one checkpoint
    with both ranks' shards, and checkpoint_info.json written by node 0 only."""
    import os
    import subprocess
    import sys

    from sandbox.local import free_port

    args = [
        "--experiment-name=two-nodes",
        "data.max_length=512",
        "data.train_batch_size=4",
        "data.micro_batch_size_per_gpu=2",
        "data.max_token_len_per_gpu=1024",
        "trainer.total_epochs=1",
        "trainer.logger=[console]",
    ]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(stages.__file__).parents[3])}
    worker = subprocess.Popen(
        [sys.executable, "-c", NODE_SCRIPT, str(layout.data.parent), "1", str(port),
         str(tiny_model_dir), *args],
        env=env,
    )  # fmt: skip
    try:
        topo = Topology(gpus_per_node=1, nnodes=2, node_rank=0, master_addr="127.0.0.1",
                        master_port=port, device="cpu")  # fmt: skip
        head = run_sft(layout, topo, parse("sft", args), model_path=tiny_model_dir)
        assert worker.wait(timeout=300) == 0
    finally:
        worker.kill()
    assert head.returncode == 0 and head.checkpoint.step == 2  # 8 rows / batch 4
    shards = sorted(p.name for p in head.checkpoint.path.glob("model_world_size_2_rank_*.pt"))
    assert shards == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]
    assert read_checkpoint_info(layout, "sft", "two-nodes").step == 2


def test_a_stage_ends_in_one_line_with_its_exit_time_and_checkpoint(layout: Layout) -> None:
    from recipe.retool.stages.record import StageResult

    assert StageResult("sft", "e", 0, None, 90.0).summary() == (
        "sft e: exit 0, 1.5 min, no complete checkpoint"
    )
