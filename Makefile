# retool-modal: every target is a thin wrapper around a script or a Python module.
# Knobs: override on the command line, e.g. `make sandbox PORT=9000`.
.DEFAULT_GOAL := help
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

VENV   ?= .venv
PY     ?= $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: setup
setup: ## Create .venv and install everything (idempotent; PyPI's torch unless PIP_EXTRA_INDEX_URL names the CPU index)
	@scripts/setup.sh

$(PY):
	@scripts/setup.sh

.PHONY: test
test: $(PY) ## Run the test suite (gpu-marked tests skip without CUDA + vLLM; GPU runs: test-gpu, dapo-curve, bench-*)
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the modules that hold gpu-marked tests are collected: a GPU box with the trainer image's
# packages lacks the dev-only ones (modal, hypothesis) that other test modules import.
GPU_TEST_FILES = $(shell grep -rl --include='test_*.py' 'pytest.mark.gpu' tests)

.PHONY: test-gpu
test-gpu: $(PY) ## On a GPU box with vLLM: the gpu-marked tests (vLLM evaluation, one main_ppo step)
	$(PY) -m pytest -m gpu $(GPU_TEST_FILES) $(PYTEST_ARGS)

.PHONY: local-smoke
local-smoke: $(PY) ## The whole pipeline end to end on a tiny model, on CPU (runs/<timestamp>/)
	$(PY) -m recipe.retool.local.smoke

.PHONY: lint
lint: $(PY) ## Check formatting, lint and static file checks (what CI runs)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) scripts/import_cycles.py
	$(PY) -m pre_commit run --all-files --show-diff-on-failure

.PHONY: fmt
fmt: $(PY) ## Format and auto-fix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# ---- Sandbox --------------------------------------------------------------------------------
PORT ?= 8080

.PHONY: sandbox
sandbox: $(PY) ## Serve the sandbox locally on PORT (default 8080; bubblewrap isolation)
	$(PY) -m sandbox serve --host 127.0.0.1 --port $(PORT)

.PHONY: bench-sandbox
bench-sandbox: $(PY) ## Benchmark the sandbox vs a naive subprocess server; writes docs/benchmarks.md
	$(PY) scripts/bench_sandbox.py

.PHONY: bench-tool-sandbox
bench-tool-sandbox: $(PY) ## DAPO-like tool calls (256 rollouts x 4 calls): node sandbox vs a simulated remote one
	$(PY) scripts/bench_tool_sandbox.py

.PHONY: bench-modal-pool
bench-modal-pool: $(PY) ## Per-call overhead of the Modal Sandbox pool (local backend) vs the node sandbox
	$(PY) scripts/bench_modal_pool.py

DEVICE ?= cpu

.PHONY: bench-logprobs
bench-logprobs: $(PY) ## verl's per-token log-prob loop vs the fused one (DEVICE=cuda on a GPU box)
	$(PY) scripts/bench_logprobs.py --device $(DEVICE)

# ---- Docker (compose.yaml; needs Docker with the compose plugin, and the NVIDIA toolkit for GPUs)
COMPOSE ?= docker compose
# The contract tests: every test using the `endpoint` fixture (marked `contract` by
# tests/sandbox/conftest.py: test_api's and test_compat's), sent to SANDBOX_FUSION_ENDPOINT.
PARITY_TESTS ?= tests/sandbox -m contract

CHECK_IMAGES_CACHE ?= /tmp/retool-check-images

.PHONY: check-images
check-images: $(PY) ## Without Docker: COPY sources, pins vs constraints.txt, the trainer pip set resolves for linux/cp312, CUDA base = torch's (~1 min of metadata)
	$(PY) scripts/check_images.py --cache $(CHECK_IMAGES_CACHE)

# tests/modal: the client with `pip install modal` alone, each container as Modal lays it out
# (bubblewrap); its tests are e2e-marked, selected here whatever pytest's default selection is.
.PHONY: check-modal
check-modal: $(PY) ## No Modal account needed: the Modal apps loaded and run as Modal does (client venv: modal only; containers in bubblewrap)
	$(PY) -m pytest -q -p no:cacheprovider -m "e2e or not e2e" tests/modal $(PYTEST_ARGS)

.PHONY: images
images: ## Build every image in compose.yaml (trainer, sandbox, sandbox-fusion)
	$(COMPOSE) --profile '*' build

.PHONY: local-smoke-docker
local-smoke-docker: ## make local-smoke inside the trainer image, against the sandbox container
	$(COMPOSE) --profile smoke up --build --attach smoke --exit-code-from smoke

.PHONY: sandbox-parity
sandbox-parity: $(PY) ## The sandbox contract tests against the real SandboxFusion (:8081) and ours (:8080)
	$(COMPOSE) --profile parity up --detach --build --wait sandbox sandbox-fusion
	rc=0; \
	SANDBOX_FUSION_ENDPOINT=http://127.0.0.1:8081 $(PY) -m pytest -q $(PARITY_TESTS) || rc=1; \
	SANDBOX_FUSION_ENDPOINT=http://127.0.0.1:8080 $(PY) -m pytest -q $(PARITY_TESTS) || rc=1; \
	$(COMPOSE) --profile parity stop sandbox sandbox-fusion; \
	exit $$rc

# ---- Modal (needs `modal token new` and a .env; see README) ------------------------------------
# sft, dapo, eval and pipeline run detached: the run outlives this terminal (Ctrl-C detaches), and
# each prints how to follow it. `make logs` / `make status` look in later.
GPUS ?= 8
ARGS ?=
MODAL_APP := recipe/retool/retool_modal_sft.py
MODAL_DETACHED := $(VENV)/bin/modal run --detach

.PHONY: sft
sft: $(PY) ## SFT on Modal, detached: make sft GPUS=8 ARGS="--experiment-name=x trainer.total_epochs=2"
	$(PY) -m recipe.retool.launch check sft --gpus $(GPUS) -- $(ARGS)
	RETOOL_GPUS=$(GPUS) $(MODAL_DETACHED) $(MODAL_APP)::train -- $(ARGS)

.PHONY: dapo
dapo: $(PY) ## DAPO on Modal from the latest SFT checkpoint, detached: make dapo ARGS="..."
	$(PY) -m recipe.retool.launch check dapo --gpus $(GPUS) -- $(ARGS)
	RETOOL_GPUS=$(GPUS) $(MODAL_DETACHED) $(MODAL_APP)::train_dapo -- $(ARGS)

CHECKPOINT ?= latest
EXPERIMENT ?= retool

.PHONY: eval
eval: $(PY) ## Evaluate on AIME 24/25 with tools on Modal, detached: make eval CHECKPOINT=latest|base|sft|PATH
	$(MODAL_DETACHED) $(MODAL_APP)::evaluate --checkpoint $(CHECKPOINT)

.PHONY: pipeline
pipeline: $(PY) ## download → prep → SFT → DAPO → eval on Modal, detached, skipping done stages (EXPERIMENT=retool)
	RETOOL_GPUS=$(GPUS) $(MODAL_DETACHED) $(MODAL_APP)::pipeline --experiment-name $(EXPERIMENT)

APP ?=

.PHONY: status
status: $(PY) ## Running and recent Modal apps, and where EXPERIMENT's pipeline stands
	$(VENV)/bin/modal app list
	$(VENV)/bin/modal run $(MODAL_APP)::pipeline_status --experiment $(EXPERIMENT)

.PHONY: logs
logs: $(PY) ## Follow a detached run's logs: make logs APP=ap-... (the id its launch printed)
	@test -n "$(APP)" || { echo "error: make logs APP=ap-... (the id a launch printed; make status lists them)" >&2; exit 2; }
	$(VENV)/bin/modal app logs $(APP) --follow

.PHONY: results
results: $(PY) ## Fetch EXPERIMENT's reports (run reports, metrics, eval reports; no weights) into runs/EXPERIMENT/
	$(VENV)/bin/modal run $(MODAL_APP)::results --experiment $(EXPERIMENT)

.PHONY: wandb-sync
wandb-sync: $(PY) ## Upload the offline wandb runs kept on the checkpoints volume (needs WANDB_API_KEY in .env)
	$(VENV)/bin/modal run $(MODAL_APP)::wandb_sync

.PHONY: deploy-sandbox
deploy-sandbox: $(PY) ## Deploy the sandbox to Modal (a web endpoint; prints its URL)
	$(VENV)/bin/modal deploy recipe/retool/modal_fusion_sandbox.py

.PHONY: serve
serve: $(PY) ## Deploy the trained model to Modal: OpenAI-compatible vLLM + /chat with tools
	$(VENV)/bin/modal deploy recipe/retool/serve.py

BENCH_ROOT ?= /tmp/retool-bench

.PHONY: bench-sft-gpu
bench-sft-gpu: $(PY) ## On a GPU box: SFT speed/memory matrix at the 7B shape (GPUS=4); see docs/benchmarks.md
	$(PY) scripts/bench_sft_gpu.py matrix --root $(BENCH_ROOT) --gpus $(GPUS)

MODE ?= sync

.PHONY: bench-dapo-gpu
bench-dapo-gpu: $(PY) ## On a GPU box with vLLM: DAPO at the production layout scaled to GPUS (random 1.5B-shape model): step split, tokens/s, memory; MODE=async (GPUS>=2) for verl's fully-async trainer
	$(PY) scripts/bench_dapo_gpu.py prepare --root $(BENCH_ROOT)/dapo
	$(PY) scripts/bench_dapo_gpu.py run --root $(BENCH_ROOT)/dapo --gpus $(GPUS) --rollout-mode $(MODE) --out $(BENCH_ROOT)/dapo/row.json

CURVE_GPUS ?= 1

.PHONY: dapo-curve
dapo-curve: $(PY) ## On a GPU box with vLLM: check the committed start on its held-out problems, DAPO 3 seeds + a shuffled-reward control, verdict (runs/curve-*)
	$(PY) -m recipe.retool.workflows.learning_curve --gpus $(CURVE_GPUS)

.PHONY: checkpoints
checkpoints: $(PY) ## List checkpoints on the Modal volume
	$(VENV)/bin/modal run $(MODAL_APP)::list_checkpoints
