"""``make check-images``' logic on the real files and on broken fixtures (the resolve itself needs
the network and runs in its own workflow, .github/workflows/images.yml)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from sandbox import runtime

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_images", REPO / "scripts" / "check_images.py")
check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = check
spec.loader.exec_module(check)

TORCH_211 = {  # requirements of PyPI's torch 2.11.0 (its wheel's METADATA), abridged
    "name": "torch",
    "version": "2.11.0",
    "requires_dist": [
        "filelock",
        'cuda-toolkit[cublas,cudart]==13.0.2; platform_system == "Linux"',
        'cuda-bindings<14,>=13.0.3; platform_system == "Linux"',
        'nvidia-cudnn-cu13==9.19.0.56; platform_system == "Linux"',
        'nvidia-nccl-cu13==2.28.9; platform_system == "Linux"',
        'triton==3.6.0; platform_system == "Linux"',
    ],
}


def report(*metadata: dict) -> dict:
    return {"install": [{"metadata": m} for m in metadata]}


def test_the_real_images_pass_the_static_checks() -> None:
    assert check.static_problems(REPO) == []
    assert check.base_image((REPO / "images" / "trainer.Dockerfile").read_text()) == (13, 39)


def test_the_pip_sets_come_from_constraints_pyproject_and_the_sandbox_runtime() -> None:
    pins = check.reqs.constraints(REPO)
    trainer = check.reqs.trainer(REPO)
    assert trainer[:2] == [f"verl[vllm]=={pins['verl']}", f"liger-kernel=={pins['liger-kernel']}"]
    assert "transferqueue==0.1.11" in trainer
    assert check.reqs.sandbox(REPO) == [f"{n}=={v}" for n, v in runtime.USER_PACKAGES.items()]


def test_a_pin_that_differs_from_constraints_is_reported() -> None:
    constraints = {"verl": "0.9.1", "huggingface-hub": "1.33.0"}
    sets = {
        "a": ["verl[vllm]==0.9.0", "Huggingface_Hub==1.33.0", "vllm==0.24.0"],
        "b": ["verl>=0.9", 'verl==0.9.1; python_version >= "3.11"'],
    }
    assert check.pin_problems(sets, constraints) == [
        "a: verl[vllm]==0.9.0 but constraints.txt has verl==0.9.1"
    ]


def test_pins_spelled_out_in_a_dockerfile_are_found() -> None:
    text = (
        "ARG TOOL_VERSION=1.0\nFROM x\nARG CUDA=13.0\n"
        'RUN pip install "verl[vllm]==0.9.0" liger-kernel==0.8.5 \\\n    && echo a==b\n'
        "COPY x==1.0 /y\n"
    )
    assert check.dockerfile_pins(text) == ["verl[vllm]==0.9.0", "liger-kernel==0.8.5"]


def test_a_broken_repository_copy_is_reported(tmp_path: Path) -> None:
    for name in ("constraints.txt", "pyproject.toml", "images", "sandbox/runtime.py"):
        source, target = REPO / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    assert check.static_problems(tmp_path) == []
    (tmp_path / "images" / "trainer_requirements.py").unlink()
    text = (tmp_path / "images" / "trainer.Dockerfile").read_text()
    (tmp_path / "images" / "trainer.Dockerfile").write_text(text + 'RUN pip install "verl==0.8"\n')
    (tmp_path / "sandbox" / "runtime.py").write_text('USER_PACKAGES: dict = {"numpy": "1.0"}\n')
    problems = check.static_problems(tmp_path)
    assert len(problems) == 3
    assert "'images/trainer_requirements.py' not in" in problems[0]
    assert problems[1:] == [
        "images/trainer.Dockerfile: verl==0.8 but constraints.txt has verl==0.9.1",
        "trainer_requirements.py sandbox: numpy==1.0 but constraints.txt has numpy==2.4.6",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "ARG CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04\nFROM ${CUDA_IMAGE}\n",
            (12, 39),
        ),
        ("FROM docker.io/nvidia/cuda:13.0.2-runtime-ubuntu22.04 AS base\n", (13, 35)),
    ],
)
def test_the_base_images_cuda_and_glibc_are_read(text: str, expected: tuple[int, int]) -> None:
    assert check.base_image(text) == expected


def test_a_base_that_is_not_a_known_cuda_image_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"python:3\.12"):
        check.base_image("FROM python:3.12-slim\n")


def test_platform_tags_reach_down_from_the_bases_glibc() -> None:
    tags = check.platforms(39)
    assert tags[0] == "manylinux_2_39_x86_64" and "manylinux_2_17_x86_64" in tags
    assert tags[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def test_torchs_cuda_major_comes_from_its_wheel_requirements() -> None:
    assert check.cuda_majors(TORCH_211) == {13}
    assert check.cuda_majors({"requires_dist": ["filelock", "sympy>=1.13"]}) == set()


def test_resolve_problems_name_a_cuda_mismatch_and_missing_packages() -> None:
    present = [{"name": n, "version": "1"} for n in ("vllm", "verl", "transformers")]
    full = report(TORCH_211, *present, {"name": "TransferQueue", "version": "0.1.11"})
    assert check.resolve_problems(full, 13) == []
    assert check.resolve_problems(full, 12) == [
        "torch 2.11.0 is built for CUDA [13], the trainer base image has CUDA 12"
    ]
    cpu_torch = {"name": "torch", "version": "2.13.0", "requires_dist": ["filelock"]}
    assert check.resolve_problems(report(cpu_torch, *present), 13) == [
        "trainer set: no transferqueue",
        "torch 2.13.0 is built for CUDA none, the trainer base image has CUDA 13",
    ]


def test_the_trainer_image_installs_with_a_lock_that_agrees_with_constraints(tmp_path) -> None:
    for name in ("constraints.txt", "pyproject.toml", "images"):
        source, target = REPO / name, tmp_path / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    assert check.lock_problems(tmp_path) == []
    lock = tmp_path / "images" / "trainer-constraints.txt"
    assert check.read_pins(lock)["torch"] == "2.11.0"  # the image's torch, not CI's 2.13.0
    lock.write_text(lock.read_text().replace("accelerate==1.15.0", "accelerate==9.9"))
    dockerfile = tmp_path / "images" / "trainer.Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("-c /tmp/deps/images/", "-r /tmp/"))
    lock_name = "images/trainer-constraints.txt"
    assert check.lock_problems(tmp_path) == [
        f"images/trainer.Dockerfile: the pip install does not use -c {lock_name}",
        f"{lock_name}: accelerate==9.9 but constraints.txt has accelerate==1.15.0",
    ]


def test_a_resolve_that_installs_an_unpinned_version_is_reported() -> None:
    report = {"install": [{"metadata": {"name": "Foo_Bar", "version": "2.0"}},
                          {"metadata": {"name": "torch", "version": "2.11.0"}}]}  # fmt: skip
    assert check.unpinned(report, {"torch": "2.11.0", "foo-bar": "1.0"}) == [
        "foo-bar 2.0 is not pinned in images/trainer-constraints.txt (1.0)"
    ]


# ---- what a RUN line calls -------------------------------------------------------------------

# The trainer image's install line before issue 32's fix: python3.12's packages, then two calls
# of /usr/bin/python3, which only python3-minimal (pulled by `python3`) provides.
UBUNTU_PYTHON = """FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends {packages} \\
    && python3.12 -m venv /opt/venv
RUN pip install verl \\
    && pip --python /usr/bin/python3 install --break-system-packages numpy \\
    && /usr/bin/python3 -c "import numpy; print(1)"
"""


def test_an_interpreter_a_run_line_calls_but_nothing_installs_is_reported() -> None:
    text = UBUNTU_PYTHON.format(packages="python3.12 python3.12-venv python3.12-dev git")
    missing = (
        "trainer.Dockerfile line 5: RUN calls /usr/bin/python3, which neither the base image "
        "nor an installed package provides (there is /usr/bin/python3.12)"
    )
    assert check.call_problems(text, "trainer.Dockerfile") == [missing, missing]
    fixed = UBUNTU_PYTHON.format(packages="python3 python3.12 python3.12-venv")
    assert check.call_problems(fixed, "trainer.Dockerfile") == []


def test_the_trainer_image_as_it_was_is_caught_and_as_it_is_passes() -> None:
    """Defect 3 of issue 32: images/trainer.Dockerfile called /usr/bin/python3 (the sandbox's
    interpreter) on a base where only python3.12 was installed."""
    import subprocess

    dockerfile = REPO / "images" / "trainer.Dockerfile"
    assert check.call_problems(dockerfile.read_text(), "t") == []
    old = subprocess.run(["git", "-C", str(REPO), "show", "9988b29:images/trainer.Dockerfile"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if old.returncode != 0:
        pytest.skip("the pre-fix Dockerfile is not in this clone's history (shallow clone)")
    problems = check.call_problems(old.stdout, "t")
    assert problems and all("RUN calls /usr/bin/python3," in p for p in problems)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("FROM python:3.11-slim-bookworm\nRUN python -c 'print(1)' && pip3.11 --version\n", None),
        ("FROM python:3.11-slim\nENV SANDBOX_PYTHON=/usr/bin/python3\n",
         "d line 2: ENV SANDBOX_PYTHON=/usr/bin/python3, which the image does not have"),
        ("FROM nvidia/cuda:13.0.2-base-ubuntu24.04\nRUN FOO=1 python3 -V\n",
         "d line 2: RUN calls python3, which neither the base image nor an installed package "
         "provides"),
        ("FROM nvidia/cuda:13.0.2-base-ubuntu24.04\nRUN apt-get install -y bubblewrap=0.9 "
         "&& /usr/bin/bwrap --version | head -1\n", None),
    ],
    ids=["python-base", "env-path", "no-python-on-cuda", "apt-binary"],
)  # fmt: skip
def test_interpreters_come_from_the_base_apt_or_a_venv(text: str, problem: str | None) -> None:
    assert check.call_problems(text, "d") == ([problem] if problem else [])
