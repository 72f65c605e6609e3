#!/usr/bin/env bash
# Idempotent local install: .venv with the CPU torch wheel, the project (editable) and dev tools.
# torch is installed first and alone so that no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -c constraints.txt -e '.[dev]'

# bubblewrap isolates sandboxed code; install it where we may (root with apt), else say why not.
if ! command -v bwrap >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null
    else
        echo "note: bubblewrap (bwrap) is missing; install it for the sandbox's full isolation" >&2
    fi
fi
echo "setup done: $("$VENV/bin/python" -c 'import verl, torch; print("verl", verl.__version__, "torch", torch.__version__)')"
