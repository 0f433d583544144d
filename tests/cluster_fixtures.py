"""Session fixtures for tests that go through real launchers: Open MPI and a one-node SLURM cluster on localhost.

tests/conftest.py imports the fixtures, so every test module can name them; tests/launch.py starts the jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPTS = ROOT / "scripts"


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
