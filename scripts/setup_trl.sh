#!/usr/bin/env bash
# Create (or reuse) TRL's own virtualenv in .venv-trl for scripts/bench_peer.py (issue 28: ds-distill against TRL on
# the same batches). TRL is not a dependency of the toolkit nor of its tests, so it lives apart from .venv. Pins
# (requirements-trl.lock): torch and transformers as requirements.lock, so both systems run the same kernels and model
# code; trl's exact version. About 1 GB and a few minutes the first time.
# Re-runnable: a complete environment is detected by a stamp that records the lock file's hash (scripts/venv_lib.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv_lib.sh"
lock="$root/requirements-trl.lock"
venv_open setup_trl .venv-trl "$(sha256sum "$lock" | cut -c1-16)" "requirements-trl.lock (a few minutes the first time)"
pip_steps() {
    # torch first and alone, pinned: an unpinned resolution could pull a multi-GB CUDA build.
    "$venv/bin/python" -m pip install "$(grep -E '^torch==' "$lock")"
    "$venv/bin/python" -m pip install -r "$lock"
    "$venv/bin/python" -c "import trl, torch, transformers; print('trl', trl.__version__, 'torch', torch.__version__)"
}
venv_install pip_steps
venv_ready
