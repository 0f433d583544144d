#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv with the exact versions of requirements.lock.
# Re-runnable: a complete environment is detected by a stamp that records the lock file's hash (scripts/venv_lib.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv_lib.sh"
venv_open setup .venv "$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)" \
    "requirements.lock (a few minutes the first time)"
pip_steps() {
    "$venv/bin/python" -m pip install --upgrade pip
    # torch first and alone: an unpinned resolution could pull a multi-GB CUDA build.
    "$venv/bin/python" -m pip install "$(grep -E '^torch==' requirements.lock)"
    "$venv/bin/python" -m pip install -r requirements.lock
    "$venv/bin/python" -m pip install --no-deps -e .
}
venv_install pip_steps
# DeepSpeed's CPU all-reduce op is JIT-built by the first process that starts a process group on CPU (~1 minute on
# 2 cores); build it here, once, into the project's cache, so no test or demo run of a new environment pays for it.
# With the venv's ninja, as scripts/test.sh and scripts/demo.sh use (another ninja would rebuild it).
PATH="$venv/bin:$PATH" DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}" "$venv/bin/python" -c \
    'from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder("ShareMemCommBuilder").load()' \
    >>"$log" 2>&1 || echo "setup: DeepSpeed's CPU all-reduce op did not build now (see $log); the first CPU run builds it"
venv_ready
