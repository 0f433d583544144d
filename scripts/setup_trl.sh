#!/usr/bin/env bash
# Create (or reuse) TRL's own virtualenv in .venv-trl for scripts/bench_peer.py (issue 28: ds-distill against TRL on
# the same batches). TRL is not a dependency of the toolkit nor of its tests, so it lives apart from .venv. Pins
# (requirements-trl.lock): torch and transformers as requirements.lock, so both systems run the same kernels and model
# code; trl's exact version. About 1 GB and a few minutes the first time.
# Re-runnable: a complete environment is detected by a stamp that records the lock file's hash.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
venv="$root/.venv-trl"
lock="$root/requirements-trl.lock"
stamp="$venv/.ds_distill_lock_sha"
want="$(sha256sum "$lock" | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
echo "setup_trl: creating $venv from requirements-trl.lock (a few minutes the first time)"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
log="$root/.cache/setup_trl.log"
mkdir -p "$root/.cache"
{
    # torch first and alone, pinned: an unpinned resolution could pull a multi-GB CUDA build.
    "$venv/bin/python" -m pip install "$(grep -E '^torch==' "$lock")"
    "$venv/bin/python" -m pip install -r "$lock"
    "$venv/bin/python" -c "import trl, torch, transformers; print('trl', trl.__version__, 'torch', torch.__version__)"
} >"$log" 2>&1 || { echo "setup_trl: failed; see $log (last lines below)"; tail -n 20 "$log"; exit 1; }
echo "$want" > "$stamp"
echo "setup_trl: ready ($venv)"
