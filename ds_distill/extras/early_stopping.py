"""Early stopping on the eval loss: ``--early_stopping_patience N`` (0 = off) and ``--early_stopping_min_delta D``.

After every evaluation: if the eval loss fell below the best so far by more than ``min_delta``, the callback asks the
loop for a checkpoint of this step (the loop saves once, also at a ``--save_steps`` step) and, once it is complete,
exports it to ``output_dir/best`` (``checkpoint.export_best``: a Hugging Face folder, with ``export.json`` naming the
step and loss); otherwise a counter grows, and once ``patience`` evaluations in a row brought no improvement the run
stops: this callback votes to stop and the loop saves the step once. Evaluations happen every ``--eval_steps``, so
patience is counted in evaluations,
not steps. On ``--resume`` the best loss is read back from ``best/export.json``; the counter restarts at 0. A run
that stopped early writes ``best/early_stopped.json`` (``--rounds`` then hands ``best/`` to the next round).
"""

from __future__ import annotations

import logging
import math

from ds_distill.core import checkpoint
from ds_distill.runtime import distributed
from ds_distill.runtime.callbacks import Callback

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "loss"):
        if patience < 1:
            raise ValueError(f"patience {patience} must be >= 1 (0 means: do not add the callback)")
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.best, self.best_step, self.bad_evals = math.inf, None, 0
        self.unexported: int | None = None  # the step of a new best whose checkpoint the loop has not saved yet
        self.stopped_at: int | None = None

    def on_train_start(self, trainer) -> None:
        record = checkpoint.read_best(trainer.output_dir)
        if trainer.cfg.resume and record:  # every rank reads it: all must agree on the best loss
            self.best, self.best_step = record[f"eval_{self.metric}"], record["step"]

    def on_eval(self, trainer, metrics: dict[str, float]) -> bool:
        value = metrics[self.metric]  # the same global value on every rank, so every rank takes the same branch
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals, self.unexported = value, trainer.step, 0, trainer.step
            return True  # a new best: save this step (on_save exports it)
        self.bad_evals += 1
        if trainer.rank == 0:
            log.info(
                "early stopping: eval %s %.4g did not beat %.4g (step %s) by %g: %d of %d",
                self.metric,
                value,
                self.best,
                self.best_step,
                self.min_delta,
                self.bad_evals,
                self.patience,
            )
        return False

    def on_save(self, trainer, tag: str) -> None:
        if self.unexported != trainer.step:
            return
        self.unexported = None
        if trainer.rank == 0:
            best = checkpoint.export_best(
                trainer.output_dir, tag, {"step": trainer.step, "tag": tag, f"eval_{self.metric}": self.best}
            )
            log.info(
                "early stopping: new best eval %s %.4g at step %d, exported to %s",
                self.metric,
                self.best,
                trainer.step,
                best,
            )
        distributed.barrier()  # best/ is complete before any rank reads it (a resume, the next round)

    def should_stop(self, trainer) -> bool:
        return self.bad_evals >= self.patience  # from the global eval metrics: the same vote on every rank

    def on_stop(self, trainer) -> None:
        self.stopped_at = trainer.step
        if trainer.rank == 0:
            log.info(
                "early stopping at step %d: %d evaluations without improvement; best step %s in %s",
                trainer.step,
                self.bad_evals,
                self.best_step,
                checkpoint.best_dir(trainer.output_dir),
            )

    def on_train_end(self, trainer) -> None:
        # Marks the run as finished, though short of max_steps: --rounds hands best/ to the next round.
        if self.stopped_at is not None and trainer.rank == 0 and checkpoint.best_dir(trainer.output_dir).is_dir():
            checkpoint.mark_early_stopped(
                trainer.output_dir, {"stopped_at": self.stopped_at, "best_step": self.best_step}
            )
