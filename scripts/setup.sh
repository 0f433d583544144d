#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv with the exact versions of requirements.lock.
# Re-runnable: a complete environment is detected by a stamp that records the lock file's hash.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
venv="$root/.venv"
stamp="$venv/.ds_distill_lock_sha"
want="$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
echo "setup: creating $venv from requirements.lock (a few minutes the first time)"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
log="$root/.cache/setup.log"
mkdir -p "$root/.cache"
{
    "$venv/bin/python" -m pip install --upgrade pip
    # torch first and alone: an unpinned resolution could pull a multi-GB CUDA build.
    "$venv/bin/python" -m pip install "$(grep -E '^torch==' requirements.lock)"
    "$venv/bin/python" -m pip install -r requirements.lock
    "$venv/bin/python" -m pip install --no-deps -e .
} >"$log" 2>&1 || { echo "setup: pip failed; see $log (last lines below)"; tail -n 20 "$log"; exit 1; }
# DeepSpeed's CPU all-reduce op is JIT-built by the first process that starts a process group on CPU (~1 minute on
# 2 cores); build it here, once, into the project's cache, so no test or demo run of a new environment pays for it.
# With the venv's ninja, as scripts/test.sh and scripts/demo.sh use (another ninja would rebuild it).
PATH="$venv/bin:$PATH" DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}" "$venv/bin/python" -c \
    'from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder("ShareMemCommBuilder").load()' \
    >>"$log" 2>&1 || echo "setup: DeepSpeed's CPU all-reduce op did not build now (see $log); the first CPU run builds it"
echo "$want" > "$stamp"
echo "setup: ready ($venv)"
