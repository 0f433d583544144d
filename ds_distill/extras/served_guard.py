"""``ServedGuard``: a served teacher that stays unavailable stops the run at a step boundary with a checkpoint of the
last finished step and exit code 75 (the preemption code), so ``--resume`` continues the same curve."""

from __future__ import annotations

import logging

from ds_distill.extras.preemption import PREEMPTED_EXIT_CODE
from ds_distill.runtime.callbacks import Callback
from ds_distill.teachers.served import ServedStream
from ds_distill.teachers.server_client import ServerUnavailable

log = logging.getLogger("ds_distill")


class ServedGuard(Callback):
    """Before each step, waits for the step's served targets; a server still unavailable after the client's retries
    votes to stop (every rank stops at this step boundary, saves the last finished step) and the run exits 75."""

    def __init__(self, stream: ServedStream, micro_batches: int):
        self.stream, self.micro_batches = stream, micro_batches
        self.failure: str | None = None  # this rank's error

    def should_stop(self, trainer) -> bool:
        if self.failure is None and trainer.step < trainer.cfg.max_steps:
            for future in self.stream.upcoming(self.micro_batches):
                try:
                    future.result()
                except ServerUnavailable as exc:
                    self.failure = str(exc)
                    break
        return self.failure is not None

    def on_stop(self, trainer) -> int:
        """Called on every rank once a server failed on some rank: the run ends with the preemption code."""
        if self.failure is not None:
            log.error(
                "the teacher server is unavailable (%s): saving step %d and exiting with code %d; rerun with --resume "
                "once it is back",
                self.failure,
                trainer.step,
                PREEMPTED_EXIT_CODE,
            )
        return PREEMPTED_EXIT_CODE

    def on_exit(self, trainer) -> None:  # an error included
        self.stream.teacher.close()
