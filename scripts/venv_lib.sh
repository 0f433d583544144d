# Sourced (not run) by the three setup scripts, setup.sh (.venv), setup_vllm.sh (.venv-vllm) and setup_trl.sh
# (.venv-trl): each makes one virtualenv from one lock file and re-uses it when complete. Complete = the venv's stamp
# records the hash of what it was built from; it is written last, so a changed lock builds the venv again and an
# interrupted build (no stamp) is finished by the next run.
#   venv_open NAME DIR HASH WHAT   done (exit 0) if complete, else make the venv; sets venv and log
#   venv_install FUNCTION          run the caller's pip steps, their output in .cache/NAME.log
#   venv_ready                     write the stamp
# The caller has set -euo pipefail.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# NAME prefixes every message and names the log; DIR is the venv's folder under the repo root; HASH the lock's hash (its
# formula must not change, or every existing venv is built again); WHAT says what is installed and what it costs.
venv_open() {
    name="$1" venv="$root/$2" want="$3"
    stamp="$venv/.ds_distill_lock_sha"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        exit 0
    fi
    echo "$name: creating $venv from $4"
    [[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
    log="$root/.cache/$name.log"
    mkdir -p "$root/.cache"
}

# Runs FUNCTION in a subshell with `set -e` in force and its output in the log; if a step fails, says so with the log's
# last lines and exits 1. Not as `{ ...; } >log || ...`: bash ignores `set -e` under `||`, so a failed step before the
# last would pass unseen.
venv_install() {
    local rc=0
    set +e
    (
        set -e
        "$1"
    ) >"$log" 2>&1
    rc=$?
    set -e
    if ((rc != 0)); then
        echo "$name: failed; see $log (last lines below)"
        tail -n 20 "$log"
        exit 1
    fi
}

venv_ready() {
    echo "$want" >"$stamp"
    echo "$name: ready ($venv)"
}
