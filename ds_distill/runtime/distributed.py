"""Who am I in the job: rank discovery for the deepspeed/torchrun launchers, mpirun (Open MPI) and SLURM's srun.

Every launcher describes the job in its own environment variables. ``init_distributed`` maps them onto the
torch ones (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), checks that they agree,
and starts the process group through ``deepspeed.init_distributed``:
    deepspeed / torchrun   RANK, LOCAL_RANK, WORLD_SIZE (+ LOCAL_SIZE or LOCAL_WORLD_SIZE), MASTER_ADDR/PORT
    mpirun (Open MPI)      OMPI_COMM_WORLD_{RANK,LOCAL_RANK,SIZE,LOCAL_SIZE}; rank 0's address and a free port
                           are broadcast with mpi4py unless MASTER_ADDR/MASTER_PORT are exported (mpirun -x)
    srun                   SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS, SLURM_STEP_TASKS_PER_NODE; the
                           first host of SLURM_STEP_NODELIST is the master; the port is derived from the job id
    nothing                one process: rank 0 of 1 on 127.0.0.1 and a free port
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ds_distill.common import UsageError, disk_full, print_error

log = logging.getLogger("ds_distill")

# The variables the torch "env://" rendezvous reads; all of them are set before the process group starts.
TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LOOPBACK = "127.0.0.1"
_TORCH_DEFAULT_PORT = 29500


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the job. ``launcher``: deepspeed, torchrun, env, openmpi, slurm or none."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: str
    launcher: str


@dataclass
class Rendezvous:
    """What the environment says; ``master_addr``/``master_port`` None: agreed at start-up (mpi4py or a free port)."""

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None

    def env(self) -> dict[str, str]:
        assert self.master_addr is not None and self.master_port is not None
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def world(self, backend: str) -> WorldInfo:
        """This process's place in the job, as the process group (``backend``) will see it."""
        return WorldInfo(self.rank, self.local_rank, self.world_size, self.local_world_size, backend, self.launcher)


_world: WorldInfo | None = None


# ------------------------------------------------------------------------------------------------ env -> rendezvous
def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} in the environment is not an integer: fix or unset it") from None


def _port(env: Mapping[str, str]) -> int | None:
    if "MASTER_PORT" not in env:
        return None
    port = _int(env, "MASTER_PORT")
    if not 0 < port < 65536:
        raise UsageError(f"MASTER_PORT={port} is not a TCP port (1..65535): export a free port or unset it")
    return port


def _tasks_on_node(spec: str, node_id: int) -> int:
    """SLURM's compressed per-node task counts, e.g. '2(x3),1' = [2, 2, 2, 1], at index ``node_id``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UsageError(f"cannot read SLURM task counts {spec!r} (SLURM_STEP_TASKS_PER_NODE)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if node_id >= len(counts):
        raise UsageError(f"SLURM_NODEID={node_id} but SLURM_STEP_TASKS_PER_NODE={spec!r} lists {len(counts)} nodes")
    return counts[node_id]


def _first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist ('node[03-05],gpu7' -> 'node03'); scontrol expands the bracket syntax."""
    if not re.search(r"[\[,]", nodelist):
        return nodelist
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UsageError(
            f"cannot expand SLURM node list {nodelist!r} with 'scontrol show hostnames' ({exc}): "
            "export MASTER_ADDR in the job script"
        ) from None
    return out.split()[0]


def _slurm_port(env: Mapping[str, str]) -> int:
    # Same on every task of a step without talking to each other; the step id keeps concurrent steps of one job
    # apart. 20000-29999 stays below Linux's ephemeral range (32768+), where outgoing connections take ports.
    job = int(env.get("SLURM_JOB_ID", "0"))
    step = int(env.get("SLURM_STEP_ID", "0"))
    return 20000 + (job % 1000) * 10 + step % 10


def _check(rv: Rendezvous, where: str) -> Rendezvous:
    if rv.world_size < 1:
        raise UsageError(f"world size {rv.world_size} from {where} must be at least 1")
    if not 0 <= rv.rank < rv.world_size:
        raise UsageError(
            f"rank {rv.rank} from {where} is outside the world of {rv.world_size} ranks (0..{rv.world_size - 1})"
        )
    if not 1 <= rv.local_world_size <= rv.world_size:
        raise UsageError(
            f"{rv.local_world_size} ranks per node from {where} does not fit a world of {rv.world_size} ranks"
        )
    if not 0 <= rv.local_rank < rv.local_world_size:
        raise UsageError(
            f"local rank {rv.local_rank} from {where} is outside the {rv.local_world_size} ranks of this node"
        )
    return rv


def _from_torch_env(env: Mapping[str, str]) -> Rendezvous:
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in env]
    if missing:
        present = "RANK" if "RANK" in env else "WORLD_SIZE"
        raise UsageError(
            f"{present} is set but {missing[0]} is not: a launcher sets both; unset {present} to run one process"
        )
    world = _int(env, "WORLD_SIZE")
    rank = _int(env, "RANK")
    if "LOCAL_RANK" in env:
        local_rank = _int(env, "LOCAL_RANK")
    elif world == 1:
        local_rank = 0
    else:
        raise UsageError(
            f"RANK and WORLD_SIZE={world} are set but LOCAL_RANK is not: export LOCAL_RANK or use a launcher"
        )
    # deepspeed's launcher calls it LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE.
    local_var = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "LOCAL_SIZE" if "LOCAL_SIZE" in env else None
    local_world = _int(env, local_var) if local_var else world
    addr = env.get("MASTER_ADDR") or None
    if addr is None and world > 1:
        if local_world < world:
            raise UsageError(
                f"WORLD_SIZE={world} spans several nodes but MASTER_ADDR is not set: export the address of rank 0's "
                "node"
            )
        addr = _LOOPBACK
    port = _port(env)
    if port is None:
        port = _TORCH_DEFAULT_PORT if world > 1 else None
    launcher = (
        "deepspeed"
        if "CROSS_RANK" in env or "LOCAL_SIZE" in env
        else "torchrun"
        if "TORCHELASTIC_RUN_ID" in env
        else "env"
    )
    rv = _check(Rendezvous(launcher, rank, local_rank, world, local_world, addr, port), "RANK/WORLD_SIZE")
    if world == 1 and addr is None:
        rv.master_addr = _LOOPBACK
    return rv


def _from_openmpi(env: Mapping[str, str]) -> Rendezvous:
    world = _int(env, "OMPI_COMM_WORLD_SIZE")
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else world
    addr = env.get("MASTER_ADDR") or (_LOOPBACK if local_world == world else None)
    return _check(
        Rendezvous(
            "openmpi",
            _int(env, "OMPI_COMM_WORLD_RANK"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            world,
            local_world,
            addr,
            _port(env),
        ),
        "mpirun (OMPI_COMM_WORLD_*)",
    )


def _from_slurm(env: Mapping[str, str], first_host: Callable[[str], str]) -> Rendezvous:
    world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    local_world = _tasks_on_node(spec, int(env.get("SLURM_NODEID", "0")))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    addr = env.get("MASTER_ADDR") or first_host(nodelist)
    port = _port(env) or _slurm_port(env)
    return _check(
        Rendezvous("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"), world, local_world, addr, port),
        "srun (SLURM_PROCID/SLURM_STEP_NUM_TASKS)",
    )


def resolve(env: Mapping[str, str], first_host: Callable[[str], str] = _first_host) -> Rendezvous:
    """Read the launcher's variables from ``env`` and check that every launcher present tells the same story.

    Pure apart from ``first_host`` (SLURM hostlist expansion); raises UsageError with one line on any contradiction.
    """
    has_torch = "RANK" in env or "WORLD_SIZE" in env
    has_ompi = "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env
    # Inside an sbatch script but outside srun, SLURM_PROCID is 0 and no SLURM_STEP_ID is set.
    in_srun = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env

    if has_torch:
        rv = _from_torch_env(env)
        if has_ompi:
            ompi = _from_openmpi(env)
            if (ompi.rank, ompi.world_size) != (rv.rank, rv.world_size):
                raise UsageError(
                    f"mixed launcher variables disagree: RANK={rv.rank} WORLD_SIZE={rv.world_size} but mpirun says "
                    f"rank {ompi.rank} of {ompi.world_size}: unset RANK/WORLD_SIZE under mpirun, or do not wrap one "
                    "launcher in another"
                )
        if in_srun:
            tasks, procid = (
                _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"),
                _int(env, "SLURM_PROCID"),
            )
            # srun may start one launcher per node (deepspeed/torchrun --nnodes): then WORLD_SIZE is a multiple of
            # the task count. One srun task per rank must agree rank for rank.
            if tasks > 1 and (rv.world_size % tasks or (rv.world_size == tasks and rv.rank != procid)):
                raise UsageError(
                    f"mixed launcher variables disagree: srun started {tasks} tasks (this is task {procid}) but "
                    f"RANK={rv.rank} WORLD_SIZE={rv.world_size}: with srun, start one task per rank and no other "
                    "launcher, "
                    "or one launcher per node (srun --ntasks-per-node=1)"
                )
        return rv
    if has_ompi:
        rv = _from_openmpi(env)
        if in_srun and _int(env, "SLURM_PROCID") != rv.rank:
            raise UsageError(
                f"mixed launcher variables disagree: mpirun rank {rv.rank} but SLURM_PROCID={env['SLURM_PROCID']}: "
                "use either srun or mpirun inside the job, not both"
            )
        return rv
    if in_srun:
        return _from_slurm(env, first_host)
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        raise UsageError(
            f"this SLURM job has SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun: "
            "run 'srun python -m ds_distill.train ...' in the job script (see scripts/launch_slurm.sbatch)"
        )
    return Rendezvous("none", 0, 0, 1, 1, env.get("MASTER_ADDR") or _LOOPBACK, _port(env))


# ------------------------------------------------------------------------------------------------ start-up
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _host_address() -> str:
    # The address other nodes reach this one by; what deepspeed's own MPI discovery uses ('hostname -I', first).
    try:
        out = subprocess.run(["hostname", "-I"], check=True, capture_output=True, text=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    return socket.gethostbyname(socket.gethostname())


def _agree_over_mpi(rv: Rendezvous) -> None:
    """Rank 0 picks the missing master address/port; mpi4py broadcasts them to every rank."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UsageError(
            "under mpirun without MASTER_ADDR/MASTER_PORT the ranks agree on them through mpi4py, which is not "
            "installed: run scripts/setup_cluster.sh, or pass 'mpirun -x MASTER_ADDR=... -x MASTER_PORT=...'"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != rv.world_size or comm.Get_rank() != rv.rank:
        raise UsageError(
            f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but OMPI_COMM_WORLD says {rv.rank} of "
            f"{rv.world_size}: mpi4py is built against another MPI than the mpirun used; rebuild it "
            "(scripts/setup_cluster.sh)"
        )
    pick = None
    if rv.rank == 0:
        pick = (rv.master_addr or _host_address(), rv.master_port or _free_port())
    rv.master_addr, rv.master_port = comm.bcast(pick, root=0)


def clear_stale_jit_locks(max_age_s: float = 120.0) -> list[str]:
    """Remove JIT-build locks that a killed process left behind (e.g. a rank SIGKILLed while loading an op).

    torch's extension loader takes ``<op>/lock`` even when the op is already built and waits forever while that file
    exists, so one killed rank would hang every later launch. A lock beside a built ``.so`` is only held for an
    up-to-date check (well under a second): one older than ``max_age_s`` is stale. Without a ``.so`` a real build
    may be running, so those locks are left alone.
    """
    # torch keeps each op in $TORCH_EXTENSIONS_DIR/<op> when the variable is set, else in
    # ~/.cache/torch_extensions/py<version>_<device>/<op> (torch.utils.cpp_extension._get_build_directory)
    custom = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(custom or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"))
    removed = []
    for lock in root.glob("*/lock" if custom else "*/*/lock"):
        try:
            stale = any(lock.parent.glob("*.so")) and time.time() - lock.stat().st_mtime > max_age_s
            if stale:
                lock.unlink()
                removed.append(str(lock))
        except FileNotFoundError:  # another rank removed it first, or the holder finished
            continue
    for lock in removed:
        log.warning("removed a stale JIT-build lock left by a killed process: %s", lock)
    return removed


def interpreter_tools_first(
    environ: MutableMapping[str, str] = os.environ, executable: str = sys.executable
) -> str | None:
    """Put the interpreter's folder first on ``environ["PATH"]`` when it holds a ``ninja`` that PATH would not find
    first, as activating the venv would; returns the folder when PATH changed, else None.

    torch JIT-builds DeepSpeed's ops (the CPU comm op every rank loads in ``init_distributed``, the CPU Adam op) with
    the first ``ninja`` on PATH, and a system ninja and the venv's do not read each other's build log: a run started as
    ``.venv/bin/python -m ds_distill.train`` or ``.venv/bin/deepspeed ...`` without the venv on PATH rebuilt the op
    (~60 s of CPU) whenever the suite or the demo had built it last with the venv's, and failed ("Ninja is required")
    on a machine with no system ninja (docs/performance.md, issue 28's start-up split).
    """
    folder = Path(executable).parent
    ninja = folder / "ninja"
    path = environ.get("PATH", "")
    found = shutil.which("ninja", path=path)
    if not ninja.is_file() or (found is not None and Path(found) == ninja):
        return None
    environ["PATH"] = f"{folder}{os.pathsep}{path}" if path else str(folder)
    return str(folder)


def planned_world(env: Mapping[str, str] = os.environ) -> WorldInfo:
    """The world this process is to join, read from the launcher's variables (``resolve``) without starting the
    process group: for the checks that need only its sizes and rank (the DeepSpeed JSONs, the placements by fit),
    so bad input is refused before DeepSpeed's start-up (its comm op build, the process group). The backend is the
    one ``init_distributed`` would choose."""
    from deepspeed.accelerator import get_accelerator

    return resolve(env).world(get_accelerator().communication_backend_name())


def init_distributed(backend: str | None = None) -> WorldInfo:
    """Start (once) the process group for whichever launcher started this process; see the module docstring.

    ``backend``: None lets DeepSpeed's accelerator choose (nccl on CUDA, gloo on CPU with DS_ACCELERATOR=cpu).
    """
    global _world
    import deepspeed
    import torch.distributed as dist

    if _world is not None and dist.is_initialized():
        return _world
    rv = resolve(os.environ)
    if rv.master_addr is None or rv.master_port is None:
        if rv.launcher == "openmpi":
            _agree_over_mpi(rv)
        else:  # one process: nobody to agree with
            rv.master_port = _free_port()
    os.environ.update(rv.env())
    if backend is None:
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
    # The environment is complete, so deepspeed must not run its own MPI discovery over it.
    tools = interpreter_tools_first()
    clear_stale_jit_locks()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if (dist.get_rank(), dist.get_world_size()) != (rv.rank, rv.world_size):
        raise RuntimeError(
            f"process group says rank {dist.get_rank()} of {dist.get_world_size()}, environment {rv.rank} of "
            f"{rv.world_size}"
        )
    release_cpu_shm(rv.rank, rv.world_size)
    _world = rv.world(backend)
    threads = share_cpu_threads(rv.local_world_size) if backend == "gloo" else None
    if rv.rank == 0:
        log.info(
            "distributed: %d rank(s), %d per node, backend %s, launcher %s, master %s:%d%s",
            rv.world_size,
            rv.local_world_size,
            backend,
            rv.launcher,
            rv.master_addr,
            rv.master_port,
            f", {threads} CPU thread(s) per rank" if threads else "",
        )
        if tools:
            log.info(
                "distributed: %s put first on PATH (its ninja builds DeepSpeed's ops, as in the activated venv)", tools
            )
    return _world


def cpu_shm_segment(rank: int, environ: Mapping[str, str] = os.environ) -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce op makes for `rank` (its ``shm_initialize`` naming)."""
    return Path("/dev/shm") / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
        f"{environ.get('MASTER_PORT', '')}_{rank}"
    )


def release_cpu_shm(rank: int, world_size: int) -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it; True if one was unlinked.

    With the CPU accelerator and every rank on one node (LOCAL_SIZE == world size), DeepSpeed's shm op creates one
    66 MiB ``/dev/shm/deepspeed_allreduce_buffer_*`` segment per rank and never unlinks it (deepspeed
    csrc/cpu/comm/shm.cpp: ``shared_close`` is never called), so every run, finished or killed, leaves them behind
    until reboot: /dev/shm is RAM, and a few hundred runs on one machine ended in the OOM killer. Each rank maps
    every peer's segment before ``init_distributed`` returns, so after one barrier every rank unlinks its own name;
    the mappings stay valid until the process exits and nothing is left behind, even after a SIGKILL.
    """
    from deepspeed import comm

    if getattr(comm.comm.cdb, "shm_comm_op", None) is None or os.environ.get("LOCAL_SIZE") != str(world_size):
        return False  # no segment was made (GPU accelerators, or ranks on several nodes): the same on every rank
    barrier()
    try:
        cpu_shm_segment(rank).unlink()
    except FileNotFoundError:
        return False
    return True


def share_cpu_threads(local_world_size: int, environ: Mapping[str, str] = os.environ) -> int | None:
    """Give each CPU rank its share of the cores; returns the thread count set, None when left alone.

    torch starts one intra-op thread per core in every process, so N ranks on a node would oversubscribe the cores
    N times (the deepspeed launcher sets OMP_NUM_THREADS only with --bind_cores_to_rank). An explicit OMP_NUM_THREADS
    wins; a process already bound to fewer cores than the node has (srun --cpu-bind, numactl) keeps all of them.
    """
    if environ.get("OMP_NUM_THREADS") or local_world_size <= 1:
        return None
    import torch

    cores = len(os.sched_getaffinity(0))
    threads = cores if cores < (os.cpu_count() or cores) else max(1, cores // local_world_size)
    torch.set_num_threads(threads)
    return threads


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def drain() -> None:
    """Wait, on every rank, until no collective is left in flight: one barrier per process group (the default group
    and every group DeepSpeed made, e.g. its clone of the world for ZeRO), sorted by name, so every rank meets them
    in the same order. A gloo barrier completes only after all earlier work on its group (ProcessGroupGloo::barrier),
    so an asynchronous collective nobody waited for (a ZeRO-3 prefetch) is not left running on a gloo worker thread.

    Collective: call it only where every rank arrives (the end of a finished run), never on an error path, where a
    peer may be stuck in another collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    names = dist.distributed_c10d._world.pg_names  # {group: name}, what destroy_process_group itself walks
    for group in sorted(names, key=names.get):
        dist.barrier(group=group)


def destroy() -> None:
    """Tear the process groups down before exit, in order, while the interpreter is whole.

    1. ``destroy_process_group`` (every group). For gloo this only drops torch's references: ProcessGroupGloo has no
       shutdown, and its worker threads are joined when the last reference goes.
    2. ``gc.collect()``: the engines' reference cycles that still hold the groups are freed now, on this thread, so
       the groups' threads are joined here. Left to interpreter finalization, a gloo worker thread that finishes a work
       and takes the GIL to release its tensors is ended by the interpreter inside a C++ frame: "terminate called
       without an active exception", SIGABRT (exit status 250 under the deepspeed launcher); see pytorch PR 179291.
    3. stdout, stderr and the log handlers flushed, so the last lines are never lost.
    """
    global _world
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _world = None
    gc.collect()
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def entry_point(body: Callable[[], int]) -> int:
    """Run an entry point's ``body`` the same way everywhere: log lines with times, a UsageError printed as one
    ``error: ...`` line with exit code 2 (no traceback), and the process group torn down at exit: drained first
    when the body finished (``drain``), then destroyed (``destroy``) on every path.

    A full disk or quota (ENOSPC, EDQUOT) is the user's to fix too: one line naming the file and the space left
    there, exit 2. Checkpoints and caches are written so that a failed write leaves the previous ones complete
    (``latest`` moves last, shards are renamed into place), so the rerun continues from them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        code = body()
        drain()
        return code
    except UsageError as exc:
        print_error(exc)
        return 2
    except (OSError, RuntimeError) as exc:
        if not disk_full(exc):
            raise
        print_error(disk_full_message(exc))
        return 2
    finally:
        destroy()


def disk_full_message(exc: OSError) -> str:
    """One line for a write that ran out of space: the file, the free space of its file system, the fix."""
    import shutil

    path = exc.filename or _filename_in(exc)
    where = (
        next((p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists()), None) if path else None
    )
    free = f", {shutil.disk_usage(where).free / 2**30:.2f} GiB free there" if where else ""
    return (
        f"no space left writing {path or 'a file'} ({exc.strerror or 'disk full'}{free}): free space or move "
        "--output_dir (or the cache) elsewhere, then rerun with the same flags (and --resume): it continues from the "
        "last complete checkpoint or shard"
    )


def _filename_in(exc: BaseException) -> str | None:
    """The file named by an error a library wrapped (torch.save's RuntimeError names none: its cause may)."""
    seen = exc
    while seen is not None:
        if getattr(seen, "filename", None):
            return seen.filename
        seen = seen.__cause__ or seen.__context__
    return None


def rank_or_none() -> int | None:
    """This process's rank if torch.distributed is initialised, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


@contextmanager
def main_process_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (which then hit the `datasets` cache).

    Without torch.distributed this is a no-op. If rank 0 fails inside the body it still reaches the barrier, so the
    other ranks do not hang: they run the body themselves and fail with the same error.
    """
    import torch.distributed as dist

    rank = rank_or_none()
    if rank is not None and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if rank == 0:
            dist.barrier()
