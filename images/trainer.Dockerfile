# syntax=docker/dockerfile:1
# Trainer image: CUDA, vLLM 0.24.0 (the version verl 0.9.1's [vllm] extra pins), verl 0.9.1,
# flash-attn, and this project's Python dependencies. Built by docker compose (compose.yaml) and by
# Modal (modal.Image.from_dockerfile in recipe/retool/modal_common.py), which adds the
# project's code on top, last, so code edits never rebuild these layers.
# verl publishes no image tagged for 0.9.x, so we start from NVIDIA's CUDA devel image as verl's
# own vLLM images do since 0.7.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG VERL_VERSION=0.9.1
ARG VLLM_VERSION=0.24.0
ARG TORCH_VERSION=2.11.0
ARG FLASH_ATTN_VERSION=2.8.3
ARG LIGER_VERSION=0.8.5

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False \
    NCCL_NVLS_ENABLE=0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# bubblewrap, and numpy/sympy for the system python: each DAPO node runs the project's sandbox
# (recipe/retool/tool_sandbox.py), whose user code runs on /usr/bin/python3, not the venv.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev git build-essential ninja-build bubblewrap \
        python3-numpy python3-sympy \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

# vLLM brings its CUDA torch; verl[vllm] pins the same torch and transformers.
RUN pip install "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" "verl[vllm]==${VERL_VERSION}" \
        "liger-kernel==${LIGER_VERSION}" \
    && MAX_JOBS=8 pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

WORKDIR /root/retool-modal
# Only dependencies live in the image. The project's code arrives last — Modal's add_local_dir,
# compose's bind mount of the repository — so a code edit never rebuilds the layers above.
# Versions come from constraints.txt (one source); only the packages vLLM/verl don't bring.
COPY constraints.txt /tmp/constraints.txt
RUN grep -E '^(math-verify|python-dotenv|httpx|matplotlib|uvloop|httptools)==' /tmp/constraints.txt \
        > /tmp/extra-requirements.txt \
    && pip install -r /tmp/extra-requirements.txt \
    && python -c "import verl, vllm, flash_attn, math_verify, matplotlib"

ENV PYTHONPATH=/root/retool-modal
CMD ["bash"]
