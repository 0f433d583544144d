"""An ensemble of teachers from any sources as one target: live engines (full distributions), caches and servers
(top-K log-probs plus a tail). ``mix`` turns the members of one set of tokens into one sparse teacher for
``losses.sparse_loss_sums``; ``mixture_weights`` gives the per-token weights (``--teacher_weights`` or a router);
``MixedTeachers`` is the teacher source of an ensemble that mixes live teachers with caches or servers.

What a mixed ensemble computes (``mix``). Each member m has a weight w_m (per token with a router) and is either
*full* (its probability of every id is known: a live teacher, an exact cache, a server with top-K >= the vocabulary)
or *top-K* (its K_m most likely ids and their log-probs, then its tail mass ``1 - sum_topK p_m``). The target is the
mixture ``sum_m w_m p_m`` compared with the student on buckets: every id in U, the union of the top-K members' ids,
then one bucket for the V - |U| other ids. On those buckets
    a full member contributes exactly: its own probability of each id in U, its own mass outside U;
    a top-K member contributes its log-probs on its own ids; on the ids of U outside its top K (ids that only another
    member ranked), its tail spread uniformly over its V - K_m other ids (the caches' reconstruction, as the
    ensembles of caches have always done); the rest of its tail goes to the last bucket.
So: with one top-K member and any number of full members, the K + 1 buckets' masses are exact, and D on them is the
divergence between the coarse-grained mixture and the coarse-grained student (by the data-processing inequality at
most the full-vocabulary D of the true mixture); what is lost is how the mixture spreads inside the last bucket,
the full members' shape there included (only their mass counts). With several top-K members, the ids of U that a
member did not rank carry the uniform-spread assumption. When no member is top-K, U is the whole vocabulary, there
is no last bucket and the loss is the live ensemble's (``losses.loss_sums`` with the same weights). Computed in
float64, without grad.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import torch

from ds_distill import losses
from ds_distill.common import IGNORE_INDEX
from ds_distill.losses.chunked import chunk_slices

Tensor = torch.Tensor
# A member of ``mix``: a full ``[n, V]`` log-prob tensor, or a top-K ``(ids [n, K], log-probs [n, K], log tail [n])``.
Member = Union[Tensor, tuple[Tensor, Tensor, Tensor]]


def is_full(member: Member, vocab: int) -> bool:
    """A member whose probability of every id is known: dense, or a top-K with K >= the vocabulary."""
    return isinstance(member, Tensor) or member[0].shape[1] >= vocab


def as_dense(member: Member, vocab: int) -> Tensor:
    """A full member as ``[n, V]`` log-probs (a top-K covering the vocabulary scattered to its ids)."""
    if isinstance(member, Tensor):
        return member
    ids, logp, _ = member
    return torch.full((ids.shape[0], vocab), -math.inf, dtype=logp.dtype, device=logp.device).scatter(1, ids, logp)


def full_logp(member: Member, vocab: int, rows: Tensor) -> Tensor:
    """A member's log-probs over the whole vocabulary ``[len(rows), V]``: its own when full, else its top-K with the
    tail spread uniformly over the other V - K ids (what a router scores labels with)."""
    if is_full(member, vocab):
        return as_dense(member, vocab)[rows]
    ids, logp, tail = member
    fill = tail[rows] - math.log(vocab - ids.shape[1])
    return fill[:, None].expand(-1, vocab).scatter(1, ids[rows], logp[rows])


def mix(members: Sequence[Member], weights: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """An ensemble as one sparse teacher (module docstring: what it computes): ``M`` members of the same ``n`` tokens
    and mixture weights ``[n, M]`` (rows >= 0 summing to 1, in the members' order) -> (ids ``[n, W]``, log-probs
    ``[n, W]``, log tail ``[n]``), float32 on the members' device. W = the largest |U| of the rows; shorter rows are
    padded with id -1 and log-prob -inf (no bucket, see ``losses.sparse_loss_sums``); no top-K member: W = V, ids in
    order, tail -inf. ValueError when U covers the whole vocabulary in some rows but not in others (a V-wide row reads
    as "no tail bucket")."""
    top = [m for m in members if not is_full(m, vocab)]
    n = members[0].shape[0] if isinstance(members[0], Tensor) else members[0][0].shape[0]
    if weights.shape != (n, len(members)):
        raise ValueError(f"mixture weights {tuple(weights.shape)} must be [n, M] = [{n}, {len(members)}]")
    device = weights.device
    if top:
        ids, _ = torch.cat([m[0].to(device) for m in top], dim=1).sort(dim=1)
        dup = torch.zeros_like(ids, dtype=torch.bool)
        dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    else:  # every member full: the buckets are the vocabulary's ids
        ids = torch.arange(vocab, device=device).expand(n, vocab)
        dup = torch.zeros_like(ids, dtype=torch.bool)
    size = (~dup).sum(1)  # |U| per token
    mass = torch.zeros(ids.shape, dtype=torch.float64, device=device)
    tail = torch.zeros(n, dtype=torch.float64, device=device)
    for member, w in zip(members, weights.double().T):
        if is_full(member, vocab):
            d = as_dense(member, vocab).to(device)
            mass += w[:, None] * d.gather(1, ids).double().exp()
            # its exact mass outside U (duplicate ids in the scatter are harmless: each is set to -inf)
            tail += w * torch.logsumexp(d.scatter(1, ids, -math.inf), dim=-1).double().exp()
            continue
        m_ids, m_logp, m_tail = (x.to(device) for x in member)
        k = m_ids.shape[1]
        m_ids, order = m_ids.sort(dim=1)
        pos = torch.searchsorted(m_ids, ids).clamp(max=k - 1)
        inside = m_ids.gather(1, pos) == ids
        spread = m_tail.double().exp() / (vocab - k)
        p = torch.where(inside, m_logp.gather(1, order).double().exp().gather(1, pos), spread[:, None])
        mass += w[:, None] * p
        tail += w * spread * (vocab - size)
    # unique ids first (stable), then cut to the widest row
    keep = torch.sort(dup.to(torch.int8), dim=1, stable=True).indices[:, : int(size.max()) if n else 0]
    pad = dup.gather(1, keep)
    ids = ids.gather(1, keep).masked_fill(pad, -1)
    logp = mass.gather(1, keep).log().masked_fill(pad, -math.inf)
    check_width(ids, vocab)
    return ids, logp.float(), tail.log().float()


def check_width(ids: Tensor, vocab: int) -> None:
    """A V-wide target must have no padding: the sparse loss reads a V-wide row as "no tail bucket"."""
    if ids.shape[1] == vocab and (ids < 0).any():
        raise ValueError(
            f"the ensemble's top-K lists cover all {vocab} ids for some tokens but not others: write the caches with "
            "--exact, or ask the servers for a top-K of the whole vocabulary"
        )


def mixture_weights(
    weights, n: int, m: int, members: Callable[[Tensor], list[Tensor]], labels: Tensor, temperature: float
) -> Tensor:
    """Per-token weights ``[n, M]`` of an ensemble's ``m`` members from ``teacher_weights``: None (uniform) or ``[M]``
    (normalised, the same for every token), or a router (``losses.routing``) called, 1024 tokens at a time, on
    ``members(rows)`` (each member's full log-probs of those tokens at temperature 1, ``full_logp``) and the tokens'
    ``labels`` ``[n]``. ValueError for a router when the members' log-probs are at another temperature."""
    if callable(weights):
        if temperature != 1.0:
            raise ValueError(
                "a router scores labels at temperature 1 but the teachers' log-probs are at temperature "
                f"{temperature}: "
                "use --temperature 1, or --router fixed"
            )
        blocks = torch.arange(n, device=labels.device).split(1024)
        return torch.cat([weights(members(rows), labels[rows]) for rows in blocks]) if n else torch.zeros(0, m)
    w = torch.full((m,), 1.0 / m) if weights is None else torch.as_tensor(weights, dtype=torch.float64).cpu()
    if w.shape != (m,):
        raise ValueError(f"teacher_weights {tuple(w.shape)} must be one weight per teacher ({m})")
    return (w / w.sum()).expand(n, m)


def pad_cat(pieces: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse targets of consecutive token slices (different widths) as one: rows padded with id -1, log-prob -inf."""
    width = max(p[0].shape[1] for p in pieces)
    pad = lambda x, value: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
    return (
        torch.cat([pad(p[0], -1) for p in pieces]),
        torch.cat([pad(p[1], -math.inf) for p in pieces]),
        torch.cat([p[2] for p in pieces]),
    )


class MixedTeachers:
    """A ``teachers.TeacherSource``: an ensemble of live teachers and a sparse source (caches and servers), each
    member through its own source. Members in ``--teacher_weights`` order: the live engines (``--teacher``), then the
    sparse source's parts (``--teacher_cache``, then ``--teacher_url``).

    ``targets`` asks each source for its own targets; ``loss_sums`` mixes them into one sparse teacher (``mix``) a
    loss chunk at a time, the live teachers' heads called once per chunk (``live.logprobs``, the same number of
    calls on every rank as ZeRO-3's gathers need), then the sparse loss (``losses.chunked_sparse_loss_sums``).
    live: a ``LiveTeachers``; sparse: a ``CachedTeacher`` or ``ServedTeacher``."""

    def __init__(self, live, sparse):
        self.live, self.sparse = live, sparse

    def targets(self, batch, split: str) -> tuple[Any, Any]:
        return self.live.targets(batch, split), self.sparse.targets(batch, split)

    def loss_sums(
        self,
        student_hidden: Tensor,
        student_head: Callable,
        targets,
        labels: Tensor,
        *,
        chunk_size: int,
        num_chunks: int | None,
        **loss_kw: Any,
    ) -> losses.LossSums:
        hidden, parts = targets
        weights = loss_kw.pop("teacher_weights", None)
        if loss_kw.get("vocab_size") is None:
            raise ValueError("a mixed ensemble needs the objective's vocab_size (Objective.with_vocab)")
        target = self.target(
            hidden, parts, labels, weights, loss_kw["vocab_size"], loss_kw["temperature"], chunk_size, num_chunks
        )
        if chunk_size:
            return losses.chunked_sparse_loss_sums(
                student_hidden, student_head, *target, labels, chunk_size=chunk_size, num_chunks=num_chunks, **loss_kw
            )
        return losses.sparse_loss_sums(student_head(student_hidden), *target, labels, **loss_kw)

    @torch.no_grad()
    def target(
        self,
        hidden: list[Tensor],
        parts: list[tuple[Tensor, Tensor, Tensor]],
        labels: Tensor,
        weights,
        vocab: int,
        temperature: float,
        chunk_size: int,
        num_chunks: int | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The mixed sparse teacher of the micro-batch's supervised tokens (row-major ``[B, T]`` order), built
        ``chunk_size`` tokens at a time (``num_chunks`` slices when given; 0: all at once)."""
        pos = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        lab = labels.flatten()[pos]
        device = hidden[0].device
        parts = [tuple(x.to(device, non_blocking=True) for x in p) for p in parts]
        n, m = pos.shape[0], len(hidden) + len(parts)
        slices = chunk_slices(n, chunk_size, num_chunks) if chunk_size else [slice(0, n)]
        pieces = []
        for sl in slices:
            dense = self.live.logprobs(hidden, pos[sl], vocab, temperature)  # every slice: one head call each
            if not dense[0].shape[0]:
                continue
            members = [*dense, *(tuple(x[sl] for x in p) for p in parts)]
            w = mixture_weights(
                weights,
                dense[0].shape[0],
                m,
                lambda rows: [full_logp(x, vocab, rows) for x in members],
                lab[sl].to(device),
                temperature,
            )
            pieces.append(mix(members, w.to(device), vocab))
        if not pieces:
            empty = torch.zeros((0, 1), device=device)
            return empty.long(), empty, empty[:, 0]
        ids, logp, tail = pad_cat(pieces)
        check_width(ids, vocab)
        return ids, logp, tail
