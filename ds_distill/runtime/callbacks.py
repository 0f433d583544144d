"""Optional extras plug into the training loop as callbacks, never as branches inside it.

A callback observes and decides; it never rewrites the trainer (what the loss computes is the run's ``Objective``).
It overrides any of the hooks below; the trainer calls them in order, on every rank. Decisions go back to the loop:

- ``on_eval`` returns True to ask for a checkpoint at this step (early stopping's new best): the loop saves once,
  and the callback sees the tag in ``on_save``.
- ``should_stop`` returns this rank's vote, from rank-local state only (a signal may reach one rank): no collective.
  The trainer agrees over the ranks in the next step's one collective (``ds_distill.core.step_sync``): if any rank
  voted,
  every rank stops at the same step, calls ``on_stop`` of the callbacks that voted, and saves once. ``on_stop``
  returns the run's exit code (preemption: 75); the trainer owns ``exit_code``.
- Nothing a callback holds writes the trainer's state: the ``Trainer`` protocol below is a read-only view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Trainer(Protocol):
    """What a callback may read of the trainer (``ds_distill.core.trainer.Trainer`` satisfies it): read-only properties,
    so a type checker refuses a write. The trainer's own state changes only through the loop and its methods."""

    @property
    def cfg(self) -> Any: ...  # the run's RunConfig (``cfg.is_log_step(step)``: whether a step logs)
    @property
    def step(self) -> int: ...  # optimizer steps done
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def device(self) -> Any: ...  # this rank's torch.device
    @property
    def output_dir(self) -> Path: ...
    @property
    def train(self) -> Any: ...  # the training batch stream (``.dataset``: the training set)
    @property
    def eval_set(self) -> Any: ...  # the held-out set, or None
    @property
    def source_ids(self) -> Any: ...  # data.SourceIds: batches' example_ids (row numbers) -> the data's ids
    @property
    def history(self) -> list[dict[str, float]]: ...  # the metrics logged so far, in order
    @property
    def exit_code(self) -> int: ...  # the run's exit code: 0, or what the ``on_stop`` of a stopping callback returned

    def log_metrics(self, metrics: dict[str, float], prefix: str) -> None:
        """Log ``{prefix}/{name}`` metrics at this step (history, monitors, console): a callback's own metrics."""


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

    def on_stop(self, trainer: "Trainer") -> int | None:
        """The ranks agreed to stop at this step because this callback voted on some rank; called on every rank,
        before the step's checkpoint. Returns the exit code the run ends with (None or 0: a normal end; the first
        non-zero code of the callbacks that voted wins), which the trainer keeps as ``exit_code``."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """Once at the end (after the final checkpoint and export)."""

    def on_exit(self, trainer: "Trainer") -> None:
        """Once when the run is over, however it ended (after ``on_train_end``, or after an error): give back what
        ``on_train_start`` or the run took from the process (signal handlers, threads, connections), so a library
        caller's process is as it was."""
