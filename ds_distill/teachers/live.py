"""Where a micro-batch's teacher targets come from: live teacher engines, or a cache of their top-K (teacher_cache).

The training loop reads ``targets = teachers.targets(...)`` then ``teachers.loss_sums(student_hidden, ...)``; any object
with these two methods is a teacher source:

    targets(batch, split) -> an opaque per-micro-batch value (what loss_sums needs)
        batch: a ``data.Batch`` with its model inputs on the device (``batch.inputs``), labels ``[B, T]`` and
        example_ids ``[B]`` on the host; split: "train" or "eval" (which data the batch came from). Runs without grad.
    loss_sums(student_hidden, student_head, targets, labels, *, chunk_size, num_chunks, **loss_kw) -> losses.LossSums
        chunk_size 0: full logits; else the student head is called per chunk (``num_chunks`` times, see
        ``losses.chunked_loss_sums``). loss_kw: loss, alpha, temperature, beta, skew, vocab_size, teacher_weights.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from ds_distill import losses
from ds_distill.data.batching import Batch


class TeacherSource(Protocol):
    def targets(self, batch: Batch, split: str) -> Any: ...

    def loss_sums(
        self,
        student_hidden: torch.Tensor,
        student_head: Callable,
        targets: Any,
        labels: torch.Tensor,
        *,
        chunk_size: int,
        num_chunks: int | None,
        **loss_kw: Any,
    ) -> losses.LossSums: ...


class LiveTeachers:
    """Frozen teacher engines (``models.teacher_engine``; an ensemble when several): targets are their final hidden
    states, the loss calls their heads. No engines (alpha = 1, plain fine-tuning): no forward at all."""

    def __init__(self, engines: list):
        self.engines = list(engines)

    @torch.no_grad()
    def targets(self, batch: Batch, split: str) -> list[torch.Tensor]:
        return [t(**batch.inputs) for t in self.engines]

    def loss_sums(
        self,
        student_hidden: torch.Tensor,
        student_head: Callable,
        targets: list[torch.Tensor],
        labels: torch.Tensor,
        *,
        chunk_size: int,
        num_chunks: int | None,
        **loss_kw: Any,
    ) -> losses.LossSums:
        heads = [t.module.head for t in self.engines]
        if chunk_size:
            return losses.chunked_loss_sums(
                student_hidden,
                student_head,
                targets,
                heads,
                labels,
                chunk_size=chunk_size,
                num_chunks=num_chunks,
                **loss_kw,
            )
        return losses.loss_sums(student_head(student_hidden), [h(x) for h, x in zip(heads, targets)], labels, **loss_kw)
