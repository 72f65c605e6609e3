"""images/ and compose.yaml checked without a Docker engine: the files compose and Modal build from.

Every check runs on the real files and, to show it can fail, on a deliberately broken copy.
hadolint and the compose-spec schema run as pre-commit hooks (``make lint``).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

pytest.importorskip("modal")  # dev-only: absent on a GPU box with the trainer image's set

import modal
import yaml

from recipe.retool.core import paths
from tests.images import dockerfiles as d

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
DOCKERFILES = sorted((REPO / "images").glob("*Dockerfile"))
MODAL_APPS = sorted((REPO / "recipe" / "retool").glob("*.py"))


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def build_contexts() -> list[tuple[Path, Path]]:
    """Every (Dockerfile, context) pair either compose or a Modal app builds with."""
    pairs = {(b.dockerfile, b.context) for b in d.compose_builds(COMPOSE)}
    for module in MODAL_APPS:
        pairs |= {(f, c or REPO) for f, c in d.modal_dockerfiles(module)}
    return sorted(pairs)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- COPY sources ------------------------------------------------------------------------------


def test_every_dockerfile_is_built_somewhere() -> None:
    assert DOCKERFILES, "no Dockerfiles under images/"
    assert {f for f, _ in build_contexts()} == set(DOCKERFILES)


@pytest.mark.parametrize(
    ("dockerfile", "context"),
    build_contexts(),
    ids=[f"{f.name}@{c.relative_to(REPO)}" for f, c in build_contexts()],
)
def test_copy_sources_exist_in_the_build_context(dockerfile: Path, context: Path) -> None:
    assert d.copy_source_problems(dockerfile, context) == []


def test_missing_copy_source_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "here.txt", "x")
    dockerfile = write(
        tmp_path / "x.Dockerfile",
        "FROM scratch\nCOPY here.txt /\n# a comment\nCOPY --chown=1:1 \\\n    gone.txt /\n"
        'COPY ["nope/", "/x/"]\nCOPY --from=builder /not/in/context /\n',
    )
    problems = d.copy_source_problems(dockerfile, tmp_path)
    assert len(problems) == 2
    assert "line 4: 'gone.txt'" in problems[0] and "'nope/'" in problems[1]


def test_dockerignore_dropping_a_copied_file_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "pkg" / "mod.py", "")
    write(tmp_path / "pkg" / "data" / "table.csv", "")
    dockerfile = write(tmp_path / "x.Dockerfile", "FROM scratch\nCOPY pkg ./pkg\n")
    assert d.copy_source_problems(dockerfile, tmp_path) == []
    write(tmp_path / ".dockerignore", "**/*.csv\n")
    assert d.copy_source_problems(dockerfile, tmp_path) == [
        "x.Dockerfile line 2: pkg/data/table.csv is excluded by .dockerignore"
    ]
    # a Dockerfile-specific ignore file wins, as in BuildKit and Modal
    write(tmp_path / "x.Dockerfile.dockerignore", "nothing\n")
    assert d.copy_source_problems(dockerfile, tmp_path) == []


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    ignored = modal.FilePatternMatcher(*(REPO / ".dockerignore").read_text().splitlines())
    for path in (".env", ".venv/bin/python", "runs/x/data/a.parquet", ".git/HEAD", ".cache/m"):
        assert ignored(Path(path)), path
    for path in ("x.whl", "docs/gpu-runs/run.md", "recipe/retool/__pycache__/a.pyc"):
        assert ignored(Path(path)), path
    assert not ignored(Path("recipe/retool/launch.py"))


# ---- ARGs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_variable_used_at_build_time_is_declared(dockerfile: Path) -> None:
    assert d.undeclared_variable_problems(d.parse(dockerfile.read_text())) == []


def test_undeclared_and_out_of_scope_args_are_reported() -> None:
    text = """ARG BASE=debian:12
ARG VERSION=1
FROM ${BASE}
ARG TOOL=2
ENV PATH=/opt/bin:$PATH HOME_DIR=/h
RUN for f in a b; do echo "$f"; done && X=1 && echo $X ${TOOL} '$NOT_EXPANDED' $HOME_DIR
RUN pip install "thing==${VERSION}" && echo ${TYPO}
"""
    problems = d.undeclared_variable_problems(d.parse(text))
    # VERSION is declared before FROM only: invisible to RUN unless re-declared in the stage
    assert problems == [
        "line 7: RUN uses $VERSION, not declared",
        "line 7: RUN uses $TYPO, not declared",
    ]


def test_compose_services_build_existing_dockerfiles_with_declared_args() -> None:
    builds = d.compose_builds(COMPOSE)
    assert {b.service for b in builds} >= {"trainer", "smoke", "sandbox", "sandbox-fusion"}
    assert d.build_problems(builds) == []
    trainer = next(b for b in builds if b.service == "trainer")
    assert "CUDA_IMAGE" in trainer.args


def test_build_problems_are_reported(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.Dockerfile", "ARG BASE=x\nFROM ${BASE}\nARG KNOB=1\n")
    compose_file = write(
        tmp_path / "compose.yaml",
        "services:\n"
        "  ok: {build: {context: ., dockerfile: images/a.Dockerfile, args: [BASE, KNOB=2]}}\n"
        "  typo: {build: {context: ., dockerfile: images/a.Dockerfile, args: {KNBO: 2}}}\n"
        "  gone: {build: {context: images, dockerfile: images/a.Dockerfile}}\n",
    )
    problems = d.build_problems(d.compose_builds(compose_file))
    assert len(problems) == 2
    assert "service typo: build arg KNBO" in problems[0]
    assert problems[1].startswith("service gone: no Dockerfile")


# ---- compose mirrors Modal ---------------------------------------------------------------------


def test_modal_builds_the_dockerfiles_compose_builds_with_the_same_context() -> None:
    modal_pairs = {pair for m in MODAL_APPS for pair in d.modal_dockerfiles(m)}
    assert {f.name for f, _ in modal_pairs} >= {"trainer.Dockerfile", "sandbox.Dockerfile"}
    compose_pairs = {(b.dockerfile, b.context) for b in d.compose_builds(COMPOSE)}
    assert modal_pairs <= compose_pairs


def test_modal_dockerfile_calls_are_found_and_resolved(tmp_path: Path) -> None:
    app = write(
        tmp_path / "recipe" / "app.py",
        "from pathlib import Path\nimport modal\n"
        "ROOT: Path = Path(__file__).resolve().parents[1]\n"
        'img = modal.Image.from_dockerfile(ROOT / "images" / "x.Dockerfile", context_dir=ROOT)\n'
        'other = modal.Image.from_dockerfile(path=ROOT.parent / "y.Dockerfile")\n',
    )
    assert d.modal_dockerfiles(app) == [
        (tmp_path / "images" / "x.Dockerfile", tmp_path),
        (tmp_path.parent / "y.Dockerfile", None),
    ]
    write(app, 'import modal\nmodal.Image.from_dockerfile(some_function() + "x")\n')
    with pytest.raises(ValueError, match="cannot resolve"):
        d.modal_dockerfiles(app)


def test_trainer_volumes_mount_where_modal_mounts_them() -> None:
    modal_mounts = {
        PurePosixPath(str(p))
        for p in (paths.DATA_MOUNT, paths.MODELS_MOUNT, paths.CHECKPOINTS_MOUNT)
    }
    assert modal_mounts <= d.mount_targets(compose()["services"]["trainer"])
    assert d.mount_targets({"volumes": ["./a:/data:ro", {"type": "volume", "target": "/m"}]}) == {
        PurePosixPath("/data"),
        PurePosixPath("/m"),
    }


# ---- services ----------------------------------------------------------------------------------


def _has_healthcheck(name: str, service: dict) -> bool:
    if service.get("healthcheck", {}).get("test"):
        return True
    build = next((b for b in d.compose_builds(COMPOSE) if b.service == name), None)
    return build is not None and any(
        ins.keyword == "HEALTHCHECK" for ins in d.parse(build.dockerfile.read_text())
    )


def test_services_waited_on_have_healthchecks() -> None:
    services = compose()["services"]
    waited = {
        dep
        for s in services.values()
        for dep, cond in (s.get("depends_on") or {}).items()
        if cond.get("condition") == "service_healthy"
    }
    assert waited
    assert all(_has_healthcheck(name, services[name]) for name in waited)
    assert not _has_healthcheck("x", {"image": "busybox"})


def test_smoke_runs_against_the_sandbox_service_once_healthy() -> None:
    services = compose()["services"]
    smoke = services["smoke"]
    endpoint = smoke["environment"]["SANDBOX_FUSION_ENDPOINT"]
    host, port = endpoint.split("//")[1].split("/")[0].split(":")
    assert host in services and smoke["depends_on"][host]["condition"] == "service_healthy"
    container_ports = {p.rsplit(":", 1)[1] for p in services[host]["ports"]}
    assert port in container_ports
    assert smoke["build"] == services["trainer"]["build"]  # the trainer image, not another one


def test_gpus_only_behind_a_profile() -> None:
    """`docker compose up` and the CPU smoke must work on a machine without GPUs."""
    services = compose()["services"]
    with_gpus = {
        name
        for name, s in services.items()
        if s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    }
    assert with_gpus == {"trainer"}
    assert all(services[name].get("profiles") for name in with_gpus)


def test_sandbox_gets_namespaces_without_privileged_mode() -> None:
    sandbox = compose()["services"]["sandbox"]
    assert not sandbox.get("privileged")
    assert set(sandbox["cap_add"]) == {"SYS_ADMIN", "NET_ADMIN"}
    assert "SANDBOX_ALLOW_INSECURE" not in str(sandbox.get("environment", ""))
    assert "env_file" not in sandbox  # no secrets where user code runs
    # published on localhost only: it runs arbitrary code
    assert all(str(p).startswith("127.0.0.1:") for p in sandbox["ports"])


def test_trainer_image_holds_dependencies_only_so_code_edits_never_rebuild_it() -> None:
    """Modal builds everything after FROM as one layer: copying code in would rebuild vLLM on
    every edit. Only the files that declare dependencies are copied; the code arrives via
    add_local_dir (Modal) or a bind mount."""
    instructions = d.parse((REPO / "images" / "trainer.Dockerfile").read_text())
    copied = {s for ins in instructions if ins.keyword == "COPY" for s in d.copy_sources(ins)}
    assert copied == {
        "constraints.txt",
        "pyproject.toml",
        "images/trainer_requirements.py",
        "images/trainer-constraints.txt",
        "sandbox/runtime.py",
    }
