"""The divergences D(p_t, p_s) between the teacher's and the student's distributions, looked up by exact name in
``LOSSES``: each maps log-probabilities ``t``, ``s`` ``[n, V]`` (fp32) to ``[n]`` nats, with 0 * log 0 = 0."""

from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities ``[N, V] -> [N]``; 0 * log 0 counts as 0 (no NaN at -inf)."""
    p = logp.exp()
    return (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(-1)


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


def forward_kl(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """KL(p_t || p_s): mean-seeking, the classic Hinton et al. objective."""
    return kl(t, s)


def reverse_kl(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """KL(p_s || p_t): mode-seeking (MiniLLM)."""
    return kl(s, t)


def jsd(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
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


def skew_forward_kl(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """KL(p_t || skew p_t + (1 - skew) p_s) (DistiLLM): bounded even where p_s vanishes."""
    return kl(t, log_mix(t, s, skew))


def skew_reverse_kl(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """KL(p_s || skew p_s + (1 - skew) p_t) (DistiLLM)."""
    return kl(s, log_mix(s, t, skew))


def tvd(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """Total variation distance 0.5 * sum |p_t - p_s|, in [0, 1]."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


LOSSES: dict[str, Callable[..., Tensor]] = {
    f.__name__: f for f in (forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd)
}


def check_args(loss: str, alpha: float, temperature: float, beta: float, skew: float) -> None:
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
