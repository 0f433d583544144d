#!/usr/bin/env bash
# Distil with one process per rank started by Open MPI's mpirun (no deepspeed launcher in between).
#   RUN_ARGS="--teacher T --student S --data D --output_dir O" NP=2 scripts/launch_mpirun.sh [more training flags]
# Each rank reads OMPI_COMM_WORLD_* and agrees with rank 0 on MASTER_ADDR/MASTER_PORT through mpi4py
# (scripts/setup_cluster.sh installs it); export MASTER_ADDR/MASTER_PORT to choose them yourself.
# As root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- edit these (or set them in the environment)
NP="${NP:-2}"                                # ranks in all (GPUs in all; on CPU, processes)
HOSTFILE="${HOSTFILE:-}"                     # e.g. scripts/hostfile for several machines; empty: this one only
MPI_ARGS="${MPI_ARGS:-}"                     # more mpirun flags, e.g. "--oversubscribe" or "--mca btl_tcp_if_include eth0"
PYTHON="${PYTHON:-$root/.venv/bin/python}"   # the same path must exist on every host
RUN_ARGS="${RUN_ARGS:-}"                     # training flags (python -m ds_distill.train --help); words split on spaces
# ----

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cmd=(mpirun -np "$NP")
[[ -n "$HOSTFILE" ]] && cmd+=(--hostfile "$HOSTFILE")
# mpirun hands its environment to local ranks only: name what remote ranks need too.
for var in PYTHONPATH DS_ACCELERATOR TORCH_EXTENSIONS_DIR MASTER_ADDR MASTER_PORT OMP_NUM_THREADS HF_HOME; do
    [[ -n "${!var:-}" ]] && cmd+=(-x "$var")
done
read -ra mpi_args <<<"$MPI_ARGS"
read -ra run_args <<<"$RUN_ARGS"
cd "$root"
exec "${cmd[@]}" "${mpi_args[@]}" "$PYTHON" -u -m ds_distill.train "${run_args[@]}" "$@"
