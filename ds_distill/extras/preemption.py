"""Preemption: on SIGTERM or SIGUSR1, finish the step, agree across ranks, checkpoint, exit with a distinct code.

The ranks agree at the next step boundary (``ds_distill.core.step_sync``): the signal's vote travels in the next step's
one collective, before that step's work, and every rank stops at the step the signal arrived in.

SLURM sends SIGUSR1 ahead of the time limit with ``#SBATCH --signal=USR1@120`` (and ``scancel --signal=USR1``);
schedulers send SIGTERM before killing. The handler only records the signal: the trainer saves at the next step
boundary, so a second signal during the save changes nothing and ``latest`` always names a complete checkpoint.
Under SLURM the batch script requeues the job when the step exits with that code (scripts/launch_slurm.sbatch), and
the requeued job resumes with ``--resume``. A requeue from inside the step would cancel the step it runs in: the ranks
get SIGTERM while they exit and the script never sees the code; ``requeue=True`` does it anyway, for batch scripts
that cannot act on the exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from ds_distill.runtime.callbacks import Callback, Trainer

log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", distinct from success (0) and usage errors (2)


class Preemption(Callback):
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1), requeue: bool = False):
        self.signals, self.requeue = signals, requeue
        self.received: int | None = None
        self.stopped = False
        self.previous: dict[int, object] = {}

    def on_train_start(self, trainer) -> None:
        self.previous = {sig: signal.signal(sig, self._record) for sig in self.signals}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def should_stop(self, trainer) -> bool:
        # The signal may reach only some ranks: this is this rank's vote, a host boolean (no device tensor, no sync);
        # the trainer agrees over the ranks in the next step's one collective and stops them all at the same step.
        return self.received is not None

    def on_stop(self, trainer: Trainer) -> int:
        self.stopped = True  # on every rank, also those the signal did not reach
        if trainer.rank == 0:
            log.info(
                "preemption signal received: saving a checkpoint at step %d and exiting with code %d",
                trainer.step,
                PREEMPTED_EXIT_CODE,
            )
        return PREEMPTED_EXIT_CODE  # the trainer's exit_code: the job exits with it after the checkpoint

    def on_exit(self, trainer: Trainer) -> None:  # after an error too: a library caller's handlers come back
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def on_train_end(self, trainer: Trainer) -> None:
        if not self.stopped:
            return
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.rank == 0:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            log.info("scontrol requeue %s: %s", job, "ok" if result.returncode == 0 else result.stderr.strip())
