"""The Modal app, checked offline: function settings via Function.info(), .local() runs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("modal")  # dev-only: absent on a GPU box with the trainer image's set

import modal

from recipe.retool import paths
from tests.recipe.test_paths import make_step, mark_tracked

REPO = Path(__file__).resolve().parents[2]
GPU_FUNCTIONS = {"train", "train_dapo"}
CPU_FUNCTIONS = {
    "prep_dataset", "download_model", "list_checkpoints", "merge_checkpoint",
    "check_sandbox_connection",
}  # fmt: skip
VOLUME_NAMES = {paths.DATA_VOLUME, paths.MODELS_VOLUME, paths.CHECKPOINTS_VOLUME}


def load_app(monkeypatch: pytest.MonkeyPatch, **env: str):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop("recipe.retool.retool_modal_sft", None)
    return importlib.import_module("recipe.retool.retool_modal_sft")


@pytest.fixture
def app_module(monkeypatch: pytest.MonkeyPatch):
    module = load_app(monkeypatch)
    yield module
    sys.modules.pop("recipe.retool.retool_modal_sft", None)


def test_app_imports_without_token_and_has_the_seed_functions(app_module) -> None:
    assert app_module.app.name == "retool-sft"
    for name in GPU_FUNCTIONS | CPU_FUNCTIONS:
        assert isinstance(getattr(app_module, name), modal.Function), name


@pytest.mark.parametrize("name", sorted(GPU_FUNCTIONS))
def test_training_functions_take_8_h100_for_a_day_with_volumes_and_secrets(
    app_module, name
) -> None:
    info = getattr(app_module, name).info()
    assert info.gpus == [("H100", 8)]
    assert info.timeout == 24 * 60 * 60
    assert {v.name for v in info.volumes.values()} == VOLUME_NAMES
    assert set(info.volumes) == {"/data", "/models", "/checkpoints"}
    assert info.secrets == ["Secret.from_dotenv()"]


@pytest.mark.parametrize("name", sorted(CPU_FUNCTIONS))
def test_utility_functions_use_no_gpu(app_module, name) -> None:
    info = getattr(app_module, name).info()
    assert info.gpus == []
    assert info.timeout <= 2 * 60 * 60


def test_gpu_count_is_a_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_app(monkeypatch, RETOOL_GPUS="2")
    try:
        assert module.train.info().gpus == [("H100", 2)]
        assert module._topology().gpus_per_node == 2
    finally:
        sys.modules.pop("recipe.retool.retool_modal_sft", None)


@pytest.mark.parametrize(
    "env", [{"RETOOL_GPUS": "abc"}, {"RETOOL_NODES": "abc"}, {"RETOOL_GPUS": "0"},
            {"RETOOL_NODES": "-1"}, {"RETOOL_GPUS": "2.5"}],
)  # fmt: skip
def test_a_bad_gpu_or_node_count_is_one_line_at_import(monkeypatch, capsys, env) -> None:
    ((name, value),) = env.items()
    try:
        with pytest.raises(SystemExit) as exc:
            load_app(monkeypatch, **env)
    finally:
        sys.modules.pop("recipe.retool.retool_modal_sft", None)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {name}={value!r} is not a whole number >= 1")


def test_an_empty_gpu_count_is_the_default(monkeypatch) -> None:
    module = load_app(monkeypatch, RETOOL_GPUS="", RETOOL_NODES=" 3 ")
    try:
        assert (module.N_GPUS, module.N_NODES) == (8, 3)
    finally:
        sys.modules.pop("recipe.retool.retool_modal_sft", None)


def test_images_are_built_from_the_compose_dockerfile(monkeypatch, dockerfile_builds) -> None:
    load_app(monkeypatch)
    sys.modules.pop("recipe.retool.retool_modal_sft", None)
    assert dockerfile_builds == [(REPO / "images" / "trainer.Dockerfile", REPO)]
    dockerfile = (REPO / "images" / "trainer.Dockerfile").read_text()
    assert "images/trainer_requirements.py trainer" in dockerfile


def test_list_checkpoints_runs_locally_on_a_temp_tree(
    app_module, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    layout = paths.Layout.local(tmp_path)
    make_step(layout, "sft", "exp", 62)
    mark_tracked(layout, "sft", "exp", 62)
    table = app_module.list_checkpoints.local()
    assert "exp" in table and "62" in table and "complete" in table
    assert "exp" in capsys.readouterr().out


def test_download_model_runs_locally_with_snapshot_download(
    app_module, tmp_path, monkeypatch
) -> None:
    import huggingface_hub

    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        (Path(kwargs["local_dir"]) / "config.json").write_text("{}")
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    app_module.download_model.local()
    assert calls[0]["repo_id"] == paths.BASE_MODEL_ID
    assert calls[0]["revision"] == paths.BASE_MODEL_REVISION
    assert calls[0]["token"] == "hf_secret_value"
    assert (tmp_path / "models" / paths.BASE_MODEL_ID / "config.json").exists()
    app_module.download_model.local()
    assert len(calls) == 1  # complete: skipped


def test_train_with_a_bad_override_exits_with_a_message_not_a_trace(
    app_module, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        app_module.train.local("trainer.totl_epochs=3")
    assert exc.value.code == 2
    assert "unknown key 'trainer.totl_epochs'" in capsys.readouterr().err


def test_train_dapo_without_sft_checkpoint_ends_without_a_retry(
    app_module, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://127.0.0.1:9/run_code")
    assert app_module.train_dapo.local() is None  # no exception: Modal retries every exception
    assert "no complete sft checkpoint" in capsys.readouterr().err


class FailingDapoRunner:
    """verl's main_ppo that saves step 5 of the experiment it is given, then dies (a timeout)."""

    def __init__(self, layout: paths.Layout) -> None:
        self.layout = layout
        self.dirs: list[str] = []

    def __call__(self, command, env) -> int:
        prefix = "trainer.default_local_dir="
        self.dirs.append(next(a.removeprefix(prefix) for a in command if a.startswith(prefix)))
        experiment = Path(self.dirs[-1]).name
        make_step(self.layout, "dapo", experiment, 5 * len(self.dirs))
        return 137


@pytest.fixture
def dapo_attempt(app_module, tmp_path, monkeypatch, attempt_clock):
    """``train_dapo.local`` as Modal runs each attempt: same function call id, a later clock."""
    from recipe.retool import stages

    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://127.0.0.1:9/run_code")
    layout = paths.Layout.local(tmp_path)
    make_step(layout, "sft", "s1", 62)
    mark_tracked(layout, "sft", "s1", 62)
    runner = FailingDapoRunner(layout)
    run_dapo = stages.run_dapo
    monkeypatch.setattr(
        stages, "run_dapo", lambda *a, **kw: run_dapo(*a, **kw | {"runner": runner})
    )
    monkeypatch.setattr(app_module.modal, "current_function_call_id", lambda: "fc-01TEST")
    return runner


def test_a_retried_dapo_attempt_resumes_the_same_experiment(app_module, dapo_attempt) -> None:
    for _ in range(2):
        with pytest.raises(SystemExit) as exc:  # a failed attempt: Modal retries it
            app_module.train_dapo.local()
        assert exc.value.code == 137
    first, second = dapo_attempt.dirs
    assert first == second and Path(first).name == "dapo-fc-01TEST"
    assert sorted(p.name for p in Path(first).glob("global_step_*")) == [
        "global_step_10",
        "global_step_5",
    ]


def test_a_config_mistake_in_train_dapo_is_not_retried(app_module, dapo_attempt, capsys) -> None:
    assert app_module.train_dapo.local("trainer.totl_epochs=3") is None
    assert "unknown key 'trainer.totl_epochs'" in capsys.readouterr().err
    assert dapo_attempt.dirs == []


def test_prep_dataset_runs_locally_on_sample_sources(app_module, tmp_path, monkeypatch) -> None:
    from recipe.retool import pipeline
    from recipe.retool.data import prep
    from recipe.retool.data.tiny_model import build_tokenizer
    from recipe.retool.launch import load_stage_config
    from recipe.retool.local import samples

    sft_max_length = load_stage_config("sft").overrides["data.max_length"]
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    layout = paths.Layout.local(tmp_path)
    build_tokenizer(1024).save_pretrained(layout.model_dir())
    sources = samples.write_sources(tmp_path / "src")
    app_module.prep_dataset.local(on_error="skip", source_dir=str(sources))
    for name in ("train", "aime_2024", "aime_2025"):
        assert layout.rl_file(name).exists()
    assert layout.sft_train_file().exists()
    assert pipeline.stage_done(layout, "exp")["prep"]  # filtered with the tokenizer: done
    assert prep.sft_length_checked(layout.data) == sft_max_length  # the tokenizer was there
    app_module.prep_dataset.local(on_error="skip", source_dir=str(sources), only="sft")


@pytest.mark.parametrize("name", ["train_multinode", "train_dapo_multinode"])
def test_multinode_functions_are_rdma_clusters_of_8_gpu_nodes(app_module, name) -> None:
    info = getattr(app_module, name).info()
    assert info.gpus == [("H100", 8)]
    assert (info.cluster_info.size, info.cluster_info.rdma) == (2, True)


def test_multinode_dapo_hands_every_node_one_ray_token_per_launch(app_module, monkeypatch) -> None:
    """Modal's containers share no ~/.ray, so the Ray nodes authenticate with RAY_AUTH_TOKEN:
    made where `modal run` runs and bound to the function as a secret, which every container
    of the cluster receives. Inside a container the app's import makes no token of its own."""
    from recipe.retool import modal_common

    assert app_module.train_dapo_multinode.info().secrets == [
        "Secret.from_dotenv()", "Secret.from_dict([RAY_AUTH_TOKEN])",
    ]  # fmt: skip
    assert app_module.train_multinode.info().secrets == ["Secret.from_dotenv()"]  # no Ray
    monkeypatch.setattr(modal_common.modal, "is_local", lambda: False)
    assert repr(modal_common.ray_cluster_secret()) == "Secret.from_dict([])"


def test_topology_comes_from_the_modal_cluster(app_module, monkeypatch) -> None:
    class Cluster:
        rank = 1
        container_ips = ("10.0.0.5", "10.0.0.6")

    monkeypatch.setattr(app_module.modal.experimental, "get_cluster_info", lambda: Cluster())
    topo = app_module._topology()
    assert (topo.nnodes, topo.node_rank, topo.master_addr, topo.world_size) == (
        2,
        1,
        "10.0.0.5",
        16,
    )


def test_evaluate_takes_one_gpu_and_reports_a_missing_checkpoint(app_module, tmp_path, monkeypatch,
                                                                  capsys) -> None:  # fmt: skip
    info = app_module.evaluate.info()
    assert info.gpus == [("H100", 1)] and info.timeout == 12 * 60 * 60
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://127.0.0.1:9/run_code")
    with pytest.raises(SystemExit) as exc:
        app_module.evaluate.local(checkpoint="latest")
    assert exc.value.code == 2
    assert "no complete DAPO or SFT checkpoint" in capsys.readouterr().err


def test_pipeline_status_reads_the_volumes(app_module, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    done = app_module.pipeline_status.local("exp")
    assert done == dict.fromkeys(("prep", "download", "sft", "dapo", "eval"), False)
    assert "pending" in capsys.readouterr().out


def test_check_sandbox_connection_runs_locally(app_module, local_endpoint, capsys) -> None:
    app_module.check_sandbox_connection.local(url=local_endpoint + "/run_code")
    out = capsys.readouterr().out
    assert "status=Success" in out and "stdout='4'" in out


def test_check_sandbox_connection_fails_on_a_dead_endpoint(app_module, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        app_module.check_sandbox_connection.local(url="http://127.0.0.1:9/run_code")
    assert exc.value.code == 1
    assert capsys.readouterr().err.startswith("error: http://127.0.0.1:9/run_code failed after")


def test_dapo_attempts_are_retried_because_runs_outlive_24_hours(app_module) -> None:
    assert app_module.train_dapo.info().max_retries == 3
    assert app_module.train.info().max_retries in (None, 0)


def test_sandbox_url_prefers_the_explicit_endpoint(monkeypatch) -> None:
    from recipe.retool import modal_common

    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://sandbox:8080/run_code")
    assert modal_common.sandbox_url() == "http://sandbox:8080/run_code"


def test_learning_curve_runs_the_curve_on_one_gpu_against_the_sandbox(
    app_module, tmp_path, monkeypatch
) -> None:
    from recipe.retool import learning_curve

    info = app_module.learning_curve.info()
    assert info.gpus == [("H100", 1)] and info.timeout == 2 * 60 * 60
    calls, logged = [], []
    monkeypatch.setattr(learning_curve, "run", lambda *a, **kw: calls.append((a, kw)) or {"ok": 1})
    monkeypatch.setattr(learning_curve, "log_to_wandb", lambda *a: logged.append(a))
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://sandbox/run_code")
    assert app_module.learning_curve.local(dapo_steps=30) == {"ok": 1}
    (root, settings), kw = calls[0]
    assert logged == [(root, {"ok": 1})]  # the curve goes to wandb too
    assert root.parent == paths.Layout.from_env().checkpoints / "learning-curve"
    assert (
        settings.dapo_steps == 30
        and settings.sft_epochs == learning_curve.CurveSettings().sft_epochs
    )
    assert kw == {"gpus": 1, "sandbox_url": "http://sandbox/run_code"}


@pytest.mark.parametrize(
    ("function", "kwargs", "message"),
    [
        ("prep_dataset", {"only": "math"}, "groups are sft, rl, val"),
        ("prep_dataset", {"max_rows": -1}, "max_rows=-1"),
        ("merge_checkpoint", {"experiment_name": "a/b", "step": 1}, "invalid experiment name"),
        ("merge_checkpoint", {"experiment_name": "x", "step": 1}, "no FSDP checkpoint"),
        ("evaluate", {"n": -1}, "n must be >= 1"),
        ("pipeline", {"force": "dapo,evall"}, "unknown stage(s) ['evall']"),
    ],
)
def test_modal_functions_answer_bad_arguments_in_one_line(
    app_module, tmp_path, monkeypatch, capsys, function, kwargs, message
) -> None:
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    fn = getattr(app_module, function)
    with pytest.raises(SystemExit) as exc:
        fn(**kwargs) if function == "pipeline" else fn.local(**kwargs)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_train_dapo_starts_a_sandbox_on_its_node_and_hands_its_url_to_the_run(
    app_module, tmp_path, monkeypatch
) -> None:
    """The Modal function body as a plain function: no endpoint configured, so the node's own
    sandbox serves the run (the deployed one is never looked up)."""
    from recipe.retool import modal_common, stages, tool_sandbox
    from sandbox.client import SandboxClient

    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.delenv("SANDBOX_FUSION_ENDPOINT", raising=False)
    monkeypatch.setattr(modal_common, "sandbox_url", lambda: pytest.fail("deployed looked up"))
    seen = {}

    def run_dapo(layout, topo, args, *, sandbox_url, runner, launch_id):
        seen["url"] = sandbox_url
        seen["out"] = SandboxClient(sandbox_url, max_retries=1).run_code_sync("print(6*7)").stdout
        return stages.StageResult("dapo", "d", 0, None, 1.0)

    monkeypatch.setattr(stages, "run_dapo", run_dapo)
    app_module.train_dapo.local("--experiment-name=d")
    assert seen == {"url": tool_sandbox.NODE_SANDBOX_URL, "out": "42\n"}


def test_train_dapo_from_a_missing_start_is_one_line_and_not_retried(
    app_module, tmp_path, monkeypatch, capsys
) -> None:
    """What `launch check dapo --sft-checkpoint=...` leaves to the launch (it cannot see the
    volume): the launch refuses a start that is not there, in one line, before any GPU work."""
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://127.0.0.1:9/run_code")
    assert app_module.train_dapo.local("--sft-checkpoint=/nonexistent/path") is None
    err = capsys.readouterr().err
    assert err == "error: no checkpoint directory at /nonexistent/path\n"


# ---- detached launches ---------------------------------------------------------------------

DETACHED_TARGETS = {"sft": "launch_sft", "dapo": "launch_dapo", "eval": "launch_eval",
                    "pipeline": "pipeline"}  # fmt: skip


def make_dry_run(target: str) -> str:
    import subprocess

    out = subprocess.run(["make", "-n", target, "PY=python"], cwd=REPO, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return out.stdout


@pytest.mark.parametrize(("target", "entrypoint"), sorted(DETACHED_TARGETS.items()))
def test_make_launches_run_detached_through_a_spawning_entrypoint(
    app_module, target, entrypoint
) -> None:
    modal_line = next(line for line in make_dry_run(target).splitlines() if "modal run" in line)
    assert "modal run --detach" in modal_line
    assert f"retool_modal_sft.py::{entrypoint}" in modal_line
    assert isinstance(getattr(app_module, entrypoint), modal.app.LocalEntrypoint)


def test_the_pipeline_is_a_remote_function_that_outlives_the_client(app_module) -> None:
    # the client side spawns it and follows
    assert isinstance(app_module.pipeline, modal.app.LocalEntrypoint)
    info = app_module.pipeline_run.info()  # the chain itself runs in a container
    assert info.gpus == [] and info.timeout == 24 * 60 * 60
    assert {v.name for v in info.volumes.values()} == VOLUME_NAMES


class FakeCall:
    object_id = "fc-01ABC"

    def __init__(self, fn: FakeFunction) -> None:
        self.fn = fn

    def get(self):
        self.fn.waited = True
        return None


class FakeFunction:
    """A Modal function as a launch sees it: spawn, then a call to wait on."""

    def __init__(self) -> None:
        self.spawned: list[tuple[tuple, dict]] = []
        self.waited = False

    def spawn(self, *args, **kwargs) -> FakeCall:
        self.spawned.append((args, kwargs))
        return FakeCall(self)


@pytest.fixture
def spawned(app_module, monkeypatch):
    """Each launch's function replaced by a recorder; the app has a (fake) running id."""
    fakes = {name: FakeFunction() for name in ("train", "train_dapo", "evaluate", "pipeline_run")}
    for name, fake in fakes.items():
        monkeypatch.setattr(app_module, name, fake)
    monkeypatch.setattr(app_module, "app", type("App", (), {"app_id": "ap-XYZ"})())
    monkeypatch.setenv("WANDB_ENTITY", "team")
    return fakes


def test_launch_dapo_spawns_and_prints_how_to_follow_it(app_module, spawned, capsys) -> None:
    app_module.launch_dapo("--sandbox=node", "trainer.total_epochs=1")
    fake = spawned["train_dapo"]
    assert fake.spawned == [(("--sandbox=node", "trainer.total_epochs=1"), {})] and fake.waited
    out = capsys.readouterr().out
    assert "modal app logs ap-XYZ --function-call fc-01ABC --follow" in out
    # no --experiment-name: the run is named after the call, as the container names it
    assert "wandb:   https://wandb.ai/team/retool-dapo/runs/dapo-dapo-fc-01ABC" in out


def test_launch_sft_with_a_name_and_project_links_that_wandb_run(app_module, spawned, capsys):
    app_module.launch_sft("--experiment-name=big", "trainer.project_name=mine")
    assert spawned["train"].spawned[0][0] == ("--experiment-name=big", "trainer.project_name=mine")
    assert "https://wandb.ai/team/mine/runs/sft-big" in capsys.readouterr().out


def test_a_bad_launch_option_is_one_line_and_spawns_nothing(app_module, spawned, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        app_module.launch_dapo("--experment-name=x")
    assert exc.value.code == 2 and spawned["train_dapo"].spawned == []
    assert capsys.readouterr().err.startswith("error: unknown option --experment-name")


def test_eval_and_pipeline_spawn_their_functions(app_module, spawned, capsys) -> None:
    app_module.launch_eval(checkpoint="sft", n=4)
    assert spawned["evaluate"].spawned == [((), {"checkpoint": "sft", "n": 4, "max_problems": 0})]
    app_module.pipeline(experiment_name="r1", force="eval")
    assert spawned["pipeline_run"].spawned == [((), {"experiment_name": "r1", "force": "eval"})]
    out = capsys.readouterr().out
    assert "https://wandb.ai/team/retool-eval" in out and out.count("modal app logs ap-XYZ") == 2


@pytest.mark.parametrize(("name", "stage"), [("train", "sft"), ("train_dapo", "dapo"),
                                             ("evaluate", "eval")])  # fmt: skip
def test_gpu_functions_ask_for_the_host_resources_their_stage_needs(app_module, name, stage):
    from recipe.retool.modal_common import host_resources

    info = getattr(app_module, name).info()
    gpus = info.gpus[0][1]
    wanted = host_resources(stage, gpus)
    assert (info.cpu, info.memory_mib) == (wanted["cpu"], wanted["memory"])
    assert info.cpu >= 2 * gpus and info.memory_mib >= 16 * 1024  # far above Modal's default


def test_results_fetches_reports_but_no_weights(app_module, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path / "vol"))
    layout = paths.Layout.from_env()
    make_step(layout, "sft", "r1", 4)
    exp = layout.experiment_dir("sft", "r1")
    (exp / "report.md").write_text("# sft run: r1\n")
    (exp / "metrics").mkdir()
    (exp / "metrics" / "a.jsonl").write_text("{}\n")
    (layout.checkpoints / "eval" / "r1" / "sft").mkdir(parents=True)
    (layout.checkpoints / "eval" / "r1" / "compare.md").write_text("x")
    (layout.checkpoints / "eval" / "r1" / "sft" / "samples_aime_2024.jsonl").write_text("{}")
    fetched = app_module.result_files.local("r1")
    assert set(fetched) == {"sft-experiments/r1/report.md", "sft-experiments/r1/metrics/a.jsonl",
                            "eval/r1/compare.md"}  # fmt: skip
