"""Rank discovery (in process, from environment variables) and 2-rank distillation through the shipped launch scripts:
mpirun and deepspeed --launcher openmpi here; sbatch + srun on a one-node SLURM cluster on localhost is the job that
tests/test_preemption.py preempts and requeues (one SLURM launch checks both)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ds_distill.common import UsageError
from ds_distill.ds_config import REPO_CONFIGS
from ds_distill.runtime import distributed
from ds_distill.runtime.distributed import _tasks_on_node, resolve
from tests.cluster_fixtures import SCRIPTS
from tests.helpers import launch_args
from tests.launch import assert_no_shm_left, free_port, launch, launcher_env

JOB_TIMEOUT = 300  # seconds for one tiny 2-rank run, the first DeepSpeed JIT build included


# ------------------------------------------------------------------------------------------------ env -> ranks
def hosts(nodelist: str) -> str:
    return {"node[07-08]": "node07"}[nodelist]


def test_no_launcher_is_one_process():
    rv = resolve({})
    assert (rv.launcher, rv.rank, rv.local_rank, rv.world_size, rv.local_world_size) == ("none", 0, 0, 1, 1)
    assert rv.master_addr == "127.0.0.1" and rv.master_port is None  # a free port is picked at start-up


def test_deepspeed_launcher_variables():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29600",
    }
    rv = resolve(env)
    assert (rv.launcher, rv.rank, rv.local_rank, rv.world_size, rv.local_world_size) == ("deepspeed", 3, 1, 4, 2)
    assert rv.env() == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29600",
    }


def test_openmpi_variables():
    env = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    rv = resolve(env)
    assert (rv.launcher, rv.rank, rv.local_rank, rv.world_size, rv.local_world_size) == ("openmpi", 1, 1, 2, 2)
    # One node: loopback; the port is agreed through mpi4py at start-up.
    assert (rv.master_addr, rv.master_port) == ("127.0.0.1", None)
    multi = resolve({**env, "OMPI_COMM_WORLD_SIZE": "4"})
    assert multi.master_addr is None  # rank 0's address, broadcast with mpi4py


def test_srun_variables():
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_NODELIST": "node[07-08]",
    }
    rv = resolve(env, first_host=hosts)
    assert (rv.launcher, rv.rank, rv.local_rank, rv.world_size, rv.local_world_size) == ("slurm", 3, 1, 4, 2)
    assert (rv.master_addr, rv.master_port) == ("node07", 22340)  # port 20000 + (job % 1000) * 10 + step
    assert resolve({**env, "MASTER_PORT": "31000"}, first_host=hosts).master_port == 31000


def test_slurm_task_counts():
    assert [_tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert _tasks_on_node("8", 0) == 8


def test_one_launcher_per_node_under_srun_is_fine():
    env = {
        "SLURM_JOB_ID": "5",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "node07",
        "MASTER_PORT": "29500",
    }
    assert resolve(env).world_size == 8


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
            "rank 2 from RANK/WORLD_SIZE is outside the world of 2 ranks",
        ),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "h"},
            "local rank 1 from RANK/WORLD_SIZE is outside the 1 ranks",
        ),
        (
            {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
            "spans several nodes but MASTER_ADDR is not set",
        ),
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' in the environment is not an integer"),
        (
            {
                "RANK": "0",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_SIZE": "4",
            },
            "mixed launcher variables disagree: RANK=0 WORLD_SIZE=2 but mpirun says rank 0 of 4",
        ),
        # srun -n 2 deepspeed --num_gpus 2: every srun task starts its own 2-rank world.
        (
            {
                "SLURM_JOB_ID": "5",
                "SLURM_STEP_ID": "0",
                "SLURM_PROCID": "1",
                "SLURM_STEP_NUM_TASKS": "2",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "2",
                "LOCAL_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
            },
            "srun started 2 tasks (this is task 1)",
        ),
        ({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "this process was not started by srun"),
    ],
)
def test_inconsistent_variables_fail_in_one_line(env, message):
    with pytest.raises(UsageError) as err:
        resolve(env)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cpu_ranks_share_the_cores(monkeypatch):
    """N CPU ranks on a node get cores // N threads each, unless OMP_NUM_THREADS is set or the process is bound."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
        assert distributed.share_cpu_threads(2, environ={}) == 4 and torch.get_num_threads() == 4
        assert distributed.share_cpu_threads(16, environ={}) == 1 and torch.get_num_threads() == 1
        assert distributed.share_cpu_threads(2, environ={"OMP_NUM_THREADS": "3"}) is None
        assert distributed.share_cpu_threads(1, environ={}) is None
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # bound by srun/numactl: keep them all
        assert distributed.share_cpu_threads(2, environ={}) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ real launchers
def test_a_leftover_shm_segment_fails_the_launch_check():
    """tests/launch.py's check after every launch: a segment of the master port that a launch used or logged fails."""
    port = free_port()
    log = f"distributed: 2 rank(s), 2 per node, backend gloo, launcher openmpi, master 127.0.0.1:{port}, 1 CPU thread"
    assert assert_no_shm_left(log) == [port] and assert_no_shm_left("", [port]) == [port]
    segment = distributed.cpu_shm_segment(1, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    segment.touch()
    try:
        for args in ((log,), ("", [port])):
            with pytest.raises(AssertionError, match="segments left behind"):
                assert_no_shm_left(*args)
    finally:
        segment.unlink()
    with pytest.raises(AssertionError, match="no master port"):
        assert_no_shm_left("a run that logged no start-up line")


def run_args(tiny, out: Path) -> str:
    """Two optimizer steps of the tiny pair (default chunked loss), one checkpoint (pytest's tmp paths have no
    spaces)."""
    return " ".join(launch_args(tiny, out, str(REPO_CONFIGS / "cpu_zero3.json"), save_steps=2, export="false"))


def assert_two_rank_run(out: Path, log: str, launcher: str) -> None:
    assert f"distributed: 2 rank(s), 2 per node, backend gloo, launcher {launcher}" in log, log[-6000:]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000002", log[-6000:]
    # Each rank saved its own RNG state: two distinct ranks took part.
    assert {p.name for p in (ckpt / "step_00000002").glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}


@pytest.mark.multiprocess
def test_mpirun(cluster_tools, tiny, tmp_path):
    out = tmp_path / "run"
    env = launcher_env(NP="2", MPI_ARGS="--allow-run-as-root --oversubscribe", RUN_ARGS=run_args(tiny, out))
    proc = launch(["bash", str(SCRIPTS / "launch_mpirun.sh")], env=env, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert_two_rank_run(out, proc.stdout, "openmpi")


@pytest.mark.multiprocess
def test_deepspeed_openmpi_launcher(cluster_tools, tiny, tmp_path):
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # --force_multi: use the openmpi launcher for one host; --no_ssh_check: mpirun starts local ranks without ssh.
    port = free_port()
    env = launcher_env(
        MASTER_PORT=str(port),
        HOSTFILE=str(hostfile),
        LAUNCHER="openmpi",
        MASTER_ADDR="127.0.0.1",
        DS_ARGS="--force_multi --no_ssh_check",
        LAUNCHER_ARGS="--oversubscribe --mca btl_tcp_if_include lo",
        RUN_ARGS=run_args(tiny, out),
    )
    proc = launch(["bash", str(SCRIPTS / "launch_deepspeed.sh")], env=env, timeout=JOB_TIMEOUT, port=port)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "mpirun -n 2 -hostfile" in proc.stdout, proc.stdout[-6000:]
    assert_two_rank_run(out, proc.stdout, "openmpi")


@pytest.mark.parametrize("custom_root", [True, False], ids=["TORCH_EXTENSIONS_DIR", "default_root"])
def test_stale_jit_lock_is_removed_only_beside_a_built_op(tmp_path, monkeypatch, custom_root):
    """A rank killed while loading a JIT op leaves `lock`; torch would then wait forever in every later launch. The
    ops' folders are where torch puts them: $TORCH_EXTENSIONS_DIR/<op>, else ~/.cache/torch_extensions/<py_dev>/<op>."""
    import os
    import time as _time

    from torch.utils.cpp_extension import _get_build_directory

    from ds_distill.runtime.distributed import clear_stale_jit_locks

    if custom_root:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    else:
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
    built, building, fresh = (
        Path(_get_build_directory(name, verbose=False)) for name in ("built_op", "building_op", "fresh_op")
    )
    for folder in (built, building, fresh):
        folder.mkdir(parents=True, exist_ok=True)  # _get_build_directory may have made it
        (folder / "lock").touch()
    (built / "built_op.so").touch()
    (fresh / "fresh_op.so").touch()
    old = _time.time() - 600
    for folder in (built, building):
        os.utime(folder / "lock", (old, old))
    assert clear_stale_jit_locks() == [str(built / "lock")]
    assert not (built / "lock").exists() and (building / "lock").exists() and (fresh / "lock").exists()


def test_the_interpreters_ninja_comes_first_on_path(tmp_path):
    """torch builds DeepSpeed's ops with the first `ninja` on PATH: a run started by the venv's python without the venv
    on PATH gets the venv's ninja first (as activation would), and a PATH that already finds it is left alone."""
    import subprocess

    from ds_distill.runtime.distributed import interpreter_tools_first

    venv, system, bare = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin", tmp_path / "bare" / "bin"
    for folder, says in ((venv, "venv"), (system, "system")):
        folder.mkdir(parents=True)
        (folder / "ninja").write_text(f"#!/bin/sh\necho {says}\n")
        (folder / "ninja").chmod(0o755)
    bare.mkdir(parents=True)
    environ = {"PATH": f"{system}{os.pathsep}/bin"}
    assert interpreter_tools_first(environ, executable=str(venv / "python")) == str(venv)
    assert subprocess.run(["ninja"], env=environ, capture_output=True, text=True).stdout.strip() == "venv"
    before = dict(environ)
    assert interpreter_tools_first(environ, executable=str(venv / "python")) is None and environ == before
    assert interpreter_tools_first(environ, executable=str(bare / "python")) is None and environ == before
