"""Losses against a sparse teacher (a cache or a server): its top-K log-probabilities plus one tail bucket."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ds_distill.losses.chunked import chunk_slices, run_chunks
from ds_distill.losses.terms import LossArgs, LossSums, check_vocab, prepare, sum_terms

Tensor = torch.Tensor


def sparse_token_terms(
    s_logits: Tensor, labels: Tensor, t_ids: Tensor, t_logp: Tensor, t_tail: Tensor, args: LossArgs
) -> tuple[Tensor, Tensor]:
    """CE and T^2 * D on the top-K support plus one tail bucket: ``[n, V], [n], [n, K], [n, K], [n] -> ([n], [n])``."""
    s = s_logits.float()
    if args.alpha == 1.0:
        ce = F.cross_entropy(s, labels, reduction="none")
        return ce, torch.zeros_like(ce)
    # At T = 1 the CE reads the KD term's log-softmax (cross_entropy is nll of that very log_softmax, so the values are
    # the same bits): one [n, V] log-softmax and its backward fewer per chunk (docs/performance.md, issue 29).
    temperature = args.temperature
    s_logp = F.log_softmax(s if temperature == 1.0 else s / temperature, dim=-1)
    if temperature == 1.0:
        ce = -s_logp.gather(-1, labels[:, None]).squeeze(-1)
    else:
        ce = F.cross_entropy(s, labels, reduction="none")
    # id -1: no bucket (rows with fewer ids, e.g. an ensemble's union): no mass on either side. It points at a real id
    # of its row (the row's largest) so the scatter below is unchanged; no host sync to find out whether there are any.
    pad = t_ids < 0
    t_ids = torch.where(pad, t_ids.max(-1, keepdim=True).values, t_ids)
    t_logp = t_logp.masked_fill(pad, -math.inf)
    s_top = s_logp.gather(-1, t_ids).masked_fill(pad, -math.inf)
    if t_ids.shape[-1] < s.shape[-1]:
        # The student's tail bucket: log of its mass outside the teacher's top-K ids, from its own logits (not
        # log(1 - sum p_top), which cancels catastrophically when the top-K hold almost all the mass).
        s_tail = torch.logsumexp(s_logp.scatter(-1, t_ids, -math.inf), dim=-1)
        t, s_b = torch.cat([t_logp.float(), t_tail.float()[:, None]], -1), torch.cat([s_top, s_tail[:, None]], -1)
    else:  # K = V: the top-K ids are the whole vocabulary, there is no tail
        t, s_b = t_logp.float(), s_top
    return ce, args.divergence(t, s_b)


def check_sparse(t_ids: Tensor, t_logp: Tensor, t_tail: Tensor, n: int, v: int) -> None:
    if t_ids.dim() != 2 or t_logp.shape != t_ids.shape or t_tail.shape != t_ids.shape[:1] or t_ids.shape[0] != n:
        raise ValueError(
            f"teacher ids {tuple(t_ids.shape)}, log-probs {tuple(t_logp.shape)} and tail {tuple(t_tail.shape)} "
            f"must be [n, K], [n, K], [n] with n={n} supervised tokens"
        )
    if not 1 <= t_ids.shape[1] <= v:
        raise ValueError(f"top-K={t_ids.shape[1]} must be in [1, {v}] (the vocabulary scored)")


def sparse_loss_sums(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logp: Tensor,
    teacher_tail: Tensor,
    labels: Tensor,
    **kw,
) -> LossSums:
    """Loss sums against a sparse teacher (e.g. ``ds_distill.teachers.cache_format``): its top-K plus one tail bucket.

    teacher_ids ``[n, K]`` int64, teacher_logp ``[n, K]`` and teacher_tail ``[n]`` (log-probabilities at
    ``temperature``; ``logsumexp(teacher_logp) + exp(teacher_tail)`` = 1, the tail = the mass outside the ids), one row
    per supervised position in row-major ``[B, T]`` order (the order of ``labels != ignore_index``).
    An id of -1 is no bucket (padding for rows with fewer ids; its log-prob is taken as -inf).
    What is compared: the two distributions over K + 1 buckets (the K teacher ids, then "any other token"):
    the teacher's ``[exp(teacher_logp), exp(teacher_tail)]`` and the student's ``[p_s(ids), 1 - sum p_s(ids)]`` with
    ``p_s = softmax(student / T)`` over the first ``vocab_size`` logits, the student's tail formed as the logsumexp of
    its log-probs outside the ids. ``D`` is the divergence between these coarse distributions (by the data-processing
    inequality at most the full-vocabulary D); when K equals the vocabulary there is no tail bucket and the result is
    the full-vocabulary loss of ``loss_sums`` (ids sorted: the same sums, term by term).
    Divergences: every one in ``LOSSES`` is supported (each is defined on any finite set of outcomes); none is refused.
    CE is the ordinary full-vocabulary cross-entropy on the labels. kw: the fields of ``LossArgs``.
    """
    args = LossArgs(**kw)
    idx, rows, lab, _ = prepare(student_logits, labels, None, None, args, "logits")
    v = check_vocab(args.vocab_size, student_logits.shape[-1], [])
    check_sparse(teacher_ids, teacher_logp, teacher_tail, idx.shape[0], v)
    s = student_logits.flatten(0, 1)[idx, :v]
    t_ids, t_logp, t_tail = (x.to(s.device, non_blocking=True) for x in (teacher_ids, teacher_logp, teacher_tail))
    ce, kd = sparse_token_terms(s, lab, t_ids, t_logp, t_tail, args)
    return sum_terms(ce, kd, rows, labels.shape[0], args.alpha, student_logits)


def chunked_sparse_loss_sums(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_ids: Tensor,
    teacher_logp: Tensor,
    teacher_tail: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    num_chunks: int | None = None,
    **kw,
) -> LossSums:
    """``sparse_loss_sums`` from the student's final hidden states ``[B, T, H]``, its head called ``chunk_size``
    supervised tokens at a time, never ``[tokens, V]`` logits at once: fused (gradients in the forward) or checkpointed
    (recomputed in backward), chosen by the head as in ``chunked_loss_sums``; ``num_chunks`` as there (the same number
    of head calls on every rank under ZeRO-3). kw: the fields of ``LossArgs``."""
    args = LossArgs(**kw)
    idx, rows, lab, _ = prepare(student_hidden, labels, None, None, args, "hidden states")
    hs = student_hidden.flatten(0, 1)[idx]
    check_sparse(teacher_ids, teacher_logp, teacher_tail, hs.shape[0], teacher_ids.shape[-1])  # K against V: per chunk
    t_ids, t_logp, t_tail = (x.to(hs.device, non_blocking=True) for x in (teacher_ids, teacher_logp, teacher_tail))

    def terms(s_logits: Tensor, _: list[Tensor], sl: slice) -> tuple[Tensor, Tensor]:
        v = check_vocab(args.vocab_size, s_logits.shape[-1], [])
        check_sparse(t_ids[sl], t_logp[sl], t_tail[sl], s_logits.shape[0], v)
        return sparse_token_terms(s_logits[:, :v], lab[sl], t_ids[sl], t_logp[sl], t_tail[sl], args)

    chunks = chunk_slices(hs.shape[0], chunk_size, num_chunks)
    return run_chunks(hs, student_head, chunks, lambda sl: [], terms, rows, labels.shape[0], args.alpha, student_hidden)
