#!/usr/bin/env bash
# Idempotent local install: .venv with torch (PyPI's wheel, or the CPU one when PIP_EXTRA_INDEX_URL
# names https://download.pytorch.org/whl/cpu), the project (editable) and dev tools.
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

# The sandbox (sandbox/) runs user code under bubblewrap with the *system* python3, which the
# unprivileged sandbox uids can read (a pyenv/venv python under /root cannot be); it needs the
# user-code packages (sandbox/runtime.py: numpy, sympy) there. Install them where we may (root with
# apt), else say why not.
RUNTIME_APT=$("$VENV/bin/python" -m sandbox.runtime)
RUNTIME_IMPORTS=$("$VENV/bin/python" -c 'from sandbox.runtime import USER_PACKAGES as p; print(", ".join(p))')
if ! command -v bwrap >/dev/null 2>&1 || ! /usr/bin/python3 -c "import $RUNTIME_IMPORTS" 2>/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        # shellcheck disable=SC2086  # one word per package
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            bubblewrap $RUNTIME_APT) >/dev/null
    else
        echo "note: the sandbox needs bubblewrap and $RUNTIME_APT (apt)" >&2
    fi
fi
echo "setup done: $("$VENV/bin/python" -c 'import verl, torch; print("verl", verl.__version__, "torch", torch.__version__)')"
