"""Losses against full teacher logits (live teachers): from logits, or chunked from final hidden states."""

from __future__ import annotations

from typing import Callable

import torch

from ds_distill.losses.chunked import chunk_slices, run_chunks
from ds_distill.losses.terms import (
    LossArgs,
    LossSums,
    as_list,
    check_vocab,
    forward_kl_terms_and_grad,
    prepare,
    sum_terms,
    token_terms,
)

Tensor = torch.Tensor


def loss_sums(student_logits: Tensor, teacher_logits, labels: Tensor, *, teacher_weights=None, **kw) -> LossSums:
    """Loss sums from full logits. teacher_logits: ``[B, T, V]`` or a list of them (an ensemble).

    kw: the fields of ``LossArgs`` (loss, alpha, temperature, beta, skew, ignore_index, vocab_size).
    teacher_weights: None (uniform), ``[K]``, per token ``[B, T, K]``, or a router (``ds_distill.losses.routing``): a
    callable ``(K x [n, V] teacher log-probs at temperature 1, labels [n]) -> [n, K]``, called on the supervised tokens
    only (per chunk in ``chunked_loss_sums``, where it runs again when backward recomputes the chunk).
    """
    args = LossArgs(**kw)
    teachers = as_list(teacher_logits) if args.alpha != 1.0 else []  # alpha = 1: plain fine-tuning, teacher unused
    idx, rows, lab, w = prepare(student_logits, labels, teachers, teacher_weights, args, "logits")
    v = check_vocab(args.vocab_size, student_logits.shape[-1], [t.shape[-1] for t in teachers])
    s = student_logits.flatten(0, 1)[idx, :v]
    ts = [t.flatten(0, 1)[idx, :v] for t in teachers]
    ce, kd = token_terms(s, ts, lab, args, w)
    return sum_terms(ce, kd, rows, labels.shape[0], args.alpha, student_logits)


def chunked_loss_sums(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_hidden,
    teacher_head,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    num_chunks: int | None = None,
    teacher_weights=None,
    **kw,
) -> LossSums:
    """The same sums from final hidden states, without ever holding full ``[tokens, V]`` logits.

    student_hidden ``[B, T, H]``; teacher_hidden ``[B, T, H_t]`` or a list (ensemble) with teacher_head one callable
    or a list. Heads are callables ``[n, H] -> [n, V_model]`` (teacher heads are called under no_grad, once per chunk).
    kw: the fields of ``LossArgs``; teacher_weights as in ``loss_sums``.
    Only supervised positions are scored, ``chunk_size`` tokens at a time. Two ways, chosen by the student head
    (logged once each):

    - fused (an ``OutputHead`` over an ``nn.Linear``, ZeRO-3's or not; the loop runs inside one call of that module,
      where ZeRO-3 has gathered its weight): the gradient is computed in the forward, as fused linear-cross-entropy
      kernels do (Liger-Kernel): per chunk the student logits ``z`` are computed once, the loss terms and ``dL/dz``
      by autograd on the chunk alone (through ``transform``), then ``dL/dh = dL/dz @ W`` and ``dL/dW += dL/dz^T h``
      (``dL/db += sum dL/dz``) are kept and the chunk's logits dropped. Forward KL from one teacher over the whole
      row (no transform, no weights) makes ``dL/dz`` by its formula instead (``terms.forward_kl_terms_and_grad``:
      three ``[chunk_size, V]`` fp32 tensors at once, where autograd's path holds up to seven). Backward recomputes
      nothing; the head's gradient reaches autograd's (and DeepSpeed's) gradient hooks through the returned
      ``total``. Extra memory: the ``[V, H]`` fp32 gradient buffer, plus 3-7 chunks of ``[chunk_size, V]`` fp32.
    - checkpointed (any other callable): each chunk's logits (both models) are recomputed in backward instead of
      stored; extra memory ~3 chunks of ``[chunk_size, V]`` fp32.

    num_chunks: call the teacher heads (and, checkpointed, the student head) exactly this many times (trailing chunks
    may be empty). Under ZeRO-3 every head call is a collective weight gather, so all ranks must make the same number
    of calls although their numbers of supervised tokens differ: the trainer passes the maximum over ranks of
    ``ceil(n_tokens / chunk_size)``.
    """
    args = LossArgs(**kw)
    t_hidden, t_heads = as_list(teacher_hidden) if teacher_hidden is not None else [], as_list(teacher_head)
    if args.alpha == 1.0:
        t_hidden = []
    if len(t_hidden) != len(t_heads) and t_hidden:
        raise ValueError(f"{len(t_hidden)} teacher hidden states but {len(t_heads)} teacher heads")
    idx, rows, lab, w = prepare(student_hidden, labels, t_hidden, teacher_weights, args, "hidden states")
    hs = student_hidden.flatten(0, 1)[idx]
    ths = [t.flatten(0, 1)[idx] for t in t_hidden]
    weights_of = lambda sl: w[sl] if isinstance(w, Tensor) and w.dim() == 2 else w

    def teacher_logits(sl: slice) -> list[Tensor]:
        with torch.no_grad():
            return [head(x[sl]) for head, x in zip(t_heads, ths)]

    def terms(s_logits: Tensor, t_logits: list[Tensor], sl: slice) -> tuple[Tensor, Tensor]:
        v = check_vocab(args.vocab_size, s_logits.shape[-1], [t.shape[-1] for t in t_logits])
        views = [t[:, :v] for t in t_logits]
        t_logits.clear()  # the views alone hold the logits: token_terms frees them before the divergence
        return token_terms(s_logits[:, :v], views, lab[sl], args, weights_of(sl))

    def grad_terms(s_logits: Tensor, t_logits: list[Tensor], sl: slice) -> tuple[Tensor, Tensor, Tensor] | None:
        """Forward KL from one teacher over the whole output row: ``dL/dz`` by its formula (three [c, V] tensors at
        once instead of autograd's up to seven); anything else goes through ``terms`` and autograd."""
        v = check_vocab(args.vocab_size, s_logits.shape[-1], [t.shape[-1] for t in t_logits])
        if args.loss != "forward_kl" or len(t_logits) != 1 or w is not None or v != s_logits.shape[-1]:
            return None
        if v != t_logits[0].shape[-1]:
            t_logits[0] = t_logits[0][:, :v]
        z = s_logits if s_logits.dtype == torch.float32 else s_logits.float()
        ce, kd, g = forward_kl_terms_and_grad(z, t_logits, lab[sl], args.alpha, args.temperature)
        return ce, kd, g.to(s_logits.dtype)

    chunks = chunk_slices(hs.shape[0], chunk_size, num_chunks)
    return run_chunks(
        hs, student_head, chunks, teacher_logits, terms, rows, labels.shape[0], args.alpha, student_hidden, grad_terms
    )


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, **kw) -> Tensor:
    """Mean over non-ignored positions of ``alpha * CE + (1 - alpha) * T^2 * D`` (a finite 0 if none); kw: the
    fields of ``LossArgs``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape"
        )
    out = loss_sums(student_logits, teacher_logits, labels, **kw)
    return out.total / out.n_tokens.clamp(min=1)
