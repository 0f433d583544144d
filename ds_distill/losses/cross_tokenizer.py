"""Losses between a student and a teacher with different tokenizers, over the chunks of ``data.alignment``.

A chunk is a group of consecutive student tokens and consecutive teacher tokens that cover the same bytes of the
same text. Chunks arrive as ids per label position: ``student_chunks[b, t] = c`` when the student's label at ``t``
(token ``t + 1``) belongs to chunk ``c`` (ids ``0 .. C-1`` over the whole batch, -1 elsewhere), and the same on the
teacher's side. Every supervised student token of a chunk must be in it; a token in no chunk gets CE only.

Methods (``CROSS_TOKENIZER``, chosen by ``--cross_tokenizer``):

- ``alm``: approximate likelihood matching (Minixhofer, Vulić and Ponti, "Universal Cross-Tokenizer Distillation via
  Approximate Likelihood Matching", arXiv 2503.20083). Each model's likelihood of a chunk is the product of its
  probabilities (at temperature T) of its own tokens in the chunk, ``P(c) = exp(sum log p(token | prefix))``; the
  loss per chunk is ``T^2 * D`` between the two binary distributions ``[P_t(c), 1 - P_t(c)]`` and
  ``[P_s(c), 1 - P_s(c)]`` (the paper's binarised f-divergence; ``D`` any of ``LOSSES``). It needs only each model's
  log-probabilities of its own tokens. Exact where the chunk likelihoods are: when the teacher's tokens of a chunk
  spell the same bytes as the student's, ``P_t(c)`` is the teacher's probability of those bytes given the prefix
  under its own tokenization, so a teacher whose probabilities follow the chain rule of a byte-level model gives the
  same chunk likelihoods as that model (tests/test_cross_tokenizer.py). With one tokenizer on both sides every chunk
  is one token and ALM is the binarised loss of the label: ``sparse_loss_sums`` with the label as the only top-K id.
- ``vocab_map``: at the first position of each chunk both models predict the next token after the same text; the
  vocabularies are compared over the M token pairs that spell the same bytes (``student_index[m]`` and
  ``teacher_index[m]``, each token in at most one pair), plus one "any other token" bucket holding each side's mass
  outside its mapped tokens (the bookkeeping is exact: both sides sum to 1 over the M + 1 buckets; a side with every
  token mapped has an empty tail). ``T^2 * D`` over those buckets. Exact (the same-tokenizer loss) when every token
  of both vocabularies is mapped; otherwise a coarsening of the full distributions (by the data-processing
  inequality at most the KL between them, were they over one vocabulary). The matched-vocabulary part of GOLD's
  hybrid (TRL) with its unmatched tokens pooled into one bucket instead of sorted-L1 ULD.

CE is the student's ordinary cross-entropy on its own labels. Both return ``LossSums`` with the student's
supervised token count (the trainer divides by the global count, as for every loss); ``kd_per_seq`` attributes each
chunk to its row.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ds_distill.losses.chunked import checkpointed_map, chunk_slices
from ds_distill.losses.terms import LossArgs, LossSums, check_vocab

Tensor = torch.Tensor

CROSS_TOKENIZER = ("alm", "vocab_map")


def _fp(x: Tensor) -> Tensor:
    """fp32, or fp64 kept (the float64 tests)."""
    return x if x.dtype == torch.float64 else x.float()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Mächler 2012); each branch sees only its own range, so
    no NaN gradient leaks from the branch not taken."""
    cut = -math.log(2.0)
    near = torch.log(-torch.expm1(torch.clamp(x, min=cut)))
    far = torch.log1p(-torch.exp(torch.clamp(x, max=cut)))
    return torch.where(x > cut, near, far)


def binary_divergence(t_logp: Tensor, s_logp: Tensor, args: LossArgs) -> Tensor:
    """T^2 * D between ``[P_t, 1 - P_t]`` and ``[P_s, 1 - P_s]`` from log-likelihoods ``[C]`` (<= 0) -> ``[C]``
    nats."""
    t_logp, s_logp = t_logp.clamp(max=0.0), s_logp.clamp(max=0.0)
    t = torch.stack([t_logp, log1mexp(t_logp)], -1)
    s = torch.stack([s_logp, log1mexp(s_logp)], -1)
    return args.divergence(t, s)


def chunk_sums(values: Tensor, chunk_ids: Tensor, n_chunks: int) -> Tensor:
    """Sum ``values`` ``[n]`` into chunks by ``chunk_ids`` ``[n]`` (-1: none) -> ``[n_chunks]``."""
    keep = chunk_ids >= 0
    out = values.new_zeros(n_chunks)
    return out.index_add(0, chunk_ids[keep].to(values.device), values[keep.to(values.device)])


def teacher_chunk_logprobs(
    teacher_logits: Tensor, teacher_labels: Tensor, teacher_chunks: Tensor, n_chunks: int, temperature: float = 1.0
) -> Tensor:
    """The teacher's log-likelihood of each chunk at ``temperature``: ``[B, T', V_t], [B, T'], [B, T'] -> [C]``.

    teacher_labels: its own next tokens (position t scores token t + 1), -100 where ``teacher_chunks`` is -1."""
    pos = (teacher_chunks >= 0).flatten().nonzero().squeeze(1)
    z = _fp(teacher_logits.flatten(0, 1)[pos.to(teacher_logits.device)])
    lab = teacher_labels.flatten()[pos].to(z.device)
    lp = F.log_softmax(z / temperature, -1).gather(-1, lab[:, None])[:, 0]
    return chunk_sums(lp, teacher_chunks.flatten()[pos], n_chunks)


def _supervised(labels: Tensor, student_chunks: Tensor, n_chunks: int, args: LossArgs, device: torch.device):
    """The supervised positions (flat index, row, label, chunk id), found on the host's terms (one check of the chunk
    ids there) and moved to ``device``."""
    if student_chunks.shape != labels.shape:
        raise ValueError(f"student_chunks {tuple(student_chunks.shape)} must match labels {tuple(labels.shape)}")
    sup = (labels != args.ignore_index).flatten()
    ch = student_chunks.flatten()
    if student_chunks.device.type == "cpu":  # on an accelerator this would be a host sync per step
        if bool((ch[~sup] >= 0).any()):
            raise ValueError("student_chunks puts an unsupervised position (label -100) in a chunk")
        if n_chunks and (ch.max() >= n_chunks or torch.bincount(ch[ch >= 0], minlength=n_chunks).eq(0).any()):
            raise ValueError(f"student_chunks must hold every chunk id 0..{n_chunks - 1} (the teacher's) and no other")
    idx = sup.nonzero().squeeze(1)
    out = (idx, idx // labels.shape[1], labels.flatten()[idx], ch[idx])
    return tuple(x.to(device, non_blocking=True) for x in out)


def _sums(ce, rows, kd, kd_rows, batch: int, alpha: float, anchor: Tensor) -> LossSums:
    """Per-token CE and per-chunk KD -> LossSums (``anchor`` keeps an empty batch on the graph, as ``sum_terms``)."""
    total = alpha * ce.sum() + (1.0 - alpha) * kd.sum() + anchor.narrow(-1, 0, 0).sum()
    per = lambda v, r: torch.zeros(batch, device=v.device, dtype=torch.float32).index_add_(0, r, v.detach().float())
    counts = torch.zeros(batch, device=rows.device, dtype=torch.int64).index_add_(0, rows, torch.ones_like(rows))
    return LossSums(total, ce.sum().detach(), kd.sum().detach(), counts.sum(), per(ce, rows), per(kd, kd_rows), counts)


def _chunk_rows(ch: Tensor, rows: Tensor, n_chunks: int) -> Tensor:
    keep = ch >= 0
    return torch.zeros(n_chunks, dtype=torch.int64, device=rows.device).scatter_(0, ch[keep], rows[keep])


def _token_terms(s: Tensor, lab: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """CE at temperature 1 and log p(label) at ``temperature``: ``[n, V], [n] -> ([n], [n])``."""
    s = _fp(s)
    ce = F.cross_entropy(s, lab, reduction="none")
    lp = -ce if temperature == 1.0 else F.log_softmax(s / temperature, -1).gather(-1, lab[:, None])[:, 0]
    return ce, lp


def alm_loss_sums(
    student_logits: Tensor,
    labels: Tensor,
    student_chunks: Tensor,
    teacher_chunk_logp: Tensor,
    **kw,
) -> LossSums:
    """ALM (see the module docstring): student logits ``[B, T, V]``, labels and student_chunks ``[B, T]``, the
    teacher's chunk log-likelihoods ``[C]`` at ``temperature`` (``teacher_chunk_logprobs``, or from a cache).
    kw: the fields of ``LossArgs``."""
    args = LossArgs(**kw)
    n_chunks = teacher_chunk_logp.shape[0]
    idx, rows, lab, ch = _supervised(labels, student_chunks, n_chunks, args, student_logits.device)
    v = check_vocab(args.vocab_size, student_logits.shape[-1], [])
    ce, lp = _token_terms(student_logits.flatten(0, 1)[idx, :v], lab, args.temperature)
    return _alm_sums(ce, lp, rows, ch, teacher_chunk_logp, labels.shape[0], args, student_logits)


def _alm_sums(ce, lp, rows, ch, t_chunk, batch: int, args: LossArgs, anchor: Tensor) -> LossSums:
    n_chunks = t_chunk.shape[0]
    s_chunk = chunk_sums(lp, ch, n_chunks)
    kd = binary_divergence(_fp(t_chunk).to(s_chunk.device, s_chunk.dtype), s_chunk, args)
    return _sums(ce, rows, kd, _chunk_rows(ch, rows, n_chunks), batch, args.alpha, anchor)


def chunked_alm_loss_sums(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    labels: Tensor,
    student_chunks: Tensor,
    teacher_chunk_logp: Tensor,
    *,
    chunk_size: int = 1024,
    num_chunks: int | None = None,
    **kw,
) -> LossSums:
    """``alm_loss_sums`` from the student's final hidden states ``[B, T, H]``: its head runs ``chunk_size`` supervised
    tokens at a time under activation checkpointing (recomputed in backward), never ``[tokens, V]`` logits at once;
    only the ``[n]`` log-probabilities of the labels are kept. ``num_chunks``: as in ``chunked_loss_sums``; kw: the
    fields of ``LossArgs``."""
    args = LossArgs(**kw)
    hs, rows, lab, ch = _hidden_positions(student_hidden, labels, student_chunks, teacher_chunk_logp.shape[0], args)
    slices = chunk_slices(hs.shape[0], chunk_size, num_chunks)
    ce, lp = _head_terms(hs, student_head, lab, slices, args, args.temperature)
    return _alm_sums(ce, lp, rows, ch, teacher_chunk_logp, labels.shape[0], args, student_hidden)


def _hidden_positions(student_hidden: Tensor, labels: Tensor, student_chunks: Tensor, n_chunks: int, args: LossArgs):
    """``_supervised`` with the supervised student hidden states ``[n, H]`` in place of their flat index."""
    idx, rows, lab, ch = _supervised(labels, student_chunks, n_chunks, args, student_hidden.device)
    return student_hidden.flatten(0, 1)[idx], rows, lab, ch


def _head_terms(hs, head, lab, slices, args: LossArgs, temperature: float) -> tuple[Tensor, Tensor]:
    """``_token_terms`` of ``head(hs)`` one slice at a time, each recomputed in backward (checkpointed)."""

    def terms(h: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        z = head(h)
        v = check_vocab(args.vocab_size, z.shape[-1], [])
        return _token_terms(z[:, :v], lab[sl], temperature)

    return checkpointed_map(terms, slices, hs)


def _map_terms(s: Tensor, t: Tensor, student_index: Tensor, teacher_index: Tensor, args: LossArgs) -> Tensor:
    """``T^2 * D`` over the mapped tokens plus one tail bucket per side: ``[C, V_s], [C, V_t] -> [C]``."""

    def buckets(z: Tensor, index: Tensor) -> Tensor:
        logp = F.log_softmax(_fp(z) / args.temperature, -1)
        mapped = logp.index_select(-1, index)
        if index.shape[0] == z.shape[-1]:  # every token mapped: no tail (a logsumexp of nothing has a NaN gradient)
            return torch.cat([mapped, torch.full_like(mapped[:, :1], -math.inf)], -1)
        tail = torch.logsumexp(logp.index_fill(-1, index, -math.inf), -1, keepdim=True)
        return torch.cat([mapped, tail], -1)

    sb = buckets(s, student_index.to(s.device))
    tb = buckets(t, teacher_index.to(t.device)).to(sb.dtype)
    return args.divergence(tb, sb)


def chunk_starts(ch: Tensor, n_chunks: int) -> Tensor:
    """The index of each chunk's first position: chunk ids ``[n]`` (-1: none) -> ``[C]``."""
    at = torch.arange(ch.shape[0], device=ch.device)
    keep = ch >= 0
    first = torch.full((n_chunks,), ch.shape[0], dtype=torch.int64, device=ch.device)
    return first.scatter_reduce(0, ch[keep], at[keep], reduce="amin")


def check_map(student_index: Tensor, teacher_index: Tensor) -> None:
    if student_index.dim() != 1 or student_index.shape != teacher_index.shape or student_index.numel() == 0:
        raise ValueError(
            f"student_index {tuple(student_index.shape)} and teacher_index {tuple(teacher_index.shape)} must be [M], "
            "M >= 1"
        )


def vocab_map_loss_sums(
    student_logits: Tensor,
    labels: Tensor,
    student_chunks: Tensor,
    teacher_start_logits: Tensor,
    student_index: Tensor,
    teacher_index: Tensor,
    **kw,
) -> LossSums:
    """vocab_map (see the module docstring): student logits ``[B, T, V_s]``, labels and student_chunks ``[B, T]``,
    the teacher's logits at the first position of each chunk ``[C, V_t]`` (chunk order), the mapped token pairs
    ``student_index``, ``teacher_index`` ``[M]``. The student is scored at the first position of each chunk.
    kw: the fields of ``LossArgs``."""
    args = LossArgs(**kw)
    check_map(student_index, teacher_index)
    n_chunks = teacher_start_logits.shape[0]
    idx, rows, lab, ch = _supervised(labels, student_chunks, n_chunks, args, student_logits.device)
    v = check_vocab(args.vocab_size, student_logits.shape[-1], [])
    s = student_logits.flatten(0, 1)[idx, :v]
    ce, _ = _token_terms(s, lab, 1.0)
    starts = chunk_starts(ch, n_chunks)
    kd = _map_terms(s[starts], teacher_start_logits, student_index, teacher_index, args)
    return _sums(ce, rows, kd, rows[starts], labels.shape[0], args.alpha, student_logits)


def chunked_vocab_map_loss_sums(
    student_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    labels: Tensor,
    student_chunks: Tensor,
    teacher_start_hidden: Tensor,
    teacher_head: Callable[[Tensor], Tensor],
    student_index: Tensor,
    teacher_index: Tensor,
    *,
    chunk_size: int = 1024,
    num_chunks: int | None = None,
    **kw,
) -> LossSums:
    """``vocab_map_loss_sums`` from hidden states: the student's ``[B, T, H]`` and the teacher's at the first position
    of each chunk ``[C, H_t]``; both heads run ``chunk_size`` rows at a time (the teacher's without grad, the
    student's checkpointed), never ``[tokens, V]`` logits at once. Two passes of the student head, ``num_chunks``
    calls each (as in ``chunked_loss_sums``): CE over the supervised tokens, then D at the chunk starts (C <= tokens).
    kw: the fields of ``LossArgs``."""
    args = LossArgs(**kw)
    check_map(student_index, teacher_index)
    n_chunks = teacher_start_hidden.shape[0]
    hs, rows, lab, ch = _hidden_positions(student_hidden, labels, student_chunks, n_chunks, args)
    ce, _ = _head_terms(hs, student_head, lab, chunk_slices(hs.shape[0], chunk_size, num_chunks), args, 1.0)
    starts = chunk_starts(ch, n_chunks)

    def kd_terms(h: Tensor, th: Tensor, _: slice) -> tuple[Tensor]:
        z = student_head(h)
        z = z[:, : check_vocab(args.vocab_size, z.shape[-1], [])]
        with torch.no_grad():
            t = teacher_head(th)
        return (_map_terms(z, t, student_index, teacher_index, args),)

    slices = chunk_slices(n_chunks, chunk_size, num_chunks)  # C <= supervised tokens: num_chunks suffice
    (kd,) = checkpointed_map(kd_terms, slices, hs[starts], teacher_start_hidden, n_out=1)
    return _sums(ce, rows, kd, rows[starts], labels.shape[0], args.alpha, student_hidden)
