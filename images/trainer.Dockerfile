# syntax=docker/dockerfile:1
# Trainer image: CUDA 13, vLLM 0.24.0 and torch 2.11.0 (as verl 0.9.1's [vllm] extra pins them),
# verl 0.9.1, liger-kernel, this project's Python dependencies, and the sandbox's runtime. Built by
# docker compose (compose.yaml) and by Modal (modal.Image.from_dockerfile in
# recipe/retool/modal_common.py), which adds the project's code on top, last, so code edits never
# rebuild these layers. `make check-images` proves without Docker that the pip sets below resolve
# for this platform and that this base's CUDA major is torch's.
#
# Attention: no flash-attn. verl's packed (remove-padding) micro-batches run on torch's own varlen
# flash attention (recipe/retool/verl_plugins/varlen_attention.py), so nothing is compiled here.
# verl publishes no image tagged for 0.9.x, so we start from NVIDIA's CUDA devel image (nvcc for
# vLLM's and FlashInfer's JIT kernels), as verl's own vLLM images do. PyPI's torch 2.11.0 is a CUDA
# 13.0 build (it pulls cuda-toolkit 13.0.2): the base's CUDA major must match it.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False \
    NCCL_NVLS_ENABLE=0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# bubblewrap: the sandbox's isolation. python3.12 is Ubuntu 24.04's; the trainer gets a virtualenv,
# the sandbox runs user code with the system interpreter, /usr/bin/python3 (readable by its
# unprivileged uids; the sandbox looks there first), which only `python3` (python3-minimal) puts
# there: python3.12's packages ship /usr/bin/python3.12 alone. Each DAPO node runs that sandbox
# (recipe/retool/stages/tool_sandbox.py). `make check-images` checks every interpreter a RUN line
# calls.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3.12 python3.12-venv python3.12-dev git build-essential bubblewrap \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

# Only dependencies live in the image, computed from the files that declare them (versions from
# constraints.txt, the project's list from pyproject.toml, user-code packages from
# sandbox/runtime.py); the code arrives last (Modal's add_local_dir, compose's bind mount).
# images/trainer-constraints.txt pins every package the trainer set pulls in, so no indirect
# version drifts between builds (torch 2.11.0 here; CI's CPU venv runs torch 2.13.0).
WORKDIR /root/retool-modal
COPY constraints.txt pyproject.toml /tmp/deps/
COPY images/trainer_requirements.py images/trainer-constraints.txt /tmp/deps/images/
COPY sandbox/runtime.py /tmp/deps/sandbox/
RUN python3.12 /tmp/deps/images/trainer_requirements.py trainer --root /tmp/deps \
        > /tmp/deps/trainer.txt \
    && python3.12 /tmp/deps/images/trainer_requirements.py sandbox --root /tmp/deps \
        > /tmp/deps/sandbox.txt \
    && pip install -c /tmp/deps/images/trainer-constraints.txt -r /tmp/deps/trainer.txt \
    && pip --python /usr/bin/python3 install --break-system-packages -r /tmp/deps/sandbox.txt \
    && python -c "import verl, vllm, torch, transfer_queue, liger_kernel, math_verify, matplotlib; \
from torch.nn.attention.varlen import varlen_attn; print('torch', torch.__version__, torch.version.cuda)" \
    && /usr/bin/python3 -c "import numpy, sympy" \
    && rm -rf /tmp/deps

ENV PYTHONPATH=/root/retool-modal
CMD ["bash"]
