"""Hidden-state losses: pure functions of the student's and the teacher's decoder-layer outputs at supervised tokens.

Per supervised token and mapped layer pair (student layer s, teacher layer t), with ``x`` the student's output of
layer s and ``y`` the teacher's output of layer t, both ``[H]`` (equal hidden sizes; for a student of another width
``x = W_h x_s``, its state ``x_s`` through the pair's learned projection, ``models.projection``):

    mse     mean_h (x_h - y_h)^2                      (DistillKit's per-element MSE)
    cosine  1 - x.y / (|x| |y|)                       (ModelOpt's default; scale-free)
    nmse    |x - y|^2 / |y|^2                         (MSE relative to the teacher state's own energy)

Each is 0 with a zero gradient when x = y. ``hidden_loss_sums`` returns *sums* over supervised tokens (per pair and
summed); the trainer divides by the global supervised token count of the step, as it does the KD term.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ds_distill.common import IGNORE_INDEX

Tensor = torch.Tensor
_EPS = 1e-12  # keeps an all-zero teacher state (padding-free, but possible at init) finite


def _mse(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).pow(2).mean(-1)


def _cosine(x: Tensor, y: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=_EPS)


def _nmse(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp(min=_EPS)


# name -> (per-token loss [n, H], [n, H] -> [n], help text)
HIDDEN_LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str]] = {
    "mse": (_mse, "mean squared error per hidden unit"),
    "cosine": (_cosine, "1 - cosine similarity"),
    "nmse": (_nmse, "squared error over the teacher state's squared norm"),
}


def hidden_loss_sums(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    labels: Tensor,
    *,
    loss: str,
    chunk_size: int = 0,
    ignore_index: int = IGNORE_INDEX,
    projections: Sequence[Callable[[Tensor], Tensor]] | None = None,
) -> Tensor:
    """Per-pair sums over supervised tokens: ``P x [B, T, H], P x [B, T, H], [B, T] -> [P]`` (fp32).

    Pair i compares ``student_states[i]`` with ``teacher_states[i]`` at the positions where ``labels != ignore_index``
    (the tokens the logit loss scores, so one global count normalises both). ``chunk_size``: tokens per chunk of the
    difference temporaries (0 = all at once); the sums are the same. Teacher states carry no gradient.
    projections: one callable per pair, ``[n, H_s] -> [n, H]`` (the student states are then ``[B, T, H_s]``), applied
    to the supervised rows of that pair's student state, all at once: exactly one call per pair, rows or none (a
    ZeRO-3 module's call is a collective weight gather, so every rank makes the same calls).
    Errors: ValueError for an unknown loss, unequal numbers of pairs or shapes that differ.
    """
    if loss not in HIDDEN_LOSSES:
        raise ValueError(f"hidden loss {loss!r} is unknown: use one of {', '.join(HIDDEN_LOSSES)}")
    if len(student_states) != len(teacher_states):
        raise ValueError(f"{len(student_states)} student states but {len(teacher_states)} teacher states")
    if projections is not None and len(projections) != len(student_states):
        raise ValueError(f"{len(projections)} projections for {len(student_states)} pairs")
    fn = HIDDEN_LOSSES[loss][0]
    idx = (labels != ignore_index).flatten().nonzero().squeeze(1)
    sums = []
    for p, (x, y) in enumerate(zip(student_states, teacher_states)):
        same_width = projections is not None or x.shape[-1] == y.shape[-1]
        if not same_width or x.shape[:2] != y.shape[:2] or x.shape[:2] != labels.shape:
            raise ValueError(
                f"student state {tuple(x.shape)} and teacher state {tuple(y.shape)} must both be [B, T, H] with "
                f"[B, T] = {tuple(labels.shape)}"
            )
        i = idx.to(x.device, non_blocking=True)
        xs, ys = x.flatten(0, 1)[i], y.detach().flatten(0, 1)[i]
        if projections is not None:
            xs = projections[p](xs)
            if xs.shape != ys.shape:
                raise ValueError(f"projection {p} gives {tuple(xs.shape)} for teacher rows {tuple(ys.shape)}")
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32; float64 stays float64 (the tests)
        step = chunk_size or max(xs.shape[0], 1)
        # An empty selection sums to 0 but stays connected to the student's graph and the projection (0 *
        # grad, not none).
        total = xs.narrow(-1, 0, 0).sum().to(dtype)
        for start in range(0, xs.shape[0], step):
            total = total + fn(xs[start : start + step].to(dtype), ys[start : start + step].to(dtype)).sum()
        sums.append(total)
    return torch.stack(sums) if sums else torch.zeros(0)
