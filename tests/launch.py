"""The one way tests start ranks through a real launcher (deepspeed, the shipped launch scripts, sbatch).

Every launch gets a random free port below 32768 (several test runs share a machine; Linux hands out ports from 32768
up to outgoing connections), runs in its own process group under a time-out, and is followed by the check that no
/dev/shm segment of DeepSpeed's CPU all-reduce is left for any master port the launch used (66 MiB of RAM per rank
until reboot; ds_distill/runtime/distributed.py release_cpu_shm). Only tests marked ``multiprocess`` may launch:
tests/conftest.py fails a launch from an unmarked test, and a marked test that launches nothing.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ds_distill.core.checkpoint import read_latest
from ds_distill.runtime.distributed import cpu_shm_segment
from tests.helpers import ROOT

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
# Rank 0's start-up line (runtime/distributed.py init_distributed): the world size and the master it agreed on.
_MASTER_LINE = re.compile(r"distributed: (\d+) rank\(s\), .*, master (\S+):(\d+)")
# The current test's marker and its launches (set by tests/conftest.py for every test).
current = {"multiprocess": False, "launches": 0}


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
        DEEPSPEED=DEEPSPEED,
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def free_port() -> int:
    """A random TCP port in 20000..32767 that nothing listens on now (below the kernel's ephemeral range)."""
    for _ in range(100):
        port = random.randint(20000, 32767)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000..32767 after 100 tries")


def start(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (a time-out or a failed test kills the launcher and its ranks)."""
    assert current["multiprocess"], "a test that starts ranks through a launcher must be marked multiprocess"
    current["launches"] += 1
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """``proc``'s output (stdout and stderr together) once it ends; after ``timeout`` s kill its group and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} still running after {timeout:.0f} s; output:\n{out[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return out


def assert_no_shm_left(log: str, ports: tuple[int, ...] | list[int] = (), *, require: bool = True) -> list[int]:
    """Fail if a DeepSpeed CPU all-reduce segment is left in /dev/shm for any master port of ``ports`` or named in
    ``log``'s start-up lines (a launcher that agrees on a port itself: mpirun, SLURM); returns the ports checked.
    ``require``: fail too when there is no port to check (a run that succeeded must have logged its master)."""
    checked = sorted({int(port) for _, _, port in _MASTER_LINE.findall(log)} | set(ports))
    assert checked or not require, (
        f"no master port to check /dev/shm for (no 'distributed:' start-up line):\n{log[-3000:]}"
    )
    left = []
    for port in checked:
        # Any rank, any master address: runtime.distributed names the segments.
        pattern = cpu_shm_segment("*", {"MASTER_ADDR": "*", "MASTER_PORT": str(port)})  # type: ignore[arg-type]
        left += sorted(pattern.parent.glob(pattern.name))
    assert not left, f"DeepSpeed CPU all-reduce segments left behind: {left}"
    return checked


def launch(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    port: int | None = None,
    log_dir: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a launcher command to its end (``env``: launcher_env() unless given), then check /dev/shm for ``port`` and
    the master ports its output names (and the ``*.log`` files under ``log_dir``, for a script that writes its runs'
    output there). Returns the CompletedProcess; ``stdout`` holds stdout and stderr together."""
    proc = start(cmd, launcher_env() if env is None else env)
    out = finish(proc, timeout)
    logs = "".join(p.read_text(errors="replace") for p in sorted(log_dir.rglob("*.log"))) if log_dir else ""
    assert_no_shm_left(out + logs, [port] if port else [], require=proc.returncode == 0)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def deepspeed_cmd(module: str, args: list[str], *, port: int, ranks: int = 2) -> list[str]:
    """``deepspeed --num_gpus ranks --master_port port --module module args``: ranks on this machine."""
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), "--module", module, *args]


def deepspeed(module: str, args: list[str], *, ranks: int = 2, timeout: float = 600, **env: str):
    """``python -m module args`` on ``ranks`` CPU ranks through the real ``deepspeed`` launcher, on a free port."""
    port = free_port()
    return launch(
        deepspeed_cmd(module, args, port=port, ranks=ranks), env=launcher_env(**env), timeout=timeout, port=port
    )


def poll(condition, timeout: float, what: str, details=lambda: ""):
    """``condition()``'s first true value, asked every 0.2 s; fail after ``timeout`` s naming ``what`` (and
    ``details()``, e.g. a job's log so far)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")


def kill_rank_after_first_checkpoint(args: list[str], ckpt_root: Path, *, timeout: float) -> str:
    """``python -m ds_distill.train args`` on 2 ranks through deepspeed; once ``ckpt_root`` has a complete checkpoint
    (``latest``, within ``timeout`` s), SIGKILL rank 1. Returns the launcher's output after checking that it failed
    and left no /dev/shm segment (the killed rank's was unlinked at start-up all the same).

    The output is read while the run goes (a thread drains the pipe): unread, a run that writes more than the pipe
    holds (64 KiB) before its first checkpoint blocks in ``write`` and never saves, and a time-out shows what it said.
    """
    port = free_port()
    launcher = start(deepspeed_cmd("ds_distill.train", args, port=port), launcher_env())
    lines: list[str] = []

    def drain():
        for line in launcher.stdout:
            lines.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        poll(lambda: read_latest(ckpt_root), timeout, "the first checkpoint", lambda: "".join(lines)[-6000:])
        children = psutil.Process(launcher.pid).children(recursive=True)
        ranks = [p for p in children if "--local_rank=1" in " ".join(p.cmdline())]
        assert len(ranks) == 1, [p.cmdline() for p in children]
        ranks[0].send_signal(signal.SIGKILL)
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher still runs 120 s after rank 1 was killed; output:\n{''.join(lines)[-6000:]}")
    finally:
        if launcher.poll() is None:  # a failed wait above: the launcher and its ranks go too
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        reader.join(timeout=30)
    output = "".join(lines)
    assert launcher.returncode != 0, output[-6000:]
    assert_no_shm_left(output, [port])
    return output


def sbatch(script: Path, env: dict[str, str], job_log: Path) -> str:
    """Submit ``script`` to the test SLURM cluster (output to ``job_log``); returns the job id. The job's ranks start
    later: wait_for_job, then assert_no_shm_left on the job's log."""
    assert current["multiprocess"], "a test that starts ranks through a launcher must be marked multiprocess"
    current["launches"] += 1
    sub = subprocess.run(
        ["sbatch", "--parsable", "--output", str(job_log), str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sub.returncode == 0, sub.stdout + sub.stderr
    return sub.stdout.strip().split(";")[0]


def job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """``scontrol show job``'s fields of ``job_id`` (JobState, Restarts, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for_job(job_id: str, env: dict[str, str], timeout: float) -> str:
    """Poll ``scontrol show job`` until the job ends (``sbatch --wait`` returns late); returns its final JobState."""
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        state = job_fields(job_id, env).get("JobState", state)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "UNKNOWN"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    return f"TIMEOUT (last state {state})"
