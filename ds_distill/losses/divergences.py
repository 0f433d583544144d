"""The divergences D(p_t, p_s) between the teacher's and the student's distributions, looked up by exact name in
``LOSSES``: each maps log-probabilities ``t``, ``s`` ``[n, V]`` (fp32) to ``[n]`` nats, with 0 * log 0 = 0, and takes
every divergence parameter by keyword (``beta``, ``skew``, ``entropy_threshold``), using the ones it names."""

from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor
# Nats: the demo teacher's (SmolLM2-135M-Instruct) median per-token entropy on its training text is 3.0
# (1536 tokens; quartiles 1.9 and 4.2), so by default half its tokens are all forward KL.
ENTROPY_THRESHOLD = 3.0


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities ``[N, V] -> [N]``; 0 * log 0 counts as 0 (no NaN at -inf)."""
    p = logp.exp()
    # Masked and scaled in place: one [N, V] temporary less at the loss's peak (the same values and gradients).
    d = logp - logq
    return d.masked_fill_(p == 0, 0.0).mul_(p).sum(-1)


def log_mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w * p + (1 - w) * q), exact at w = 0 and w = 1."""
    if w == 0.0:
        return logq
    if w == 1.0:
        return logp
    # Where both are -inf (a masked vocabulary entry) logaddexp's gradient is NaN, and 0 * NaN poisons the whole row.
    dead = torch.isneginf(logp) & torch.isneginf(logq)
    a, b = (logp + math.log(w)).masked_fill(dead, 0.0), (logq + math.log1p(-w)).masked_fill(dead, 0.0)
    return torch.logaddexp(a, b).masked_fill(dead, -math.inf)


def forward_kl(
    t: Tensor, s: Tensor, *, beta: float, skew: float, entropy_threshold: float = ENTROPY_THRESHOLD
) -> Tensor:
    """KL(p_t || p_s): mean-seeking, the classic Hinton et al. objective."""
    return kl(t, s)


def reverse_kl(
    t: Tensor, s: Tensor, *, beta: float, skew: float, entropy_threshold: float = ENTROPY_THRESHOLD
) -> Tensor:
    """KL(p_s || p_t): mode-seeking (MiniLLM)."""
    return kl(s, t)


def jsd(t: Tensor, s: Tensor, *, beta: float, skew: float, entropy_threshold: float = ENTROPY_THRESHOLD) -> Tensor:
    """Generalised JSD (GKD): m = beta p_t + (1 - beta) p_s, D = beta KL(p_t||m) + (1 - beta) KL(p_s||m).

    By the GKD paper's convention beta = 0 is forward KL and beta = 1 reverse KL (special-cased: the formula itself
    vanishes at both ends).
    """
    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = log_mix(t, s, beta)
    return beta * kl(t, m) + (1.0 - beta) * kl(s, m)


def skew_forward_kl(
    t: Tensor, s: Tensor, *, beta: float, skew: float, entropy_threshold: float = ENTROPY_THRESHOLD
) -> Tensor:
    """KL(p_t || skew p_t + (1 - skew) p_s) (DistiLLM): bounded even where p_s vanishes."""
    return kl(t, log_mix(t, s, skew))


def skew_reverse_kl(
    t: Tensor, s: Tensor, *, beta: float, skew: float, entropy_threshold: float = ENTROPY_THRESHOLD
) -> Tensor:
    """KL(p_s || skew p_s + (1 - skew) p_t) (DistiLLM)."""
    return kl(s, log_mix(s, t, skew))


def entropy(logp: Tensor) -> Tensor:
    """H(p) = -sum p log p per row, ``[N, V] -> [N]`` nats, 0 * log 0 = 0 (>= 0: each term is)."""
    p = logp.exp()
    return -(p * logp).masked_fill(p == 0, 0.0).sum(-1)


def entropy_aware_kl(
    t: Tensor, s: Tensor, *, beta: float, skew: float, entropy_threshold: float = ENTROPY_THRESHOLD
) -> Tensor:
    """Per token a mixture of forward and reverse KL weighted by the teacher's entropy H_t = H(p_t) (nats, of the
    teacher at the KD temperature):

        D = w KL(p_t || p_s) + (1 - w) KL(p_s || p_t),   w = min(H_t / h, 1),   h = ``entropy_threshold`` (nats)

    Where the teacher is uncertain (H_t >= h) the token is all forward KL (mode-covering), where it is confident the
    weight falls linearly to reverse KL (mode-seeking) at H_t = 0. h = 0 is plain forward KL, h = inf plain reverse
    KL (special-cased, exact). ``w`` is a function of the teacher only: no gradient flows through it.
    Source: Entropy-Aware On-Policy Distillation (Jin et al. 2026, arXiv 2603.07079) augments on-policy reverse KL
    with forward KL on the tokens where the teacher's entropy is high; this is a convex, continuous form of that
    rule (a linear ramp rather than the paper's switch), chosen so that its limits are the two plain divergences.
    On a sparse teacher (top-K + tail) H_t is the entropy of its K + 1 buckets, a lower bound of the full one.
    """
    if entropy_threshold == 0.0:
        return kl(t, s)
    if entropy_threshold == math.inf:
        return kl(s, t)
    w = (entropy(t.detach()) / entropy_threshold).clamp(max=1.0)
    return w * kl(t, s) + (1.0 - w) * kl(s, t)


def tvd(t: Tensor, s: Tensor, *, beta: float, skew: float, entropy_threshold: float = ENTROPY_THRESHOLD) -> Tensor:
    """Total variation distance 0.5 * sum |p_t - p_s|, in [0, 1]."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


LOSSES: dict[str, Callable[..., Tensor]] = {
    f.__name__: f for f in (forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd, entropy_aware_kl)
}


def check_args(
    loss: str, alpha: float, temperature: float, beta: float, skew: float, entropy_threshold: float = ENTROPY_THRESHOLD
) -> None:
    """Raise a one-line ValueError naming the first bad hyperparameter and its allowed values."""
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is unknown: use one of {', '.join(LOSSES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature={temperature} must be a finite number > 0")
    for name, value in (("beta", beta), ("skew", skew)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be in [0, 1]")
    if not entropy_threshold >= 0.0:  # inf allowed (plain reverse KL); NaN refused
        raise ValueError(f"entropy_threshold={entropy_threshold} must be >= 0 nats (inf = reverse KL)")
