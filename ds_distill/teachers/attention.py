"""Attention-relation distillation beside the loop (``--attention_relation_weight W``): a teacher source that adds

    W * sum over supervised tokens of [KL_qq + KL_kk + KL_vv]   (``losses.attention``: MiniLMv2's relations)

between one teacher layer (``--attention_relation_layer``, default its last) and the student's last layer, split into
``--attention_relation_heads`` relation heads (so the two need not have the same attention heads or widths). The
query, key and value vectors are the outputs of each layer's ``q_proj``, ``k_proj`` and ``v_proj`` (before rotary
embeddings), kept by forward hooks on those six modules only (``models.capture.LayerCapture``: three tensors per
model, never ``output_attentions``). Logged unweighted as ``attention`` and ``attention_query``/``_key``/``_value``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from ds_distill import losses
from ds_distill.common import UsageError
from ds_distill.data.batching import Batch
from ds_distill.losses.attention import KINDS, relation_loss_sums
from ds_distill.models.capture import LayerCapture, attention_projections, decoder_layers

log = logging.getLogger("ds_distill")


class AttentionRelationTeachers:
    """A ``TeacherSource``: ``inner``'s targets and loss, plus ``weight`` x the relation loss of teacher layer
    ``layer`` against the student's last layer with ``heads`` relation heads (module docstring). ``inner`` has one
    live teacher engine (``inner.engines[0]``)."""

    def __init__(self, inner, student, *, layer: int, heads: int, weight: float):
        self.inner, self.heads, self.weight = inner, heads, weight
        t_layers = decoder_layers(inner.engines[0].module, "the teacher")
        s_layers = decoder_layers(student.module, "the student")
        self.teacher_capture = LayerCapture(attention_projections(t_layers[layer], "the teacher"), [0, 1, 2])
        self.student_capture = LayerCapture(attention_projections(s_layers[-1], "the student"), [0, 1, 2])

    @property
    def engines(self) -> list:
        return self.inner.engines

    @torch.no_grad()
    def targets(self, batch: Batch, split: str) -> tuple[Any, list[torch.Tensor], torch.Tensor]:
        self.teacher_capture.arm()
        inner = self.inner.targets(batch, split)
        teacher = self.teacher_capture.take()
        self.student_capture.arm()  # the student forward comes next (the loop: targets, student forward, loss)
        mask = batch.inputs.get("attention_mask")
        keep = torch.ones_like(batch.inputs["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
        return inner, teacher, keep

    def loss_sums(
        self, student_hidden: torch.Tensor, student_head: Callable, targets: tuple, labels: torch.Tensor, **kw: Any
    ) -> losses.LossSums:
        inner, teacher, keep = targets
        student = self.student_capture.take()
        out = self.inner.loss_sums(student_hidden, student_head, inner, labels, **kw)
        per_kind = relation_loss_sums(student, teacher, labels, keep, self.heads)
        total = per_kind.sum()
        extra = {"attention": total.detach(), **{f"attention_{k}": v.detach() for k, v in zip(KINDS, per_kind)}}
        return dataclasses.replace(out, total=out.total + self.weight * total, extra={**out.extra, **extra})


def wrap(cfg, source, student):
    """``source`` with the relation loss of ``cfg.attention_relation_weight`` added, or ``source`` itself when it is
    0. Errors (one line): no single live teacher engine, a layer out of range, widths the relation heads do not
    divide, a fused attention projection."""
    if not cfg.attention_relation_weight:
        return source
    engines = getattr(source, "engines", None)
    if not engines or len(engines) != 1 or getattr(source, "sparse", None) is not None:
        raise UsageError(
            f"--attention_relation_weight needs one live --teacher model (the teacher source is "
            f"{type(source).__name__}): attention is not stored in a cache nor served; pass one --teacher"
        )
    t_cfg = engines[0].module.config.get_text_config()
    s_cfg = student.module.config.get_text_config()
    layer = cfg.attention_relation_layer
    if not -t_cfg.num_hidden_layers <= layer < t_cfg.num_hidden_layers:
        raise UsageError(
            f"--attention_relation_layer {layer} is not a layer of the teacher ({t_cfg.num_hidden_layers} layers): "
            f"use 0 .. {t_cfg.num_hidden_layers - 1}, or -1 for its last"
        )
    # Default: the student's KV heads, which divide all three of its widths (its query heads are a multiple).
    heads = cfg.attention_relation_heads or getattr(s_cfg, "num_key_value_heads", None) or s_cfg.num_attention_heads
    widths = {f"{who} {kind}": w for who, c in (("teacher", t_cfg), ("student", s_cfg)) for kind, w in _widths(c)}
    bad = {k: w for k, w in widths.items() if w % heads}
    if bad:
        raise UsageError(
            f"--attention_relation_heads {heads} does not divide the widths {bad}: pass a --attention_relation_heads "
            "that divides every query, key and value width"
        )
    log.info(
        "attention relations x %g: teacher layer %d against the student's last, %d relation heads",
        cfg.attention_relation_weight,
        layer % t_cfg.num_hidden_layers,
        heads,
    )
    return AttentionRelationTeachers(source, student, layer=layer, heads=heads, weight=cfg.attention_relation_weight)


def _widths(config) -> list[tuple[str, int]]:
    """(kind, width) of a config's query, key and value vectors: heads x head size (keys and values: the KV heads)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return [("query", config.num_attention_heads * head_dim), ("key", kv * head_dim), ("value", kv * head_dim)]
