#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for trying the sbatch/srun launch path and for the tests.
#   scripts/slurm_local.sh start DIR    # writes DIR/slurm.conf, starts munged (if needed), slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf    # then sbatch / srun / squeue / sinfo talk to it
#   scripts/slurm_local.sh status DIR
#   scripts/slurm_local.sh stop DIR     # stops the daemons this script started (pid files in DIR)
# Needs root and the packages of scripts/setup_cluster.sh. No cgroups: processes are tracked through /proc.
# SLURMCTLD_PORT / SLURMD_PORT choose the ports (default: two free ones), so several clusters can coexist.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
(($# == 2)) || usage
cmd="$1"
mkdir -p "$2"
dir="$(cd "$2" && pwd)"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

fail() { echo "slurm_local: $1" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    # Reuse a munged that already answers (e.g. the system's); otherwise start one as the munge user.
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [[ ! -f /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$dir/munged.pid"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    fail "munged did not answer; see /var/log/munge/munged.log"
}

write_conf() {
    # Describe the node as slurmd sees this machine (CPUs, sockets, memory), but name it localhost.
    local node
    node="$(slurmd -C | head -n 1 | sed -E 's/^NodeName=[^ ]+/NodeName=localhost/')"
    local ctld_port="${SLURMCTLD_PORT:-$(free_port)}"
    local d_port="${SLURMD_PORT:-$(free_port)}"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat >"$conf" <<EOF
# Written by scripts/slurm_local.sh: a one-node test cluster on localhost.
ClusterName=dsdistill
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups here: track processes through /proc and bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
# A node that went down comes back when its slurmd registers again; a requeued job may run again.
ReturnToService=2
JobRequeue=1
# A requeued job waits cred_expire seconds before it may start again (default 120), then for the next pass of the
# main scheduling loop (sched_interval, default 60 s): nothing else wakes the scheduler on a one-job test cluster.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2
# Keep finished jobs visible to scontrol for 5 minutes (tests poll it).
MinJobAge=300
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -n localhost -o %T 2>/dev/null || true; }

case "$cmd" in
start)
    [[ $(id -u) == 0 ]] || fail "must run as root (slurmd and munged are started here)"
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || fail "$tool not found: run scripts/setup_cluster.sh"
    done
    if pid_alive "$dir/slurmctld.pid" || pid_alive "$dir/slurmd.pid"; then
        fail "a cluster from $dir is already running: $0 stop $dir"
    fi
    start_munge
    write_conf
    slurmctld -f "$conf"
    slurmd -f "$conf" -N localhost
    state=""
    for _ in $(seq 150); do
        state="$(node_state)"
        [[ "$state" == idle ]] && exit 0
        sleep 0.2
    done
    fail "node localhost is '${state:-unknown}' after 30 s, not idle; logs in $dir/log"
    ;;
stop)
    for name in slurmd slurmctld munged; do
        pidfile="$dir/$name.pid"
        pid_alive "$pidfile" || { rm -f "$pidfile"; continue; }
        pid="$(cat "$pidfile")"
        kill "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        rm -f "$pidfile"
    done
    ;;
status)
    [[ -f "$conf" ]] || fail "no cluster in $dir (no slurm.conf)"
    pid_alive "$dir/slurmctld.pid" || fail "slurmctld from $dir is not running"
    sinfo -N
    ;;
*)
    usage
    ;;
esac
