#!/usr/bin/env bash
# Set up the environment (re-used when complete) and run the test suite on CPU. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not multiprocess"` for the quick in-process tests only.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# The inference server's own environment (vLLM pins another torch and transformers): the served-teacher tests
# (tests/test_served.py, marked vllm) start one real vLLM server from it.
bash scripts/setup_vllm.sh
export DS_ACCELERATOR=cpu
# The venv first on PATH, as in an activated venv, for every process of the suite: torch JIT-builds DeepSpeed's ops with
# the first `ninja` on PATH, and the system's and the venv's ninja do not read each other's build log, so a mix
# rebuilt the CPU all-reduce op (~55 s) whenever the suite switched between them (docs/performance.md).
export PATH="$root/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="$root/.cache/torch_extensions"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Lint and format first (seconds): the style cannot drift, and a failure names the file and line.
.venv/bin/ruff check .
.venv/bin/ruff format --check --quiet . || { echo "test.sh: run '.venv/bin/ruff format .' to format the files above"; exit 1; }
exec .venv/bin/python -m pytest "$@"
