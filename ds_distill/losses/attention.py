"""Self-attention relation distillation (MiniLMv2: Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation
Distillation for Compressing Pretrained Transformers", Findings of ACL, section 3.1), for causal decoders.

For one layer's query (key, value) vectors ``x`` ``[B, T, D]`` (all heads concatenated, ``D`` = heads x head size),
split into ``A`` *relation heads* of ``d = D / A`` units each (MiniLMv2 concatenates the attention heads and re-splits
them, so teacher and student need not have the same number of attention heads, only both widths divisible by A):

    R[b, a, t, :] = softmax_s( <x_a[b, t], x_a[b, s]> / sqrt(d) )     over the keys s <= t that are real tokens

(causal: a decoder's position t sees only s <= t; MiniLMv2's encoders see every position). The loss of a relation
kind is, per supervised token t, the mean over the relation heads of KL(R_teacher[b, a, t] || R_student[b, a, t]);
MiniLMv2 sums the query-query, key-key and value-value kinds. Sums over supervised tokens are returned (the trainer
divides by the step's global token count). Both sides are ``[B, A, T, T]`` per kind: callers bound ``T``
(``RELATION_MAX_TOKENS``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ds_distill.common import IGNORE_INDEX
from ds_distill.losses.divergences import kl

Tensor = torch.Tensor
KINDS = ("query", "key", "value")  # the relations, in the order the projections are given
# Tokens per sequence above which the relations are refused: each kind holds [B, A, T, T] fp32 scores per model, plus
# their softmax and gradients (at 2048 tokens, 4 rows and 16 relation heads: 1 GiB per kind and model).
RELATION_MAX_TOKENS = 2048


def relation_logprobs(x: Tensor, heads: int, keep: Tensor) -> Tensor:
    """log R ``[B, A, T, T]`` (fp32, or float64 for float64 ``x``) of ``x`` ``[B, T, D]`` split into ``heads``
    relation heads; ``keep`` ``[B, T]`` bool: the real tokens (padding is no key). A position always sees itself, so
    no row is empty."""
    b, t, d = x.shape
    if d % heads:
        raise ValueError(f"width {d} is not divisible by {heads} relation heads")
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 states scored in fp32; float64 kept (tests)
    xa = x.reshape(b, t, heads, d // heads).transpose(1, 2)  # [B, A, T, d]
    scores = xa @ xa.transpose(-1, -2) / math.sqrt(d // heads)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    allowed = (causal & keep.to(x.device)[:, None, :]) | torch.eye(t, dtype=torch.bool, device=x.device)
    return F.log_softmax(scores.masked_fill(~allowed[:, None], -math.inf), dim=-1)


def relation_loss_sums(
    student: list[Tensor], teacher: list[Tensor], labels: Tensor, keep: Tensor, heads: int
) -> Tensor:
    """Per kind (``KINDS``, in the order given), the sum over supervised tokens (``labels`` ``[B, T]`` not
    ``IGNORE_INDEX``) of the mean over ``heads`` relation heads of KL(R_teacher || R_student): ``[len(student)]``
    nats. ``student[k]`` ``[B, T, D_s]``, ``teacher[k]`` ``[B, T, D_t]``; ``keep`` ``[B, T]`` the real tokens."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student relation inputs for {len(teacher)} teacher ones")
    rows = (labels != IGNORE_INDEX).to(student[0].device)  # [B, T]: the query positions scored
    out = []
    for s, t in zip(student, teacher):
        if s.shape[:2] != labels.shape or t.shape[:2] != labels.shape:
            raise ValueError(f"relation inputs {tuple(s.shape)}, {tuple(t.shape)} must be [B, T, *] = {labels.shape}")
        r_t = relation_logprobs(t.detach(), heads, keep).transpose(1, 2)[rows]  # [n, A, T]
        r_s = relation_logprobs(s, heads, keep).transpose(1, 2)[rows]
        out.append(kl(r_t, r_s).mean(-1).sum())
    return torch.stack(out)
