#!/usr/bin/env bash
# Distil through the deepspeed launcher, on one machine or several.
#   RUN_ARGS="--teacher T --student S --data D --output_dir O" scripts/launch_deepspeed.sh [more training flags]
# One machine: HOSTFILE= NUM_GPUS=8. Several: list them in HOSTFILE (see scripts/hostfile); deepspeed starts
# the ranks over ssh (LAUNCHER=pdsh, needs pdsh and passwordless ssh) or through mpirun (LAUNCHER=openmpi).
# Gotchas of LAUNCHER=openmpi: deepspeed adds "--mca btl_tcp_if_include eth0" unless LAUNCHER_ARGS names
# btl_tcp_if_include itself; it rejects INCLUDE/NUM_GPUS; and it ignores MASTER_ADDR (the ranks agree through
# mpi4py). Remote ranks get only PYTHON*/UCX* variables and those in ~/.deepspeed_env (put DS_ACCELERATOR=cpu there).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- edit these (or set them in the environment)
HOSTFILE="${HOSTFILE-$root/scripts/hostfile}"  # empty: this machine only, NUM_GPUS ranks
NUM_GPUS="${NUM_GPUS:-}"                       # ranks per machine when HOSTFILE is empty (default: all GPUs)
INCLUDE="${INCLUDE:-}"                         # a subset of the hostfile, e.g. "node-a:0,1@node-b"
LAUNCHER="${LAUNCHER:-pdsh}"                   # pdsh (ssh), openmpi, mvapich, slurm...
LAUNCHER_ARGS="${LAUNCHER_ARGS:-}"             # passed to that launcher, e.g. "--mca btl_tcp_if_include ib0"
MASTER_ADDR="${MASTER_ADDR:-}"                 # address of the first host as the others reach it (default: its hostname -I)
MASTER_PORT="${MASTER_PORT:-29500}"
DS_ARGS="${DS_ARGS:-}"                         # more deepspeed flags, e.g. "--force_multi --no_ssh_check"
RUN_ARGS="${RUN_ARGS:-}"                       # training flags (python -m ds_distill.train --help); words split on spaces
DEEPSPEED="${DEEPSPEED:-$root/.venv/bin/deepspeed}"
# ----

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cmd=("$DEEPSPEED" --master_port "$MASTER_PORT")
if [[ -n "$HOSTFILE" ]]; then
    cmd+=(--hostfile "$HOSTFILE" --launcher "$LAUNCHER")
    [[ -n "$INCLUDE" ]] && cmd+=(--include "$INCLUDE")
    [[ -n "$MASTER_ADDR" ]] && cmd+=(--master_addr "$MASTER_ADDR")
    # The = form: a value starting with "--" would otherwise be read as a deepspeed flag.
    [[ -n "$LAUNCHER_ARGS" ]] && cmd+=("--launcher_args=$LAUNCHER_ARGS")
else
    [[ -n "$NUM_GPUS" ]] && cmd+=(--num_gpus "$NUM_GPUS")
fi
read -ra ds_args <<<"$DS_ARGS"
read -ra run_args <<<"$RUN_ARGS"
cd "$root"
exec "${cmd[@]}" "${ds_args[@]}" --module ds_distill.train "${run_args[@]}" "$@"
