"""Hidden-state distillation beside the loop: a teacher source that adds ``--hidden_weight`` x the hidden-state loss
of the mapped layer pairs (``--hidden_loss``, ``--hidden_layers``) to the live teachers' logit loss.

The loop does not change (``--hidden_mode output``, the default): ``targets`` runs the teacher forward with forward
hooks on the mapped teacher layers only
(``models.capture.LayerCapture``: exactly one kept tensor per pair, never ``output_hidden_states``) and arms the hooks
on the mapped student layers for the student forward that follows; ``loss_sums`` takes the student's states and adds

    hidden_weight * sum over pairs and supervised tokens of hidden_loss(student layer s output, teacher layer t output)

to ``LossSums.total`` (the trainer divides it by the global supervised token count of the step, as the KD term), and
reports the unweighted sums as ``extra`` metrics: ``hidden`` and one ``hidden_s{s}_t{t}`` per pair.

``--hidden_mode layerwise`` (block-local, the published recipe for depth-pruned students): with pairs (i, t_i) for
every student layer i, t_i increasing, the teacher forward keeps its *inputs* to layers t_0 .. t_(k-1) and its last
layer's output; in the training step's student forward, layer i is fed the teacher's input to t_i
(``models.capture.LayerFeed``) and its output is matched to the teacher's input to t_(i+1) (the last layer's to the
teacher's last output): each student layer learns to replace the teacher block t_i .. t_(i+1) - 1 it stands for, with
no gradient between layers. The logit loss scores that same forward (the last layer fed). Eval steps run the
student's own forward against the same targets. The teacher keeps k + 1 tensors.

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
from ds_distill.models.capture import LayerCapture, LayerFeed, decoder_layers
from ds_distill.models.layer_map import check_layerwise, hidden_layer_map
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
        mode: "output" or "layerwise" (module docstring; the pairs then checked by ``layer_map.check_layerwise``).
    The student's ``HiddenProjection`` (its child ``models.projection.NAME``), when it has one, maps its states.
    """

    def __init__(
        self,
        inner: LiveTeachers,
        student,
        pairs: list[tuple[int, int]],
        *,
        loss: str,
        weight: float,
        chunk_size: int,
        mode: str = "output",
    ):
        self.inner, self.pairs, self.loss, self.weight, self.chunk_size = inner, pairs, loss, weight, chunk_size
        self.mode = mode
        t_layers = decoder_layers(inner.engines[0].module, "the teacher")
        s_layers = decoder_layers(student.module, "the student")
        layerwise = mode == "layerwise"
        self.teacher_capture = LayerCapture(t_layers, [t for _, t in pairs], inputs=layerwise)
        self.teacher_last = LayerCapture(t_layers, [len(t_layers) - 1]) if layerwise else None
        self.feed = LayerFeed(s_layers, [s for s, _ in pairs]) if layerwise else None
        self.student_capture = LayerCapture(s_layers, [s for s, _ in pairs])
        self.names = [f"hidden_s{s}_t{t}" for s, t in pairs]
        projection = getattr(student.module, NAME, None)
        self.projections = projection.for_pairs(pairs) if projection is not None else None

    @property
    def engines(self) -> list:
        return self.inner.engines

    @torch.no_grad()
    def targets(self, batch: Batch, split: str) -> tuple[Any, list[torch.Tensor]]:
        self.teacher_capture.arm()
        if self.feed is not None:
            self.teacher_last.arm()
        logits_targets = self.inner.targets(batch, split)
        teacher_states = self.teacher_capture.take()
        if self.feed is not None:  # layerwise: inputs to t_0 .. t_(k-1) feed the student; targets: t_1 .. and the last
            inputs, teacher_states = teacher_states, teacher_states[1:] + self.teacher_last.take()
            if split == "train":
                self.feed.arm(inputs)
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
        if self.feed is not None and self.feed.armed:
            raise RuntimeError(f"--hidden_mode layerwise: student layers {sorted(self.feed.pending)} were never fed")
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
    if cfg.hidden_mode == "layerwise":
        check_layerwise(pairs, s_cfg.num_hidden_layers, cfg.hidden_layers)
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
        "hidden-state loss %s x %g on layer pairs (student:teacher) %s%s, mode %s",
        cfg.hidden_loss,
        cfg.hidden_weight,
        pairs,
        widths,
        cfg.hidden_mode,
    )
    return HiddenStateTeachers(
        source,
        student,
        pairs,
        loss=cfg.hidden_loss,
        weight=cfg.hidden_weight,
        chunk_size=cfg.chunk_size,
        mode=cfg.hidden_mode,
    )


def projection_for(cfg, teachers: list[str]) -> HiddenProjection | None:
    """The learned projections the student's engine must hold for ``cfg``'s hidden-state loss, read from the models'
    config.json files before any model loads: one per ``--hidden_layers`` pair (or one for all with
    ``--hidden_projection shared``) when the student's hidden size differs from the teacher's (``teachers``: the
    teacher paths that load), else None (the loss compares states as they are). Errors (one line): the pairs'
    (``hidden_layer_map``), a LoRA student (``--lora_r``: its export merges the adapters, with no place for trained
    projections), and ``--hidden_projection shared`` with equal widths (nothing to learn)."""
    if not cfg.hidden_loss or len(teachers) != 1:
        return None  # off, or refused with its reason once the teacher source is known (wrap)
    s_cfg, t_cfg = model_config(cfg.student).get_text_config(), model_config(teachers[0]).get_text_config()
    if s_cfg.hidden_size == t_cfg.hidden_size:
        if cfg.hidden_projection == "shared":
            raise UsageError(
                f"--hidden_projection shared: the student's hidden size equals the teacher's ({s_cfg.hidden_size}), "
                "so no projection is learned: drop --hidden_projection"
            )
        return None
    if cfg.hidden_mode == "layerwise":
        raise UsageError(
            f"--hidden_mode layerwise feeds the teacher's states into the student's layers, but the student's hidden "
            f"size {s_cfg.hidden_size} differs from the teacher's {t_cfg.hidden_size}: use --hidden_mode output "
            "(learned projections) or a student of the teacher's width"
        )
    if cfg.lora_r:
        raise UsageError(
            f"--hidden_loss with --lora_r: the student's hidden size {s_cfg.hidden_size} differs from the teacher's "
            f"{t_cfg.hidden_size}, which needs learned projections, not supported with LoRA: drop --lora_r or use a "
            "student of the teacher's width"
        )
    pairs = hidden_layer_map(cfg.hidden_layers, cfg.student, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    shared = cfg.hidden_projection == "shared"
    return HiddenProjection(pairs, s_cfg.hidden_size, t_cfg.hidden_size, seed=cfg.seed, shared=shared)
