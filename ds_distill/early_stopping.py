"""Early stopping on the eval loss: ``--early_stopping_patience N`` (0 = off) and ``--early_stopping_min_delta D``.

After every evaluation: if the eval loss fell below the best so far by more than ``min_delta``, the student is saved
(a normal checkpoint) and exported to ``output_dir/best`` (a Hugging Face folder, with ``export.json`` naming the
step and loss); otherwise a counter grows, and once ``patience`` evaluations in a row brought no improvement the run
stops (after the usual checkpoint). Evaluations happen every ``--eval_steps``, so patience is counted in evaluations,
not steps. On ``--resume`` the best loss is read back from ``best/export.json``; the counter restarts at 0. A run
that stopped early writes ``best/early_stopped.json`` (``--rounds`` then hands ``best/`` to the next round).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil

from ds_distill import distributed
from ds_distill.callbacks import Callback

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "loss"):
        if patience < 1:
            raise ValueError(f"patience {patience} must be >= 1 (0 means: do not add the callback)")
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.best, self.best_step, self.bad_evals = math.inf, None, 0
        self.stopped_at: int | None = None

    def on_train_start(self, trainer) -> None:
        record = trainer.output_dir / "best" / "export.json"
        if trainer.cfg.resume and record.is_file():  # every rank reads it: all must agree on the best loss
            state = json.loads(record.read_text())
            self.best, self.best_step = state[f"eval_{self.metric}"], state["step"]

    def on_eval(self, trainer, metrics: dict[str, float]) -> None:
        value = metrics[self.metric]  # the same global value on every rank, so every rank takes the same branch
        if value < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = value, trainer.step, 0
            self._save_best(trainer, value)
        else:
            self.bad_evals += 1
            if trainer.rank == 0:
                log.info("early stopping: eval %s %.4g did not beat %.4g (step %s) by %g: %d of %d", self.metric, value,
                         self.best, self.best_step, self.min_delta, self.bad_evals, self.patience)

    def _save_best(self, trainer, value: float) -> None:
        from ds_distill.export import export_checkpoint

        tag = trainer.save()  # a collective: every rank
        if trainer.rank == 0:
            best, tmp = trainer.output_dir / "best", trainer.output_dir / "best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier export
            export_checkpoint(trainer.ckpt_root / tag, tmp)
            (tmp / "export.json").write_text(json.dumps({"step": trainer.step, "tag": tag, f"eval_{self.metric}": value}))
            shutil.rmtree(best, ignore_errors=True)  # the old best goes only once the new one is complete
            os.replace(tmp, best)
            log.info("early stopping: new best eval %s %.4g at step %d, exported to %s", self.metric, value, trainer.step, best)
        distributed.barrier()

    def should_stop(self, trainer) -> bool:
        stop = self.bad_evals >= self.patience
        self.stopped_at = trainer.step if stop else None
        if stop and trainer.rank == 0:
            log.info("early stopping at step %d: %d evaluations without improvement; best step %s in %s",
                     trainer.step, self.bad_evals, self.best_step, trainer.output_dir / "best")
        return stop

    def on_train_end(self, trainer) -> None:
        # Marks the run as finished, though short of max_steps: --rounds hands best/ to the next round.
        if self.stopped_at is not None and trainer.rank == 0 and (trainer.output_dir / "best").is_dir():
            (trainer.output_dir / "best" / "early_stopped.json").write_text(json.dumps({"stopped_at": self.stopped_at, "best_step": self.best_step}))
