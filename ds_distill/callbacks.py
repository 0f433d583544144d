"""Optional extras plug into the training loop as callbacks, never as branches inside it.

A callback overrides any of the hooks below; the trainer calls them in order. ``should_stop`` is asked once per
optimizer step on every rank; a callback whose decision depends on rank-local state (a signal that reached one rank)
must make the ranks agree itself (e.g. an all-reduce), since the trainer saves a checkpoint when any says stop.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ds_distill.train import Trainer


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None:
        """After models, data and any resumed state are ready."""

    def on_step_end(self, trainer: "Trainer", step_sums: dict[str, Any]) -> None:
        """After each optimizer step. ``step_sums``: device tensors (no host sync), incl. per-example sums."""

    def on_eval(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """After each evaluation (every rank gets the same global metrics)."""

    def on_save(self, trainer: "Trainer", tag: str) -> None:
        """After a checkpoint is complete and named by ``latest``."""

    def should_stop(self, trainer: "Trainer") -> bool:
        """Return True to end training after this step (a checkpoint is saved first)."""
        return False

    def on_train_end(self, trainer: "Trainer") -> None:
        """Once at the end (after the final checkpoint and export). May set ``trainer.exit_code``."""
