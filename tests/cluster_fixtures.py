"""Session fixtures for tests that go through real launchers: Open MPI and a one-node SLURM cluster on localhost.

tests/conftest.py imports the fixtures, so every test module can name them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def without_launcher_vars(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` without any launcher's variables: in-process tests set RANK/WORLD_SIZE/LOCAL_WORLD_SIZE/MASTER_* in
    os.environ (init_distributed), and a pytest run inside a SLURM or MPI job carries that job's; launched ranks would
    inherit them (a stale LOCAL_WORLD_SIZE=1 makes rank 1 of a 2-rank job refuse to start)."""
    launcher_prefixes = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "TORCHELASTIC_")
    launcher_vars = {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "LOCAL_SIZE",
        "CROSS_RANK",
        "CROSS_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GROUP_RANK",
        "ROLE_RANK",
    }
    return {k: v for k, v in environ.items() if k not in launcher_vars and not k.startswith(launcher_prefixes)}


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment of a launched job: CPU DeepSpeed, the shared JIT cache, Open MPI allowed as root."""
    env = without_launcher_vars(dict(os.environ))
    env.update(
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        # Two ranks share the machine's cores: one thread each avoids oversubscription.
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
        DEEPSPEED=str(Path(sys.executable).parent / "deepspeed"),
    )
    env.update(extra)
    return env


def run_logged(cmd: list[str], *, env: dict[str, str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on a time-out kill the whole group and fail with its output."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout:.0f} s; output:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="session")
def cluster_tools() -> None:
    """Open MPI, SLURM, munge and mpi4py, installed by scripts/setup_cluster.sh (quick when already there)."""
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "setup_cluster.sh")],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        pytest.skip(f"cluster packages cannot be installed here: {(proc.stderr or proc.stdout).strip()}")


@pytest.fixture(scope="session")
def slurm_cluster(cluster_tools, tmp_path_factory) -> dict[str, str]:
    """A one-node SLURM cluster (localhost) for the session; yields the environment that reaches it (SLURM_CONF)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster starts slurmd and munged, which needs root")
    state = tmp_path_factory.mktemp("slurm")
    script = str(SCRIPTS / "slurm_local.sh")
    proc = subprocess.run(["bash", script, "start", str(state)], capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, f"slurm_local.sh start failed:\n{proc.stdout}{proc.stderr}\n{_logs(state)}"
        yield {"SLURM_CONF": str(state / "slurm.conf"), "SLURM_STATE_DIR": str(state)}
    finally:
        subprocess.run(["bash", script, "stop", str(state)], capture_output=True, text=True, timeout=60)


def _logs(state: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((state / "log").glob("*.log")))


def wait_for_job(job_id: str, env: dict[str, str], timeout: float) -> str:
    """Poll ``scontrol show job`` until the job ends (``sbatch --wait`` returns late); returns its final JobState."""
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, timeout=30
        ).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        state = fields.get("JobState", state)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "UNKNOWN"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    return f"TIMEOUT (last state {state})"
