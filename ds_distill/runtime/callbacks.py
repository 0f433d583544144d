"""Optional extras plug into the training loop as callbacks, never as branches inside it.

A callback observes and decides; it never rewrites the trainer (what the loss computes is the run's ``Objective``).
It overrides any of the hooks below; the trainer calls them in order, on every rank. Decisions go back to the loop:

- ``on_eval`` returns True to ask for a checkpoint at this step (early stopping's new best): the loop saves once,
  and the callback sees the tag in ``on_save``.
- ``should_stop`` returns this rank's vote, from rank-local state only (a signal may reach one rank): no collective.
  The trainer agrees over the ranks in the next step's one collective (``ds_distill.core.step_sync``): if any rank voted,
  every rank stops at the same step, calls ``on_stop`` of the callbacks that voted, and saves once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Trainer(Protocol):
    """What a callback may read of the trainer (``ds_distill.core.trainer.Trainer`` satisfies it): read, never write."""

    cfg: Any  # the run's RunConfig
    step: int  # optimizer steps done
    rank: int
    world_size: int
    output_dir: Path
    history: list[dict[str, float]]  # the metrics logged so far, in order


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None:
        """After models, data and any resumed state are ready."""

    def on_step_end(self, trainer: "Trainer", step_sums: dict[str, Any]) -> None:
        """After each optimizer step. ``step_sums``: device tensors (no host sync), incl. per-example sums."""

    def on_eval(self, trainer: "Trainer", metrics: dict[str, float]) -> bool | None:
        """After each evaluation (every rank gets the same global metrics). Return True to have this step saved."""

    def on_save(self, trainer: "Trainer", tag: str) -> None:
        """After a checkpoint is complete and named by ``latest`` (every rank)."""

    def should_stop(self, trainer: "Trainer") -> bool:
        """This rank's vote to end training, asked at every step boundary after the step's eval and checkpoint.
        Rank-local, no collective: the trainer agrees over the ranks and stops all of them at this step."""
        return False

    def on_stop(self, trainer: "Trainer") -> None:
        """The ranks agreed to stop at this step because this callback voted on some rank; called on every rank,
        before the step's checkpoint."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """Once at the end (after the final checkpoint and export). May set ``trainer.exit_code``."""
