"""Hidden-state distillation beside the loop: a teacher source that adds ``--hidden_weight`` x the hidden-state loss
of the mapped layer pairs (``--hidden_loss``, ``--hidden_layers``) to the live teachers' logit loss.

The loop does not change: ``targets`` runs the teacher forward with forward hooks on the mapped teacher layers only
(``models.capture.LayerCapture``: exactly one kept tensor per pair, never ``output_hidden_states``) and arms the hooks
on the mapped student layers for the student forward that follows; ``loss_sums`` takes the student's states and adds

    hidden_weight * sum over pairs and supervised tokens of hidden_loss(student layer s output, teacher layer t output)

to ``LossSums.total`` (the trainer divides it by the global supervised token count of the step, as the KD term), and
reports the unweighted sums as ``extra`` metrics: ``hidden`` and one ``hidden_s{s}_t{t}`` per pair.

A student of another width than the teacher's gets learned projections (``models.projection``): ``projection_for``
builds them before the student's engine (which then trains, partitions and checkpoints them) and the loss maps the
student's states through them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from ds_distill import losses
from ds_distill.common import UsageError
from ds_distill.data.batching import Batch
from ds_distill.losses.hidden import hidden_loss_sums
from ds_distill.models.capture import LayerCapture, decoder_layers
from ds_distill.models.layer_map import hidden_layer_map
from ds_distill.models.loading import model_config
from ds_distill.models.projection import NAME, HiddenProjection
from ds_distill.teachers.live import LiveTeachers, TeacherSource

log = logging.getLogger("ds_distill")


class HiddenStateTeachers:
    """A ``TeacherSource``: the live teachers' targets and loss, plus the hidden-state loss of ``pairs``.

    Args:
        inner: the live teachers (one engine: with an ensemble the map of a student layer is ambiguous).
        student: the student engine (its module is a ``HiddenStatesLM``); pairs: (student layer, teacher layer).
        loss: a name in ``losses.hidden.HIDDEN_LOSSES``; weight: its weight in the total; chunk_size: tokens per chunk.
    The student's ``HiddenProjection`` (its child ``models.projection.NAME``), when it has one, maps its states.
    """

    def __init__(
        self, inner: LiveTeachers, student, pairs: list[tuple[int, int]], *, loss: str, weight: float, chunk_size: int
    ):
        self.inner, self.pairs, self.loss, self.weight, self.chunk_size = inner, pairs, loss, weight, chunk_size
        teacher = inner.engines[0].module
        self.teacher_capture = LayerCapture(decoder_layers(teacher, "the teacher"), [t for _, t in pairs])
        self.student_capture = LayerCapture(decoder_layers(student.module, "the student"), [s for s, _ in pairs])
        self.names = [f"hidden_s{s}_t{t}" for s, t in pairs]
        projection = getattr(student.module, NAME, None)
        self.projections = projection.for_pairs(pairs) if projection is not None else None

    @property
    def engines(self) -> list:
        return self.inner.engines

    @torch.no_grad()
    def targets(self, batch: Batch, split: str) -> tuple[Any, list[torch.Tensor]]:
        self.teacher_capture.arm()
        logits_targets = self.inner.targets(batch, split)
        teacher_states = self.teacher_capture.take()
        self.student_capture.arm()  # the student forward comes next (the loop: targets, student forward, loss)
        return logits_targets, teacher_states

    def loss_sums(
        self,
        student_hidden: torch.Tensor,
        student_head: Callable,
        targets: tuple[Any, list[torch.Tensor]],
        labels: torch.Tensor,
        **kw: Any,
    ) -> losses.LossSums:
        logits_targets, teacher_states = targets
        student_states = self.student_capture.take()
        out = self.inner.loss_sums(student_hidden, student_head, logits_targets, labels, **kw)
        per_pair = hidden_loss_sums(
            student_states,
            teacher_states,
            labels,
            loss=self.loss,
            chunk_size=self.chunk_size,
            projections=self.projections,
        )
        hidden = per_pair.sum()
        extra = {"hidden": hidden.detach(), **{n: v.detach() for n, v in zip(self.names, per_pair)}}
        return dataclasses.replace(out, total=out.total + self.weight * hidden, extra={**out.extra, **extra})


def wrap(cfg, source: TeacherSource, student) -> TeacherSource:
    """``source`` with the hidden-state loss of ``cfg.hidden_loss`` added, or ``source`` itself when it is off.
    Errors (one line): a source other than live teacher engines (cache, served), an ensemble, unequal hidden sizes."""
    if not cfg.hidden_loss:
        return source
    if not isinstance(source, LiveTeachers) or not source.engines:
        raise UsageError(
            f"--hidden_loss needs a live --teacher model (the teacher source is {type(source).__name__}): hidden "
            "states are not stored in a teacher cache nor served; drop --hidden_loss or pass --teacher"
        )
    if len(source.engines) != 1:
        raise UsageError(
            f"--hidden_loss with {len(source.engines)} teachers: which teacher layer a student layer maps to is "
            "ambiguous in an ensemble; pass one --teacher"
        )
    s_cfg, t_cfg = student.module.config.get_text_config(), source.engines[0].module.config.get_text_config()
    pairs = hidden_layer_map(cfg.hidden_layers, cfg.student, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    if s_cfg.hidden_size != t_cfg.hidden_size and getattr(student.module, NAME, None) is None:
        raise UsageError(
            f"--hidden_loss: the student's hidden size {s_cfg.hidden_size} differs from the teacher's "
            f"{t_cfg.hidden_size} and its engine holds no projections: build it with "
            "teachers.hidden.projection_for (as core.build does)"
        )
    widths = (
        ""
        if s_cfg.hidden_size == t_cfg.hidden_size
        else f", learned projections {s_cfg.hidden_size}->{t_cfg.hidden_size}"
    )
    log.info(
        "hidden-state loss %s x %g on layer pairs (student:teacher) %s%s",
        cfg.hidden_loss,
        cfg.hidden_weight,
        pairs,
        widths,
    )
    return HiddenStateTeachers(
        source, student, pairs, loss=cfg.hidden_loss, weight=cfg.hidden_weight, chunk_size=cfg.chunk_size
    )


def projection_for(cfg, teachers: list[str]) -> HiddenProjection | None:
    """The learned projections the student's engine must hold for ``cfg``'s hidden-state loss, read from the models'
    config.json files before any model loads: one per ``--hidden_layers`` pair when the student's hidden size differs
    from the teacher's (``teachers``: the teacher paths that load), else None (the loss compares states as they are).
    Errors (one line): the pairs' (``hidden_layer_map``), and a LoRA student (``--lora_r``: its export merges the
    adapters, with no place for trained projections)."""
    if not cfg.hidden_loss or len(teachers) != 1:
        return None  # off, or refused with its reason once the teacher source is known (wrap)
    s_cfg, t_cfg = model_config(cfg.student).get_text_config(), model_config(teachers[0]).get_text_config()
    if s_cfg.hidden_size == t_cfg.hidden_size:
        return None
    if cfg.lora_r:
        raise UsageError(
            f"--hidden_loss with --lora_r: the student's hidden size {s_cfg.hidden_size} differs from the teacher's "
            f"{t_cfg.hidden_size}, which needs learned projections, not supported with LoRA: drop --lora_r or use a "
            "student of the teacher's width"
        )
    pairs = hidden_layer_map(cfg.hidden_layers, cfg.student, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    return HiddenProjection(pairs, s_cfg.hidden_size, t_cfg.hidden_size, seed=cfg.seed)
