"""The Modal app, checked offline: function settings via Function.info(), .local() runs of the
bodies, the launches with Modal's calls faked, and the retries Modal would make. ``tests/modal``
loads the same file as Modal does (client venv with modal alone, containers in bubblewrap)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("modal")  # dev-only: absent on a GPU box with the trainer image's set

import modal

from recipe.retool import modal_common
from recipe.retool.core import paths
from recipe.retool.launch.commands import ray_address
from tests.recipe.test_paths import make_step, mark_tracked

REPO = Path(__file__).resolve().parents[2]
MODULE = "recipe.retool.retool_modal_sft"
GPU_FUNCTIONS = {"train_gpu", "train_dapo_gpu"}
CPU_FUNCTIONS = {
    "prep_dataset", "download_model", "list_checkpoints", "merge_checkpoint",
    "check_sandbox_connection", "check_launch", "pipeline_status", "result_files", "wandb_sync",
}  # fmt: skip
# What the seed, the README and the Makefile run; `train`/`train_dapo` keep the seed's names.
ENTRYPOINTS = {"train", "train_dapo", "train_multinode", "train_dapo_multinode", "evaluate",
               "pipeline", "results"}  # fmt: skip
VOLUME_NAMES = {paths.DATA_VOLUME, paths.MODELS_VOLUME, paths.CHECKPOINTS_VOLUME}
DOTENV_KEYS = "Secret.from_dict([HF_TOKEN, WANDB_MODE])"
SETTINGS_KEYS = "Secret.from_dict([RETOOL_GPU_TYPE, RETOOL_GPUS, RETOOL_NODES])"


def load_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str):
    """Import the app as the unit tests do, with a fixture .env (never the developer's)."""
    dotenv = tmp_path / "fixture.env"
    dotenv.write_text("HF_TOKEN=\nWANDB_MODE=offline\n")
    monkeypatch.setattr(modal_common, "DOTENV", dotenv)
    for key in ("RETOOL_GPUS", "RETOOL_GPU_TYPE", "RETOOL_NODES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop(MODULE, None)
    return importlib.import_module(MODULE)


@pytest.fixture
def app_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    module = load_app(monkeypatch, tmp_path)
    yield module
    sys.modules.pop(MODULE, None)


def container_env(fn: modal.Function) -> dict[str, str]:
    """What the function's own secrets (``Secret.from_dict``, ``env=``) put in its container."""
    from modal._utils.async_utils import synchronizer
    from modal.secret import _local_secret_env

    return _local_secret_env(synchronizer._translate_in(fn)._spec.secrets)


def test_app_imports_without_token_and_has_the_seed_functions(app_module) -> None:
    assert app_module.app.name == "retool-sft"
    for name in GPU_FUNCTIONS | CPU_FUNCTIONS:
        assert isinstance(getattr(app_module, name), modal.Function), name
    for name in ENTRYPOINTS:
        assert isinstance(getattr(app_module, name), modal.app.LocalEntrypoint), name


@pytest.mark.parametrize("name", sorted(GPU_FUNCTIONS))
def test_training_functions_take_8_h100_for_a_day_with_volumes_and_secrets(
    app_module, name
) -> None:
    info = getattr(app_module, name).info()
    assert info.gpus == [("H100", 8)]
    assert info.timeout == 24 * 60 * 60
    assert {v.name for v in info.volumes.values()} == VOLUME_NAMES
    assert set(info.volumes) == {"/data", "/models", "/checkpoints"}
    assert info.secrets == [DOTENV_KEYS, SETTINGS_KEYS]  # the .env by key name, never a value


@pytest.mark.parametrize("name", sorted(CPU_FUNCTIONS))
def test_utility_functions_use_no_gpu(app_module, name) -> None:
    info = getattr(app_module, name).info()
    assert info.gpus == []
    assert info.timeout <= 2 * 60 * 60


def test_settings_read_at_import_reach_every_container(monkeypatch, tmp_path) -> None:
    """RETOOL_GPUS=2 asked Modal for 2 GPUs while the container, importing the file again without
    the variable, gave torchrun, verl and Ray 8 (issue 32, defect 7): every function now carries
    the values the launch read. tests/modal imports the file in a container with them."""
    module = load_app(monkeypatch, tmp_path, RETOOL_GPUS="2", RETOOL_GPU_TYPE="H200",
                      RETOOL_NODES="3")  # fmt: skip
    try:
        assert module.train_gpu.info().gpus == [("H200", 2)]
        assert module._topology().gpus_per_node == 2
        wanted = {"RETOOL_GPUS": "2", "RETOOL_GPU_TYPE": "H200", "RETOOL_NODES": "3"}
        for name, fn in vars(module).items():
            if isinstance(fn, modal.Function):
                assert container_env(fn).items() >= wanted.items(), name
    finally:
        sys.modules.pop(MODULE, None)


@pytest.mark.parametrize(
    "env", [{"RETOOL_GPUS": "abc"}, {"RETOOL_NODES": "abc"}, {"RETOOL_GPUS": "0"},
            {"RETOOL_NODES": "-1"}, {"RETOOL_GPUS": "2.5"}],
)  # fmt: skip
def test_a_bad_gpu_or_node_count_is_one_line_at_import(monkeypatch, tmp_path, capsys, env) -> None:
    ((name, value),) = env.items()
    try:
        with pytest.raises(SystemExit) as exc:
            load_app(monkeypatch, tmp_path, **env)
    finally:
        sys.modules.pop(MODULE, None)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {name}={value!r} is not a whole number >= 1")


def test_an_empty_gpu_count_is_the_default(monkeypatch, tmp_path) -> None:
    module = load_app(monkeypatch, tmp_path, RETOOL_GPUS="", RETOOL_NODES=" 3 ")
    try:
        assert (module.N_GPUS, module.N_NODES) == (8, 3)
        assert module.ENV["RETOOL_GPUS"] == "8"  # the container gets the value, not the blank
    finally:
        sys.modules.pop(MODULE, None)


def test_images_are_built_from_the_compose_dockerfile(monkeypatch, tmp_path, dockerfile_builds):
    load_app(monkeypatch, tmp_path)
    sys.modules.pop(MODULE, None)
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
        app_module.train_gpu.local("trainer.totl_epochs=3")
    assert exc.value.code == 2
    assert "unknown key 'trainer.totl_epochs'" in capsys.readouterr().err


# ---- retries: what Modal does with a failed attempt ----------------------------------------------


def modal_attempts(fn: modal.Function, *args: str, capsys) -> list[tuple[int | None, str]]:
    """``fn``'s body run as Modal runs a function with retries: again after every failed attempt
    (any exception, SystemExit too: Modal has no non-retryable one), up to ``max_retries`` more
    times, until one succeeds. Each attempt's exit code (``None``: success) and stderr."""
    outcomes = []
    for _ in range(1 + (fn.info().max_retries or 0)):
        try:
            fn.local(*args)
        except SystemExit as exc:
            outcomes.append((exc.code, capsys.readouterr().err))
            continue
        outcomes.append((None, capsys.readouterr().err))
        break
    return outcomes


class ScriptedDapoRunner:
    """verl's main_ppo that saves the next step of the experiment it is given, then ends with
    the next scripted exit code (137: cut, as a timeout or a lost node ends it)."""

    def __init__(self, layout: paths.Layout, codes: list[int]) -> None:
        self.layout, self.codes = layout, list(codes)
        self.dirs: list[str] = []

    def __call__(self, command, env) -> int:
        prefix = "trainer.default_local_dir="
        self.dirs.append(next(a.removeprefix(prefix) for a in command if a.startswith(prefix)))
        make_step(self.layout, "dapo", Path(self.dirs[-1]).name, 5 * len(self.dirs))
        return self.codes.pop(0)


@pytest.fixture
def dapo_attempts(app_module, tmp_path, monkeypatch, attempt_clock):
    """A launch of ``train_dapo_gpu`` as Modal runs it: every attempt with the same function call
    id; an SFT checkpoint to start from; main_ppo scripted (``.codes``, 137 by default)."""
    from recipe.retool.stages import dapo as stages

    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://127.0.0.1:9/run_code")
    layout = paths.Layout.local(tmp_path)
    make_step(layout, "sft", "s1", 62)
    mark_tracked(layout, "sft", "s1", 62)
    runner = ScriptedDapoRunner(layout, [137] * 4)
    run_dapo = stages.run_dapo
    monkeypatch.setattr(
        stages, "run_dapo", lambda *a, **kw: run_dapo(*a, **kw | {"runner": runner})
    )
    monkeypatch.setattr(app_module.modal, "current_function_call_id", lambda: "fc-01TEST")
    return runner


def test_dapo_attempts_are_retried_because_runs_outlive_24_hours(app_module) -> None:
    assert app_module.train_dapo_gpu.info().max_retries == 3
    assert app_module.train_gpu.info().max_retries in (None, 0)


def test_a_cut_dapo_attempt_is_retried_and_resumes_the_same_experiment(
    app_module, dapo_attempts, capsys
) -> None:
    """Transient: main_ppo cut twice (exit 137), then done: three attempts, one experiment."""
    dapo_attempts.codes = [137, 137, 0]
    outcomes = modal_attempts(app_module.train_dapo_gpu, capsys=capsys)
    assert [code for code, _ in outcomes] == [137, 137, None]  # the call ends in success
    assert len(set(dapo_attempts.dirs)) == 1
    assert Path(dapo_attempts.dirs[0]).name == "dapo-fc-01TEST"
    steps = sorted(p.name for p in Path(dapo_attempts.dirs[0]).glob("global_step_*"))
    assert steps == ["global_step_10", "global_step_15", "global_step_5"]


def test_ray_nodes_that_did_not_join_are_retried(app_module, dapo_attempts, monkeypatch, capsys):
    """Transient: a RuntimeError on the node (Ray's workers never joined) fails that attempt
    with exit 1; the next one runs the stage again."""
    from recipe.retool.stages import dapo as stages

    dapo_on_node = stages.dapo_on_node
    failures = iter([RuntimeError("1 of 2 Ray nodes joined in 600 s")])

    def flaky(*args, **kwargs):
        if (exc := next(failures, None)) is not None:
            raise exc
        return dapo_on_node(*args, **kwargs)

    monkeypatch.setattr(stages, "dapo_on_node", flaky)
    dapo_attempts.codes = [0]
    outcomes = modal_attempts(app_module.train_dapo_gpu, capsys=capsys)
    assert [code for code, _ in outcomes] == [1, None]
    assert outcomes[0][1] == "error: 1 of 2 Ray nodes joined in 600 s\n"


def no_isolation(monkeypatch) -> None:
    from sandbox import isolation

    def refuse(settings):
        raise isolation.IsolationUnavailable("no isolation mode works here (bwrap: refused)")

    monkeypatch.delenv("SANDBOX_FUSION_ENDPOINT", raising=False)
    monkeypatch.setattr(isolation, "detect", refuse)


def not_deployed(monkeypatch) -> None:
    def lookup() -> str:
        raise modal_common.SandboxNotDeployed("the sandbox is not deployed: run `modal deploy`")

    monkeypatch.delenv("SANDBOX_FUSION_ENDPOINT", raising=False)
    monkeypatch.setattr(modal_common, "sandbox_url", lookup)


@pytest.mark.parametrize(
    ("args", "setup", "line"),
    [
        (["trainer.totl_epochs=3"], None, "error: unknown key 'trainer.totl_epochs'"),
        (["--sft-checkpoint=/nonexistent/path"], None,
         "error: no checkpoint directory at /nonexistent/path"),
        (["--sandbox=deployed"], not_deployed, "error: the sandbox is not deployed"),
        (["--sandbox=node"], no_isolation,
         "error: node sandbox: no isolation mode works here (bwrap: refused)"),
    ],
    ids=["bad-override", "missing-checkpoint", "no-sandbox", "no-isolation"],
)  # fmt: skip
def test_a_mistake_no_retry_can_fix_fails_every_attempt_at_once(
    app_module, dapo_attempts, monkeypatch, capsys, args, setup, line
) -> None:
    """Deterministic: the first attempt prints the line and exits 2, and so does every retry, at
    once, without running the stage again (each retry is a GPU start); the call ends failed.
    Before, `train_dapo` returned None here, so Modal counted its first attempt a success
    (issue 32, defect 5)."""
    from recipe.retool.stages import dapo as stages

    if setup:
        setup(monkeypatch)
    ran = []
    dapo_on_node = stages.dapo_on_node

    def counted(*args, **kwargs):
        ran.append(1)
        return dapo_on_node(*args, **kwargs)

    monkeypatch.setattr(stages, "dapo_on_node", counted)
    outcomes = modal_attempts(app_module.train_dapo_gpu, *args, capsys=capsys)
    assert [code for code, _ in outcomes] == [2, 2, 2, 2]  # 1 + max_retries, all failed
    first = outcomes[0][1].splitlines()[-1]
    assert first.startswith(line)
    assert all(err.splitlines() == [first] for _, err in outcomes[1:])  # the same one line
    assert ran == [1] and dapo_attempts.dirs == []  # the stage ran once; main_ppo never


def test_the_failure_line_is_kept_per_function_call(app_module, dapo_attempts, capsys) -> None:
    """Another launch (another call id) is not refused by an earlier launch's mistake."""
    layout = paths.Layout.from_env()
    with pytest.raises(SystemExit):
        app_module.train_dapo_gpu.local("trainer.totl_epochs=3")
    marker = layout.failed_call_file("fc-01TEST")
    assert marker.read_text().startswith("error: unknown key 'trainer.totl_epochs'")
    assert not layout.failed_call_file("fc-02OTHER").exists()


def test_prep_dataset_runs_locally_on_sample_sources(app_module, tmp_path, monkeypatch) -> None:
    from recipe.retool.data import prep
    from recipe.retool.data.tiny_model import build_tokenizer
    from recipe.retool.launch.commands import load_stage_config
    from recipe.retool.local import samples
    from recipe.retool.workflows import pipeline

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


@pytest.mark.parametrize("name", ["train_multinode_gpu", "train_dapo_multinode_gpu"])
def test_multinode_functions_are_rdma_clusters_of_8_gpu_nodes(app_module, name) -> None:
    info = getattr(app_module, name).info()
    assert info.gpus == [("H100", 8)]
    assert (info.cluster_info.size, info.cluster_info.rdma) == (2, True)


def test_multinode_dapo_hands_every_node_one_ray_token_per_launch(app_module, monkeypatch) -> None:
    """Modal's containers share no ~/.ray, so the Ray nodes authenticate with RAY_AUTH_TOKEN:
    made where `modal run` runs and bound to the function as a secret, which every container
    of the cluster receives. Inside a container the app's import makes no token of its own."""
    assert app_module.train_dapo_multinode_gpu.info().secrets == [
        DOTENV_KEYS, "Secret.from_dict([RAY_AUTH_TOKEN])", SETTINGS_KEYS,
    ]  # fmt: skip
    assert app_module.train_multinode_gpu.info().secrets == [DOTENV_KEYS, SETTINGS_KEYS]
    monkeypatch.setattr(modal_common.modal, "is_local", lambda: False)
    assert repr(modal_common.ray_cluster_secret()) == "Secret.from_dict([])"


def test_topology_gives_torchrun_and_ray_the_ipv4_head(app_module, monkeypatch) -> None:
    """Modal's `container_ips` are IPv6 (Ray got `fdaa:…:6379`, issue 32 defect 4); the head is
    `container_ipv4_ips[0]`, as in Modal's own multi-node verl, Ray and slime examples."""
    from modal._cluster import ClusterContext

    cluster = ClusterContext(rank=1, cluster_id="cu-1", fabric_ids=[],
                             container_ips=["fdaa:0:1::5", "fdaa:0:1::6"],
                             container_ipv4_ips=["10.0.0.5", "10.0.0.6"])  # fmt: skip
    monkeypatch.setattr(app_module.modal.experimental, "get_cluster_info", lambda: cluster)
    topo = app_module._topology()
    assert (topo.nnodes, topo.node_rank, topo.master_addr, topo.world_size) == (
        2,
        1,
        "10.0.0.5",
        16,
    )
    assert ray_address(topo) == "10.0.0.5:6379"


def test_evaluate_takes_one_gpu_and_reports_a_missing_checkpoint(app_module, tmp_path, monkeypatch,
                                                                  capsys) -> None:  # fmt: skip
    info = app_module.evaluate_gpu.info()
    assert info.gpus == [("H100", 1)] and info.timeout == 12 * 60 * 60
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://127.0.0.1:9/run_code")
    with pytest.raises(SystemExit) as exc:
        app_module.evaluate_gpu.local(checkpoint="latest")
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


def test_sandbox_url_prefers_the_explicit_endpoint(monkeypatch) -> None:
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://sandbox:8080/run_code")
    assert modal_common.sandbox_url() == "http://sandbox:8080/run_code"


def test_learning_curve_runs_the_curve_on_one_gpu_against_the_sandbox(
    app_module, tmp_path, monkeypatch
) -> None:
    from recipe.retool.workflows.learning_curve import proof as learning_curve

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


def test_the_learning_curve_without_a_sandbox_is_one_line(app_module, tmp_path, monkeypatch):
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    not_deployed(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        app_module.learning_curve.local()
    assert exc.value.code == "learning curve: the sandbox is not deployed: run `modal deploy`"


@pytest.mark.parametrize(
    ("function", "kwargs", "message"),
    [
        ("prep_dataset", {"only": "math"}, "groups are sft, rl, val"),
        ("prep_dataset", {"max_rows": -1}, "max_rows=-1"),
        ("merge_checkpoint", {"experiment_name": "a/b", "step": 1}, "invalid experiment name"),
        ("merge_checkpoint", {"experiment_name": "x", "step": 1}, "no FSDP checkpoint"),
        ("evaluate_gpu", {"n": -1}, "n must be >= 1"),
    ],
)
def test_modal_functions_answer_bad_arguments_in_one_line(
    app_module, tmp_path, monkeypatch, capsys, function, kwargs, message
) -> None:
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        getattr(app_module, function).local(**kwargs)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_train_dapo_starts_a_sandbox_on_its_node_and_hands_its_url_to_the_run(
    app_module, tmp_path, monkeypatch
) -> None:
    """The Modal function body as a plain function: no endpoint configured, so the node's own
    sandbox serves the run (the deployed one is never looked up)."""
    from recipe.retool.stages import dapo as stages
    from recipe.retool.stages import tool_sandbox
    from recipe.retool.stages.record import StageResult
    from sandbox.client import SandboxClient

    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    monkeypatch.delenv("SANDBOX_FUSION_ENDPOINT", raising=False)
    monkeypatch.setattr(modal_common, "sandbox_url", lambda: pytest.fail("deployed looked up"))
    seen = {}

    def run_dapo(layout, topo, args, *, sandbox_url, runner, launch_id):
        seen["url"] = sandbox_url
        seen["out"] = SandboxClient(sandbox_url, max_retries=1).run_code_sync("print(6*7)").stdout
        return StageResult("dapo", "d", 0, None, 1.0)

    monkeypatch.setattr(stages, "run_dapo", run_dapo)
    app_module.train_dapo_gpu.local("--experiment-name=d")
    assert seen == {"url": tool_sandbox.NODE_SANDBOX_URL, "out": "42\n"}


# ---- the launch check (check_launch, a CPU container) ----------------------------------------


@pytest.fixture
def volumes(tmp_path, monkeypatch) -> paths.Layout:
    """The three volumes, mounted (empty directories) as in a container."""
    monkeypatch.setenv("RETOOL_ROOT", str(tmp_path))
    layout = paths.Layout.from_env()
    for root in (layout.data, layout.models, layout.checkpoints):
        root.mkdir(parents=True)
    return layout


def test_the_check_refuses_a_bad_override_in_one_line(app_module, volumes) -> None:
    plan = app_module.check_launch.local("sft", ["trainer.totl_epochs=3"])
    assert plan["error"].startswith("unknown key 'trainer.totl_epochs'")


def test_the_check_refuses_sft_without_its_data(app_module, volumes) -> None:
    plan = app_module.check_launch.local("sft", [])
    assert plan["error"] == (f"no SFT data at {volumes.sft_train_file()}: run prep_dataset first")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--sft-checkpoint=/nonexistent/path"], "no checkpoint directory at /nonexistent/path"),
        ([], "no complete sft checkpoint"),
    ],
)
def test_the_check_refuses_dapo_without_its_start(app_module, volumes, args, error) -> None:
    assert error in app_module.check_launch.local("dapo", args)["error"]


def test_the_check_refuses_dapo_without_its_sandbox(app_module, volumes, monkeypatch) -> None:
    make_step(volumes, "sft", "s1", 62)
    mark_tracked(volumes, "sft", "s1", 62)
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", "http://127.0.0.1:9/run_code")
    plan = app_module.check_launch.local("dapo", [])
    assert plan["error"].startswith("sandbox at http://127.0.0.1:9/run_code is not answering")


def test_the_check_refuses_dapo_where_its_node_sandbox_has_no_isolation(
    app_module, volumes, monkeypatch
) -> None:
    make_step(volumes, "sft", "s1", 62)
    mark_tracked(volumes, "sft", "s1", 62)
    no_isolation(monkeypatch)
    plan = app_module.check_launch.local("dapo", ["--sandbox=node"])  # no fallback to Modal's
    assert plan["error"] == (
        "node sandbox: no isolation mode works here (bwrap: refused); or run with "
        "--sandbox=modal or --sandbox=deployed"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ([], "sandbox: not this node's (node sandbox: no isolation mode works here (bwrap: "
             "refused); or run with --sandbox=modal or --sandbox=deployed); the run falls back "
             "to Modal Sandboxes"),
        (["--sandbox=modal"], "sandbox: Modal Sandboxes (--sandbox=modal), made when the run "
                              "starts"),
    ],
)  # fmt: skip
def test_the_check_names_modal_sandboxes_without_making_any(
    app_module, volumes, monkeypatch, args, line
) -> None:
    """The check stays cheap and leaves nothing running: where the run will use (auto's
    fallback) or is told to use Modal Sandboxes, it says so and creates none."""
    import modal

    def no_sandbox_here(*args, **kwargs):
        raise AssertionError("the launch check made a Modal Sandbox")

    make_step(volumes, "sft", "s1", 62)
    mark_tracked(volumes, "sft", "s1", 62)
    no_isolation(monkeypatch)
    monkeypatch.setattr(modal.Sandbox, "create", no_sandbox_here)
    plan = app_module.check_launch.local("dapo", args)
    assert plan["error"] is None and line in plan["lines"]


def test_the_check_passes_dapo_with_its_start_and_sandbox(
    app_module, volumes, monkeypatch, local_endpoint
) -> None:
    make_step(volumes, "sft", "s1", 62)
    mark_tracked(volumes, "sft", "s1", 62)
    monkeypatch.setenv("SANDBOX_FUSION_ENDPOINT", f"{local_endpoint}/run_code")
    plan = app_module.check_launch.local("dapo", ["--experiment-name=d1"])
    assert plan["error"] is None and (plan["experiment"], plan["project"]) == ("d1", "retool-dapo")
    assert any(line.startswith("DAPO starts from") for line in plan["lines"])
    assert f"sandbox: {local_endpoint}/run_code ran a test program" in plan["lines"]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"checkpoint": "latest"}, "no complete DAPO or SFT checkpoint"),
        ({"n": -1}, "n must be >= 1"),
    ],
)
def test_the_check_refuses_an_evaluation_it_cannot_run(app_module, volumes, options, error):
    assert error in app_module.check_launch.local("eval", [], 1, options)["error"]


def test_the_check_refuses_an_unknown_pipeline_stage(app_module, volumes) -> None:
    plan = app_module.check_launch.local("pipeline", [], 1, {"force": "dapo,evall"})
    assert "unknown stage(s) ['evall']" in plan["error"]


# ---- launches ------------------------------------------------------------------------------

MAKE_TARGETS = {"sft": "train", "dapo": "train_dapo", "eval": "evaluate", "pipeline": "pipeline"}


def make_dry_run(target: str) -> str:
    import subprocess

    out = subprocess.run(["make", "-n", target, "PY=python"], cwd=REPO, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return out.stdout


@pytest.mark.parametrize(("target", "entrypoint"), sorted(MAKE_TARGETS.items()))
def test_make_launches_run_detached_through_a_checked_entrypoint(
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
        if self.fn.fails:
            raise RuntimeError("main_ppo exited 1\nTraceback ...")
        return None


class FakeFunction:
    """A Modal function as a launch sees it: ``remote`` answers ``plan``; ``spawn``, then a call
    to wait on (which raises when ``fails``)."""

    def __init__(self, plan: dict | None = None, fails: bool = False) -> None:
        self.plan, self.fails = plan, fails
        self.remote_calls: list[tuple] = []
        self.spawned: list[tuple[tuple, dict]] = []
        self.waited = False

    def remote(self, *args):
        self.remote_calls.append(args)
        return self.plan

    def spawn(self, *args, **kwargs) -> FakeCall:
        self.spawned.append((args, kwargs))
        return FakeCall(self)


@pytest.fixture
def spawned(app_module, monkeypatch):
    """Each launch's function replaced by a recorder, the check by one that passes; the app has
    a (fake) running id."""
    names = ("train_gpu", "train_dapo_gpu", "evaluate_gpu", "pipeline_run")
    fakes = {name: FakeFunction() for name in names}
    passed = {"error": None, "lines": ["ok: 78 overrides"], "experiment": None,
              "project": "retool-dapo"}  # fmt: skip
    fakes["check_launch"] = FakeFunction(passed)
    for name, fake in fakes.items():
        monkeypatch.setattr(app_module, name, fake)
    monkeypatch.setattr(app_module, "app", type("App", (), {"app_id": "ap-XYZ"})())
    monkeypatch.setenv("WANDB_ENTITY", "team")
    return fakes


def test_train_dapo_checks_then_spawns_and_prints_how_to_follow_it(
    app_module, spawned, capsys
) -> None:
    app_module.train_dapo("--sandbox=node", "trainer.total_epochs=1")
    assert spawned["check_launch"].remote_calls == [
        ("dapo", ["--sandbox=node", "trainer.total_epochs=1"], 1, {})
    ]
    fake = spawned["train_dapo_gpu"]
    assert fake.spawned == [(("--sandbox=node", "trainer.total_epochs=1"), {})] and fake.waited
    out = capsys.readouterr().out
    assert out.startswith("ok: 78 overrides\nlaunched dapo on 8xH100 (fc-01ABC)")
    assert "modal app logs ap-XYZ --function-call fc-01ABC --follow" in out
    # no --experiment-name: the run is named after the call, as the container names it
    assert "wandb:   https://wandb.ai/team/retool-dapo/runs/dapo-dapo-fc-01ABC" in out


def test_train_with_a_name_and_project_links_that_wandb_run(app_module, spawned, capsys):
    spawned["check_launch"].plan |= {"experiment": "big", "project": "mine"}
    app_module.train("--experiment-name=big", "trainer.project_name=mine")
    assert spawned["train_gpu"].spawned[0][0] == (
        "--experiment-name=big",
        "trainer.project_name=mine",
    )
    assert "https://wandb.ai/team/mine/runs/sft-big" in capsys.readouterr().out


def test_a_launch_its_check_refuses_is_one_line_and_spawns_nothing(
    app_module, spawned, capsys
) -> None:
    spawned["check_launch"].plan = {"error": "unknown option --experment-name", "lines": []}
    with pytest.raises(SystemExit) as exc:
        app_module.train_dapo("--experment-name=x")
    assert exc.value.code == 2 and spawned["train_dapo_gpu"].spawned == []
    assert capsys.readouterr().err == "error: unknown option --experment-name\n"


def test_a_run_that_fails_ends_the_launch_failed_in_one_line(app_module, spawned, capsys) -> None:
    spawned["train_gpu"].fails = True
    with pytest.raises(SystemExit) as exc:
        app_module.train()
    assert exc.value.code == 1
    assert capsys.readouterr().err == (
        "error: sft on 8xH100 failed: main_ppo exited 1 (modal app logs ap-XYZ)\n"
    )


def test_evaluate_and_pipeline_check_then_spawn_their_functions(app_module, spawned, capsys):
    app_module.evaluate(checkpoint="sft", n=4)
    options = {"checkpoint": "sft", "n": 4, "max_problems": 0, "experiment": "", "force": False}
    assert spawned["check_launch"].remote_calls[-1] == ("eval", [], 1, options)
    assert spawned["evaluate_gpu"].spawned == [((), options)]
    app_module.pipeline(experiment_name="r1", force="eval")
    assert spawned["pipeline_run"].spawned == [((), {"experiment_name": "r1", "force": "eval"})]
    out = capsys.readouterr().out
    assert "https://wandb.ai/team/retool-eval" in out and out.count("modal app logs ap-XYZ") == 2


@pytest.mark.parametrize(("name", "stage"), [("train_gpu", "sft"), ("train_dapo_gpu", "dapo"),
                                             ("evaluate_gpu", "eval")])  # fmt: skip
def test_gpu_functions_ask_for_the_host_resources_their_stage_needs(app_module, name, stage):
    info = getattr(app_module, name).info()
    gpus = info.gpus[0][1]
    wanted = modal_common.host_resources(stage, gpus)
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


def test_the_seeds_env_example_is_the_projects(app_module) -> None:
    """The seed's `cp recipe/retool/env.example .env` works, and copies the one .env.example."""
    seed = REPO / "recipe" / "retool" / "env.example"
    assert seed.read_text() == (REPO / ".env.example").read_text()
    assert seed.is_symlink() and seed.resolve() == (REPO / ".env.example").resolve()
