"""Preemption and crash safety for real: SIGUSR1 to a SLURM job (checkpoint, exit 75, requeue, same loss curve; the
job is also the test of 2 ranks through the shipped sbatch + srun script),
SIGKILL of one rank under the deepspeed launcher (resume from the last complete checkpoint), and a second signal
during the save (in process)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ds_distill import train
from ds_distill.core.checkpoint import read_latest, tag_for
from ds_distill.extras.preemption import PREEMPTED_EXIT_CODE, Preemption
from ds_distill.runtime.callbacks import Callback
from tests.cluster_fixtures import SCRIPTS
from tests.helpers import ds_json, launch_args, losses_of, make_cfg, train_losses
from tests.launch import (
    assert_no_shm_left,
    deepspeed,
    job_fields,
    kill_rank_after_first_checkpoint,
    launcher_env,
    poll,
    sbatch,
    wait_for_job,
)

STEPS = 12  # long enough to interrupt a 2-rank run after a few steps
JOB_TIMEOUT = 300  # seconds for one tiny 2-rank run (both runs of a requeued job: twice that)


def run_args(tiny, out: Path, ds_config: str, *, save_steps: int) -> list[str]:
    """The same 2-rank run for every launcher here; only the checkpoint interval differs (it does not change losses)."""
    return launch_args(
        tiny, out, ds_config, max_steps=STEPS, save_steps=save_steps, chunk_size=16, export="false", keep_last=0
    )


def assert_complete(ckpt: Path, tag: str, ranks: int) -> None:
    """Every rank's ZeRO shards and RNG state, and the HF files: what a resume and an export read."""
    files = {p.relative_to(ckpt / tag).as_posix() for p in (ckpt / tag).rglob("*") if p.is_file()}
    need = {f"rng_rank{r}.pt" for r in range(ranks)} | {"hf/config.json"}
    need |= {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(ranks) for kind in ("model", "optim")}
    assert need <= files, f"{tag} lacks {sorted(need - files)}; has {sorted(files)}"


@pytest.fixture(scope="module")
def constant_lr(tmp_path_factory) -> str:
    return ds_json(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def reference(tiny, dist_env, tmp_path_factory) -> dict[int, float]:
    """The loss curve the interrupted 2-rank runs must reproduce: the same run never stopped, in process on one rank
    with the same global batch (1 x 4 = 2 x 2: tests/test_multirank.py checks that the two are one run), so no
    launcher start-up is spent on it (docs/performance.md, the suite's time)."""
    tmp = tmp_path_factory.mktemp("reference")
    one_rank = ds_json(tmp, name="one.json", train_micro_batch_size_per_gpu=4)
    trainer = train.run(make_cfg(tiny, tmp / "run", deepspeed_config=one_rank, max_steps=STEPS, keep_last=0, seed=42))
    losses = dict(enumerate(losses_of(trainer), start=1))
    assert sorted(losses) == list(range(1, STEPS + 1)) and abs(losses[1] - losses[STEPS]) > 1e-3, losses
    return losses


@pytest.mark.multiprocess
def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tiny, constant_lr, reference, tmp_path):
    out, job_log = tmp_path / "run", tmp_path / "job.out"
    # --resume from the first submission: the requeued job runs the same command (no checkpoint yet = step 0).
    args = run_args(tiny, out, constant_lr, save_steps=100) + ["--resume"]
    env = launcher_env(RUN_ARGS=" ".join(args), **slurm_cluster)
    job = sbatch(SCRIPTS / "launch_slurm.sbatch", env, job_log)
    log = lambda: job_log.read_text() if job_log.exists() else "(no job output yet)"  # noqa: E731
    try:
        poll(lambda: len(train_losses(out)) >= 2, JOB_TIMEOUT, "two logged steps", log)
        # No --batch: the signal goes to the job step's tasks (the ranks), as --signal=USR1@120 does.
        subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)
        poll(lambda: int(job_fields(job, env).get("Restarts", 0)) >= 1, 120, "the job to requeue itself", log)
        tag = read_latest(out / "checkpoints")  # the requeued run saves again only at max_steps
        state = wait_for_job(job, env, timeout=2 * JOB_TIMEOUT)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    text = log()
    assert state == "COMPLETED", f"job {job}: {state}\n{text[-6000:]}"
    assert_no_shm_left(text)  # both runs of the job: the port is the job id's
    # The shipped sbatch script's srun started the 2 ranks (tests/test_launchers.py's other launchers; this job is
    # its sbatch + srun run as well, rather than a launch of its own).
    assert text.count("distributed: 2 rank(s), 2 per node, backend gloo, launcher slurm") == 2, text[-6000:]
    assert tag is not None and STEPS > int(tag[5:]) >= 2, f"latest after the preemption: {tag}\n{text[-6000:]}"
    stopped = int(tag[5:])
    assert f"preemption signal received: saving a checkpoint at step {stopped} and exiting with code 75" in text, text[
        -6000:
    ]
    assert f"launch_slurm: job {job} run 0: training exited with code {PREEMPTED_EXIT_CODE}" in text, text[-6000:]
    assert f"resumed from {out / 'checkpoints' / tag} (step {stopped})" in text, text[-6000:]
    assert f"launch_slurm: job {job} run 1: training exited with code 0" in text, text[-6000:]
    assert_complete(out / "checkpoints", tag, ranks=2)
    assert read_latest(out / "checkpoints") == tag_for(STEPS)
    losses = train_losses(out)
    assert sorted(losses) == sorted(reference)
    assert [losses[s] for s in sorted(reference)] == pytest.approx(
        [reference[s] for s in sorted(reference)], rel=1e-5, abs=1e-6
    )


@pytest.mark.multiprocess
def test_sigkill_of_one_rank_resumes_from_last_complete_checkpoint(
    cluster_tools, tiny, constant_lr, reference, tmp_path
):
    out = tmp_path / "run"
    output = kill_rank_after_first_checkpoint(
        run_args(tiny, out, constant_lr, save_steps=2), out / "checkpoints", timeout=JOB_TIMEOUT
    )
    ckpt = out / "checkpoints"
    tag = read_latest(ckpt)
    assert STEPS > int(tag[5:]) >= 2, f"{tag}\n{output[-6000:]}"
    assert_complete(ckpt, tag, ranks=2)

    proc = deepspeed(
        "ds_distill.train", run_args(tiny, out, constant_lr, save_steps=2) + ["--resume"], timeout=JOB_TIMEOUT
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert f"resumed from {ckpt / tag}" in proc.stdout, proc.stdout[-6000:]
    losses = train_losses(out)  # the steps the resumed run redid overwrite those the killed run logged
    assert [losses[s] for s in sorted(reference)] == pytest.approx(
        [reference[s] for s in sorted(reference)], rel=1e-5, abs=1e-6
    )


def test_second_signal_during_save_leaves_a_complete_checkpoint(tiny, dist_env, tmp_path):
    class SignalTwice(Callback):
        """SIGUSR1 after step 2; SIGTERM from inside the checkpoint save that it causes."""

        def __init__(self):
            self.saves = 0

        def on_train_start(self, trainer):
            save = trainer.student.save_checkpoint

            def save_then_signal(*args, **kwargs):
                self.saves += 1
                result = save(*args, **kwargs)  # DeepSpeed's files are written; rng, hf and 'latest' are not yet
                os.kill(os.getpid(), signal.SIGTERM)
                return result

            trainer.student.save_checkpoint = save_then_signal

        def on_step_end(self, trainer, sums):
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    cfg_ds = ds_json(tmp_path)
    out = tmp_path / "p"
    cb = SignalTwice()
    stopped = train.run(make_cfg(tiny, out, max_steps=4, deepspeed_config=cfg_ds), [cb, Preemption(requeue=False)])
    assert stopped.step == 2 and stopped.exit_code == PREEMPTED_EXIT_CODE and cb.saves == 1
    assert read_latest(out / "checkpoints") == tag_for(2)
    assert_complete(out / "checkpoints", tag_for(2), ranks=1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "handlers are restored after the run"
    # The tag loads (test_train checks that a resumed curve equals an uninterrupted one).
    resumed = train.run(
        make_cfg(tiny, out, max_steps=4, resume=True, deepspeed_config=cfg_ds), [Preemption(requeue=False)]
    )
    assert resumed.exit_code == 0 and len(losses_of(resumed)) == 2
