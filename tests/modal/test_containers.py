"""The container side: each function's container as Modal lays it out (``harness.Container``),
its module imported as Modal imports it, and the bodies that can run on a CPU run there: the
sandbox app serving its real ``/run_code``, the trainer's checks and CPU functions on fixture
volumes, a deterministic failure through its retries."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from recipe.retool.core import paths
from tests.modal import harness
from tests.modal.conftest import deployed
from tests.recipe.test_paths import make_step, mark_tracked

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {harness.DOTENV['SANDBOX_API_TOKEN']}"}


def run_code(served: harness.Served, code: str) -> dict:
    body = {"code": code, "language": "python"}
    return httpx.post(f"{served.url}/run_code", json=body, headers=AUTH, timeout=60).json()


# ---- the sandbox app ------------------------------------------------------------------------


def test_the_sandbox_app_starts_in_its_container_and_runs_code(sandbox) -> None:
    """Defects 1 and 8 of issue 32: mounted alone as /root/modal_fusion_sandbox.py the file
    raised IndexError (`parents[2]`), and it imported python-dotenv, which the sandbox image
    lacks; with min_containers=1 the container crash-looped."""
    answer = run_code(sandbox, "import numpy, sympy; print(2+2)")
    assert (answer["status"], answer["run_result"]["stdout"]) == ("Success", "4\n")
    # the mode it took, in the start-up log; the strongest works here
    assert "sandbox isolation: bwrap (secure)" in sandbox.text


def test_the_trainer_and_the_check_app_reach_it_by_its_deployed_name(describe, containers,
                                                                      sandbox) -> None:  # fmt: skip
    check = harness.Container(describe("sft"), "check_sandbox_connection", containers)
    run = check.run([{"call": "check_sandbox_connection"}], web_urls=deployed(sandbox))
    assert run.step(0)["exit"] == 0, run.stderr[-2000:]
    assert f"{sandbox.url}/run_code: status=Success stdout='4'" in run.stdout
    snippet = harness.Container(describe("check"), "run_snippet", containers)
    run = snippet.run([{"call": "run_snippet", "args": ["print(6*7)"]}],
                      web_urls=deployed(sandbox))  # fmt: skip
    returned = run.step(0)["returned"]
    assert (returned["stdout"], returned["ok"]) == ("42\n", True), run.stderr[-2000:]


def test_where_no_isolation_works_the_sandbox_says_so_and_keeps_serving(
    describe, containers, sandbox_without_isolation, fixture_volumes
) -> None:
    """Defect 6: `auto` with SANDBOX_ALLOW_INSECURE=1 fell to `none` (user code as root, with
    the network, beside the token). Now the container starts, runs nothing, and says why in one
    line that the trainer's check and DAPO's start-up check show."""
    served = sandbox_without_isolation
    answer = run_code(served, "print(2+2)")
    assert answer["status"] == "SandboxError" and answer["run_result"] is None
    reason = answer["message"]
    assert reason.startswith("the deployed sandbox runs no code: no isolation mode works here")
    assert "none" not in reason.split("(", 1)[1].split(":")[0]  # never tried, never taken
    assert "sandbox isolation: none" not in served.text and reason in served.text
    check = harness.Container(describe("sft"), "check_sandbox_connection", containers)
    run = check.run([{"call": "check_sandbox_connection"}], web_urls=deployed(served))
    assert run.step(0)["exit"] == 1
    assert run.stderr.strip().splitlines() == [
        f"error: {served.url}/run_code failed after 3 attempts; last error: SandboxError: {reason}"
    ]
    launch = harness.Container(describe("sft"), "check_launch", containers,
                               volumes=fixture_volumes)  # fmt: skip
    run = launch.run([{"call": "check_launch", "args": ["dapo", ["--sandbox=deployed"]]}],
                     web_urls=deployed(served))  # fmt: skip
    error = run.step(0)["returned"]["error"]
    assert error.startswith(f"sandbox at {served.url}/run_code could not run a test program")
    assert error.endswith(reason)


# ---- settings and the cluster -----------------------------------------------------------------


def test_settings_read_at_import_have_the_launchs_values_in_the_container(describe, containers):
    """Defect 7: RETOOL_GPUS, RETOOL_GPU_TYPE, RETOOL_NODES and RETOOL_SERVE_MAX_MODEL_LEN were
    read again in the container, without the launch's environment: 8 GPUs for torchrun, verl
    and Ray where Modal gave 2, vLLM's 32768 whatever the deploy said."""
    app = describe("sft", RETOOL_GPUS="2", RETOOL_GPU_TYPE="H200", RETOOL_NODES="3")
    run = harness.Container(app, "train_dapo_gpu", containers).run(
        [{"values": ["N_GPUS", "GPU_TYPE", "N_NODES"]}, {"call": "_topology"}]
    )
    assert run.record["is_local"] is False, run.stderr[-2000:]
    assert run.record["file"] == "/root/retool_modal_sft.py"
    assert run.step(0)["values"] == {"N_GPUS": 2, "GPU_TYPE": "H200", "N_NODES": 3}
    assert "gpus_per_node=2" in run.step(1)["returned"] and "gpu_type='H200'" in run.step(1)[
        "returned"]  # fmt: skip
    serve = describe("serve", RETOOL_SERVE_MAX_MODEL_LEN="16384", RETOOL_SERVE_API_KEY="k-1")
    run = harness.Container(serve, "vllm", containers).run([{"values": ["MAX_MODEL_LEN"]}])
    assert run.step(0)["values"] == {"MAX_MODEL_LEN": 16384}, run.stderr[-2000:]
    # /chat's container builds its app with the deploy's key and the sandbox found by name
    run = harness.Container(serve, "chat", containers).run(
        [{"call": "chat"}], web_urls={"retool-sandbox/serve": "http://127.0.0.1:9"}
    )
    assert run.step(0)["exit"] == 0, run.stderr[-2000:]
    assert {"function": "retool-sandbox/serve", "how": "get_web_url"} in run.calls()


def test_ray_and_torchrun_get_the_clusters_ipv4_head(describe, containers) -> None:
    """Defect 4: `container_ips` are Modal's IPv6 addresses; Ray got `fdaa:…:6379`."""
    cluster = {"rank": 1, "container_ips": ["fdaa:0:1::a", "fdaa:0:1::b"],
               "container_ipv4_ips": ["10.100.0.1", "10.100.0.2"]}  # fmt: skip
    app = describe("sft")
    run = harness.Container(app, "train_dapo_multinode_gpu", containers).run(
        [{"call": "_topology"}], cluster=cluster
    )
    topology = run.step(0)["returned"]
    assert "master_addr='10.100.0.1'" in topology and "node_rank=1" in topology, run.stderr


def test_the_trainer_image_carries_what_the_pool_builds_its_sandboxes_from(describe) -> None:
    """`--sandbox=modal` defines its sandboxes' image from inside a trainer container
    (sandbox/modal_backend.py: images/sandbox.Dockerfile, context = the checkout's root there):
    every file that Dockerfile's COPY lines take must be in the trainer image at that root."""
    from recipe.retool.modal_common import REMOTE_ROOT
    from sandbox import modal_backend

    image = describe("sft")["functions"]["train_dapo_gpu"]["image"]
    remote = {Path(dest) for _, dest in image["files"]}
    dockerfile = harness.REPO / modal_backend.DOCKERFILE
    sources = [line.split()[1] for line in dockerfile.read_text().splitlines()
               if line.startswith("COPY ") and "--from" not in line]  # fmt: skip
    assert sources, "the sandbox Dockerfile copies nothing?"
    wanted = [REMOTE_ROOT / modal_backend.DOCKERFILE, *(REMOTE_ROOT / s for s in sources)]
    missing = [str(w) for w in wanted if not any(r == w or w in r.parents for r in remote)]
    assert not missing


def test_the_app_files_tops_need_only_modal_in_their_containers(describe, containers) -> None:
    """The trainer image's heavy packages are imported in bodies only: the modules import in a
    container whose Python has modal alone (a subset of every image)."""
    light = harness.client_venv()
    for name, function in (("sft", "train_gpu"), ("serve", "chat"), ("check", "run_snippet")):
        run = harness.Container(describe(name), function, containers, python=light).run([])
        assert "import_error" not in run.record, (name, run.record.get("import_error"))


# ---- the trainer's CPU functions on fixture volumes ---------------------------------------------


def trainer_volumes(root: Path) -> dict[str, Path]:
    volumes = {str(m): root / m.name for m in (paths.DATA_MOUNT, paths.MODELS_MOUNT,
                                               paths.CHECKPOINTS_MOUNT)}  # fmt: skip
    for directory in volumes.values():
        directory.mkdir(parents=True, exist_ok=True)
    return volumes


def host_layout(volumes: dict[str, Path]) -> paths.Layout:
    """The volumes' host directories, laid out as the container sees them at their mounts."""
    return paths.Layout(*(volumes[str(m)] for m in (paths.DATA_MOUNT, paths.MODELS_MOUNT,
                                                    paths.CHECKPOINTS_MOUNT)))  # fmt: skip


@pytest.fixture(scope="module")
def fixture_volumes(containers) -> dict[str, Path]:
    """A tokenizer where the base model goes, the sample sources on the data volume, one
    complete SFT step: enough for prep, the checks, listing and the pipeline's status."""
    from recipe.retool.data.tiny_model import build_tokenizer
    from recipe.retool.local import samples

    volumes = trainer_volumes(containers / "fixture")
    layout = host_layout(volumes)
    build_tokenizer(1024).save_pretrained(layout.model_dir())
    samples.write_sources(layout.data / "sources")
    make_step(layout, "sft", "exp", 62)
    mark_tracked(layout, "sft", "exp", 62)
    (layout.experiment_dir("sft", "exp") / "report.md").write_text("# sft run: exp\n")
    return volumes


def in_container(describe, containers, volumes, function: str,
                 *steps: dict) -> harness.ContainerRun:  # fmt: skip
    container = harness.Container(describe("sft"), function, containers, volumes=volumes)
    run = container.run(list(steps))
    assert "import_error" not in run.record, run.stderr[-3000:]
    return run


def test_prep_runs_on_the_sample_sources_in_its_container(describe, containers, fixture_volumes):
    sources = f"{paths.DATA_MOUNT}/sources"
    run = in_container(describe, containers, fixture_volumes, "prep_dataset",
                       {"call": "prep_dataset", "kwargs": {"on_error": "skip",
                                                           "source_dir": sources}})  # fmt: skip
    assert run.step(0)["exit"] == 0, run.stderr[-3000:]
    layout = host_layout(fixture_volumes)
    assert layout.sft_train_file().exists() and layout.rl_file("aime_2025").exists()
    # what a Modal container does with its volumes: reload before, commit after
    assert {(c["how"], c["function"]) for c in run.calls()} >= {
        ("reload", paths.MODELS_VOLUME),
        ("commit", paths.DATA_VOLUME),
    }


def test_checkpoints_are_listed_and_merges_refused_in_one_line(
    describe, containers, fixture_volumes
) -> None:
    run = in_container(describe, containers, fixture_volumes, "list_checkpoints",
                       {"call": "list_checkpoints"})  # fmt: skip
    table = run.step(0)["returned"]
    assert "sft   exp" in table and "complete" in table
    assert f"{paths.CHECKPOINTS_MOUNT}/sft-experiments/exp/global_step_62" in table
    run = in_container(describe, containers, fixture_volumes, "merge_checkpoint",
                       {"call": "merge_checkpoint", "args": ["exp", 62]},
                       {"call": "merge_checkpoint", "args": ["exp", 7]})  # fmt: skip
    assert (run.step(0)["exit"], run.step(1)["exit"]) == (2, 2)
    lines = run.stderr.strip().splitlines()
    assert lines == [
        f"error: no FSDP checkpoint at {paths.CHECKPOINTS_MOUNT}/sft-experiments/exp/"
        "global_step_62 (missing fsdp_config.json)",
        f"error: no FSDP checkpoint at {paths.CHECKPOINTS_MOUNT}/sft-experiments/exp/"
        "global_step_7 (missing fsdp_config.json)",
    ]


def test_the_pipelines_status_results_and_wandb_sync_run_in_their_containers(
    describe, containers, fixture_volumes
) -> None:
    run = in_container(describe, containers, fixture_volumes, "pipeline_status",
                       {"call": "pipeline_status", "args": ["exp"]})  # fmt: skip
    from recipe.retool.workflows.pipeline import stage_done

    assert run.step(0)["returned"] == stage_done(host_layout(fixture_volumes), "exp")
    assert "sft       pending" in run.stdout  # a step, but no checkpoint_info.json: not done
    run = in_container(describe, containers, fixture_volumes, "result_files",
                       {"call": "result_files", "args": ["exp"]})  # fmt: skip
    assert list(run.step(0)["returned"]) == ["sft-experiments/exp/report.md"]
    run = in_container(describe, containers, fixture_volumes, "wandb_sync",
                       {"call": "wandb_sync"})  # fmt: skip
    assert run.step(0)["exit"] == 0
    assert "no offline wandb runs on the checkpoints volume" in run.stdout


# ---- launches: checked before a GPU, and failures that stay failed -----------------------------


def test_the_launch_check_refuses_mistakes_and_passes_a_good_launch(
    describe, containers, fixture_volumes
) -> None:
    run = in_container(
        describe, containers, fixture_volumes, "check_launch",
        {"call": "check_launch", "args": ["sft", ["trainer.total_epoch=2"]]},
        {"call": "check_launch", "args": ["dapo", ["--sft-checkpoint=nope"]]},
        {"call": "check_launch", "args": ["dapo", ["--experiment-name=d1"]]},
        {"call": "check_launch", "args": ["eval", [], 1, {"checkpoint": "dapo"}]},
    )  # fmt: skip
    bad, missing, good, evaluation = (run.step(i)["returned"] for i in range(4))
    assert bad["error"].startswith("unknown key 'trainer.total_epoch'")
    assert "nope" in missing["error"], missing
    assert good["error"] is None, (good, run.stderr[-3000:])
    start = f"DAPO starts from {paths.CHECKPOINTS_MOUNT}/sft-experiments/exp/global_step_62"
    assert any(line.startswith(start) for line in good["lines"])
    # the node sandbox started in the trainer's container and ran a test program there
    assert "sandbox: http://127.0.0.1:18080/run_code ran a test program" in good["lines"]
    assert "no complete dapo checkpoint" in evaluation["error"].lower()


def test_a_mistake_found_on_the_gpu_node_fails_every_retry_at_once(describe, containers) -> None:
    """Defect 5: a deterministic failure of `train_dapo` returned None, so Modal counted its
    first attempt a success. Each attempt is a container of the same function call; the line
    stays on the checkpoints volume, and the retry fails with it before anything else runs."""
    volumes = trainer_volumes(containers / "retries")
    container = harness.Container(describe("sft"), "train_dapo_gpu", containers, volumes=volumes)
    steps = [{"call": "train_dapo_gpu", "args": ["--experiment-name=d1"]}]  # no SFT yet
    first = container.run(steps, call_id="fc-retry01")
    again = container.run(steps, call_id="fc-retry01")
    assert (first.step(0)["exit"], again.step(0)["exit"]) == (2, 2), first.stderr[-2000:]
    line = first.stderr.strip().splitlines()[-1]
    assert line == (
        f"error: no complete sft checkpoint under {paths.CHECKPOINTS_MOUNT}/sft-experiments; run "
        "the sft stage first (or pass an explicit checkpoint path)"
    )
    assert again.stderr.strip().splitlines() == [line]
    marker = host_layout(volumes).failed_call_file("fc-retry01")
    assert marker.read_text() == line + "\n"
    committed = {(c["how"], c["function"]) for c in first.calls()}
    assert ("commit", paths.CHECKPOINTS_VOLUME) in committed
