"""The anchor of on-policy training (``--on_policy_anchor W``): on every micro-batch the student sampled, also the
cross-entropy of the dataset's own completions for the same prompts, so that the student keeps writing the data's text
while it learns from its own (MiniLLM's language-modelling loss, Gu et al. 2024, "MiniLLM: Knowledge Distillation of
Large Language Models", ICLR: L = L_pg + L_PT, the pre-training corpus' LM loss added to the policy loss).

Per optimizer step the loss becomes

    [sum over supervised tokens of (alpha * CE + (1 - alpha) * T^2 * D)  +  W * sum over the sampled micro-batches'
     dataset completion tokens of CE(student, dataset token)]  /  the step's global count of supervised tokens

i.e. the anchor's sum is normalised like every other term (by the step's supervised tokens, all ranks): with dataset
completions about as long as the samples, W weighs a completion token's CE against a sampled token's KD term.

It plugs in beside the loop as a teacher source (``AnchoredTeachers``, the way ``teachers.hidden`` adds its loss): the
on-policy stream keeps the micro-batch it replaced as ``Batch.anchor``; ``targets`` runs the student on it (with
gradients) before the inner source's targets, so the loop's own student forward is still the last one (an MoE student's
router loss is the sampled rows'; the anchor's forward adds none), and ``loss_sums`` adds ``W x`` its CE sum to the
inner loss (logged unweighted as ``anchor_ce``, per supervised token like the rest). W = 0: nothing is wrapped and no
anchor is kept: the run is today's, to the bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ds_distill import losses
from ds_distill.data.batching import Batch


class AnchoredTeachers:
    """A ``TeacherSource``: ``inner``'s targets and loss, plus ``weight`` x the student's CE on ``Batch.anchor``.

    student: the student engine (called as the loop calls it: ``student(**inputs)`` -> final hidden states
    ``[B, T, H]``); chunk_size: tokens per loss chunk of the anchor's CE (0: full logits), its head one call either
    way on the fused path, so ZeRO-3 ranks stay in step whatever their token counts."""

    def __init__(self, inner, student, *, weight: float, chunk_size: int):
        self.inner, self.student, self.weight, self.chunk_size = inner, student, weight, chunk_size

    @property
    def engines(self) -> list:
        return self.inner.engines

    def targets(self, batch: Batch, split: str) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
        anchor = None
        if batch.anchor is not None:  # before the inner targets: a hidden-state source arms its hooks there
            anchor = (self.student(**batch.anchor.inputs), batch.anchor.labels)
        return self.inner.targets(batch, split), anchor

    def loss_sums(
        self,
        student_hidden: torch.Tensor,
        student_head: Callable,
        targets: tuple[Any, tuple[torch.Tensor, torch.Tensor] | None],
        labels: torch.Tensor,
        **kw: Any,
    ) -> losses.LossSums:
        inner_targets, anchor = targets
        out = self.inner.loss_sums(student_hidden, student_head, inner_targets, labels, **kw)
        if anchor is None:
            return out
        hidden, anchor_labels = anchor
        ce = anchor_ce_sum(hidden, student_head, anchor_labels, self.chunk_size, kw.get("vocab_size"))
        return dataclasses.replace(
            out, total=out.total + self.weight * ce, extra={**out.extra, "anchor_ce": ce.detach()}
        )


def anchor_ce_sum(
    hidden: torch.Tensor, head: Callable, labels: torch.Tensor, chunk_size: int, vocab_size: int | None
) -> torch.Tensor:
    """Sum over the supervised tokens of CE(student, label), nats: ``hidden`` ``[B, T, H]``, labels ``[B, T]``."""
    if chunk_size:
        kw = dict(chunk_size=chunk_size, vocab_size=vocab_size, alpha=1.0)
        return losses.chunked_loss_sums(hidden, head, None, [], labels, **kw).total
    return losses.loss_sums(head(hidden), [], labels, alpha=1.0, vocab_size=vocab_size).total


def wrap(cfg, source, student):
    """``source`` with the anchor of ``cfg.on_policy_anchor`` added, or ``source`` itself when it is 0."""
    if not cfg.on_policy_anchor:
        return source
    return AnchoredTeachers(source, student, weight=cfg.on_policy_anchor, chunk_size=cfg.chunk_size)
