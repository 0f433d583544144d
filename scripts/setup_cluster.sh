#!/usr/bin/env bash
# Install what the multi-process launchers need on a Debian machine (root): Open MPI, SLURM, munge, and mpi4py
# (the exact version of requirements-cluster.lock) in the project's .venv: DeepSpeed's MPI discovery uses it under mpirun.
# Idempotent and quiet on success; the details go to .cache/setup_cluster.log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"  # the interpreter that gets mpi4py
log="$root/.cache/setup_cluster.log"
mkdir -p "$root/.cache"

# slurm-wlm-basic-plugins holds select/cons_tres, proctrack/linuxproc and task/none;
# libpmix-dev lets srun start ranks with --mpi=pmix.
packages=(openmpi-bin libopenmpi-dev slurm-wlm slurm-wlm-basic-plugins munge libpmix-dev gcc python3-dev)

fail() { echo "setup_cluster: $1 (see $log)" >&2; exit 1; }

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || fail "needs root to apt-get install ${missing[*]}"
    command -v apt-get >/dev/null || fail "apt-get not found: install ${missing[*]} by hand"
    export DEBIAN_FRONTEND=noninteractive
    # Other processes may hold the dpkg lock for a while: wait for it instead of failing.
    apt_opts=(-y -q -o DPkg::Lock::Timeout=600 --no-install-recommends)
    {
        # Update the package lists only when an install from the current lists fails.
        apt-get install "${apt_opts[@]}" "${missing[@]}" \
            || { apt-get -o DPkg::Lock::Timeout=600 update -q && apt-get install "${apt_opts[@]}" "${missing[@]}"; }
    } >>"$log" 2>&1 || fail "apt-get could not install ${missing[*]}"
fi

[[ -x "$python" ]] || fail "no Python at $python: run scripts/setup.sh first (or set PYTHON)"
lock="$root/requirements-cluster.lock"
want="$(grep -E '^mpi4py==' "$lock" | cut -d= -f3)"
[[ -n "$want" ]] || fail "no mpi4py==VERSION line in $lock"
if [[ "$("$python" -c 'import mpi4py; print(mpi4py.__version__)' 2>/dev/null)" != "$want" ]]; then
    # Build against Debian's Open MPI (mpicc from libopenmpi-dev), not a bundled MPI.
    MPICC=mpicc "$python" -m pip install --no-binary mpi4py -r "$lock" >>"$log" 2>&1 \
        || fail "pip could not build mpi4py $want against Open MPI"
fi
for tool in mpirun sbatch srun slurmctld slurmd munged; do
    command -v "$tool" >/dev/null || fail "$tool is not on PATH after the install"
done
