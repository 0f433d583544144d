"""What every loss path shares: its options (``LossArgs``), the sums it returns, the output head it calls, the
per-token terms and the checks of its inputs (shapes, vocabulary, teacher weights). ``[n, V]`` rows are the supervised
positions only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ds_distill.common import IGNORE_INDEX
from ds_distill.losses.divergences import ENTROPY_THRESHOLD, LOSSES, check_args

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossArgs:
    """The options every loss function takes by keyword (``loss_sums(..., loss="jsd", alpha=0.3)`` builds
    ``LossArgs(loss="jsd", alpha=0.3)``; an unknown name is a TypeError, a bad value a one-line ValueError)."""

    loss: str = "forward_kl"  # a name in LOSSES
    alpha: float = 0.5  # weight of CE; 1 - alpha weighs the KD term
    temperature: float = 1.0  # of the KD term (its T^2 factor keeps gradient scales comparable)
    beta: float = 0.5  # of the beta-parameterised losses (see LOSSES)
    skew: float = 0.1  # of the skewed KLs
    entropy_threshold: float = ENTROPY_THRESHOLD  # nats, of entropy_aware_kl
    ignore_index: int = IGNORE_INDEX  # labels not scored
    # The student's real vocabulary: only the first vocab_size logits are scored (models padded beyond the tokenizer);
    # None: the student's whole output row (the teachers' must then be as wide).
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        check_args(self.loss, self.alpha, self.temperature, self.beta, self.skew, self.entropy_threshold)

    def divergence(self, t_logp: Tensor, s_logp: Tensor) -> Tensor:
        """``T^2 * D(p_t, p_s)`` per row: log-probabilities at T ``[n, V]`` (or over buckets) -> ``[n]`` nats."""
        d = LOSSES[self.loss](t_logp, s_logp, beta=self.beta, skew=self.skew, entropy_threshold=self.entropy_threshold)
        return self.temperature**2 * d


@dataclass
class LossSums:
    """Sums over supervised tokens (the trainer divides by the global token count)."""

    total: Tensor  # scalar: sum of alpha * CE + (1 - alpha) * T^2 * D
    ce: Tensor  # scalar: sum of CE (nats)
    kd: Tensor  # scalar: sum of T^2 * D
    n_tokens: Tensor  # scalar int64: supervised tokens
    ce_per_seq: Tensor  # [B] CE sum of each row (for per-example tracking)
    kd_per_seq: Tensor  # [B]
    tokens_per_seq: Tensor  # [B] int64
    # Further sums to log beside ce and kd, already inside `total` where they count (e.g. the hidden-state loss:
    # "hidden", "hidden_s0_t3"); the trainer divides them by the global token count like the rest.
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer as the loss calls it: ``logits = transform(linear(h))``, ``[n, H] -> [n, V_model]``.

    linear: the output projection module (called, never its .weight read, so ZeRO-3's hooks gather it).
    transform: what the model applies after the projection in its own forward (softcapping, logit scales, ...),
    elementwise; None when the model applies nothing (then the fast paths may use ``linear`` alone).
    """

    linear: torch.nn.Module
    transform: Callable[[Tensor], Tensor] | None = None
    # True where the projection's weight is tied to an input embedding whose gradient is sparse
    # (``models.head.sparse_tied_embedding``): the fused path then adds the weight's gradient straight into
    # ``weight.grad`` in backward, and autograd adds the embedding's sparse rows into it in place.
    grad_into_weight: bool = False

    def __call__(self, h: Tensor) -> Tensor:
        z = self.linear(h)
        return z if self.transform is None else self.transform(z)


def teacher_logprobs(teacher_logits: Sequence[Tensor], temperature: float, weights: Tensor | None) -> Tensor:
    """log of the teachers' mixture sum_k w_k softmax(t_k / T), ``K x [n, V] -> [n, V]``.

    weights: None (uniform), ``[K]`` (normalised here) or per token ``[n, K]`` (rows sum to 1, e.g. a router's).
    """
    scaled = lambda t: t.float() if temperature == 1.0 else t.float() / temperature  # / 1 is exact: no copy needed
    if len(teacher_logits) == 1 and weights is None:
        return F.log_softmax(scaled(teacher_logits[0]), dim=-1)
    logps = torch.stack([F.log_softmax(scaled(t), dim=-1) for t in teacher_logits], dim=-1)  # [n, V, K]
    k = len(teacher_logits)
    w = torch.full((k,), 1.0 / k, device=logps.device) if weights is None else weights.to(logps.device, torch.float32)
    w = w / w.sum() if w.dim() == 1 else w
    log_w = w.log().unsqueeze(-2)  # [1, K] or [n, 1, K]
    return torch.logsumexp(logps + log_w, dim=-1)


def token_terms(
    s_logits: Tensor, t_logits: Sequence[Tensor], labels: Tensor, args: LossArgs, weights
) -> tuple[Tensor, Tensor]:
    """CE and T^2 * D for supervised rows only: ``[n, V], K x [n, V], [n] -> ([n], [n])``. A list ``t_logits`` is
    emptied once the teachers' log-probabilities are made (one [n, V] tensor less at the divergence)."""
    s = s_logits.float()
    # cross_entropy is nll_loss of log_softmax: computed once here, the KD term reuses it at T = 1 (one [n, V] pass
    # less forward and backward; the same values).
    s_logp1 = F.log_softmax(s, dim=-1)
    ce = F.nll_loss(s_logp1, labels, reduction="none")
    if args.alpha == 1.0:  # plain fine-tuning: the teacher is not needed
        return ce, torch.zeros_like(ce)
    if callable(weights):  # a router (ds_distill.losses.routing): per-token weights from the teachers at temperature 1
        with torch.no_grad():
            weights = weights([F.log_softmax(t.float(), dim=-1) for t in t_logits], labels)
    t_logp = teacher_logprobs(t_logits, args.temperature, weights)
    if isinstance(t_logits, list):  # the teachers' [n, V] logits are not needed past here: freed before the divergence
        t_logits.clear()
    s_logp = s_logp1 if args.temperature == 1.0 else F.log_softmax(s / args.temperature, dim=-1)
    return ce, args.divergence(t_logp, s_logp)


def forward_kl_terms_and_grad(
    z: Tensor, teacher: list[Tensor], labels: Tensor, alpha: float, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``token_terms`` for one teacher and forward KL, with the gradient of ``sum(alpha * CE + (1 - alpha) * kd)``
    with respect to the student logits made by its formula instead of by autograd: ``[n, V], [[n, V]], [n] ->
    (CE [n], kd [n], dL/dz [n, V] fp32)``, kd = ``T^2 KL(p_T || q_T)`` nats, ``p_T = softmax(t / T)`` the teacher's
    and ``q_T = softmax(z / T)`` the student's (Hinton et al. 2015, with its T^2 factor).

    The gradient (per row; ``q = softmax(z)``, ``e_y`` the label's one-hot; the rows of p_T sum to 1):
    ``dCE/dz = q - e_y`` and ``d(T^2 KL)/dz = T (q_T - p_T)``, so ``dL/dz = alpha (q - e_y) + (1 - alpha) T (q_T -
    p_T)``. Where ``p_T = 0`` the KL's term is 0 (0 log 0), as in ``divergences.kl``.

    For memory, not speed of writing: ``z`` (fp32) is overwritten and becomes ``dL/dz``, and ``teacher`` (a list of
    one tensor, as ``token_terms`` takes) is emptied once the teacher's log-probabilities are made, so at most three
    ``[n, V]`` fp32 tensors are alive at once (autograd's path through ``log_softmax``, ``kl`` and their backward holds
    up to seven: docs/performance.md, issue 28). The values are ``token_terms``'s, in another summation order.
    """
    if z.dtype != torch.float32:
        raise ValueError(f"student logits must be float32 to be overwritten, not {z.dtype}")
    rows = torch.arange(z.shape[0], device=z.device)
    lse1 = torch.logsumexp(z, dim=-1)
    ce = lse1 - z[rows, labels]
    if temperature != 1.0:
        z.div_(temperature)
    lse = lse1 if temperature == 1.0 else torch.logsumexp(z, dim=-1)
    logq = z.sub_(lse.unsqueeze(-1))  # log q_T, in z's storage
    t = teacher.pop().float()
    t = t if temperature == 1.0 else t / temperature
    d = t - torch.logsumexp(t, dim=-1, keepdim=True)  # log p_T
    del t  # the teacher's logits (unless its caller keeps them)
    p = d.exp()
    d.sub_(logq).masked_fill_(p == 0, 0.0).mul_(p)
    kd = d.sum(-1).mul_(temperature**2)
    if temperature == 1.0:
        del d
        g = logq.exp_().sub_(p, alpha=1.0 - alpha)  # q - (1 - alpha) p
    else:
        # q = exp(T log q_T + T lse_T - lse_1), made in d's storage
        q = d.copy_(logq).mul_(temperature).add_((temperature * lse - lse1).unsqueeze(-1)).exp_()
        g = logq.exp_().sub_(p).mul_((1.0 - alpha) * temperature).add_(q, alpha=alpha)
        del q, d
    del p
    g[rows, labels] -= alpha
    return ce, kd, g


def check_vocab(vocab_size: int | None, student_v: int, teacher_vs: Sequence[int]) -> int:
    """The vocabulary to score: ``vocab_size``, or the student's when None (then the teachers' must be the same)."""
    if vocab_size is None:
        for tv in teacher_vs:
            if tv != student_v:
                raise ValueError(
                    f"teacher vocab {tv} != student vocab {student_v}: pass vocab_size (the shared real vocabulary)"
                )
        return student_v
    if not 1 <= vocab_size <= min([student_v, *teacher_vs]):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {min([student_v, *teacher_vs])}] "
            f"(student vocab {student_v}, teacher vocabs {list(teacher_vs)})"
        )
    return vocab_size


def check_weights(w: Tensor, k: int, bt: torch.Size) -> None:
    """``[K]`` or ``[B, T, K]`` teacher weights; a wrong K would silently broadcast into a mixture that is not one."""
    if w.dim() not in (1, 3) or w.shape[-1] != k or (w.dim() == 3 and w.shape[:2] != bt):
        raise ValueError(
            f"teacher_weights {tuple(w.shape)} must be [K] or [B, T, K] with K={k} teachers and [B, T]={tuple(bt)}"
        )
    # Values are checked only on the CPU (config lists land there): on an accelerator it would be a host sync per step.
    if w.dim() == 1 and w.device.type == "cpu" and not (torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError(f"teacher_weights={w.tolist()} must be finite, >= 0, with a positive sum")


def as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def sum_terms(ce: Tensor, kd: Tensor, rows: Tensor, batch: int, alpha: float, anchor: Tensor) -> LossSums:
    """Per-token terms -> LossSums; ``anchor`` keeps an all-masked batch connected to the graph (0, not NaN)."""
    # An empty slice sums to 0 with zero grads; 0 * anchor.sum() would be NaN as soon as a logit is -inf (masked vocab).
    total = (alpha * ce + (1.0 - alpha) * kd).sum() + anchor.narrow(-1, 0, 0).sum()
    per_seq = lambda v: torch.zeros(batch, device=v.device, dtype=torch.float32).index_add_(0, rows, v.detach().float())
    counts = torch.zeros(batch, device=rows.device, dtype=torch.int64).index_add_(0, rows, torch.ones_like(rows))
    return LossSums(total, ce.sum().detach(), kd.sum().detach(), counts.sum(), per_seq(ce), per_seq(kd), counts)


def prepare(shape_of: Tensor, labels: Tensor, teachers: list | None, teacher_weights, args: LossArgs, name: str):
    """Check shapes; return the supervised positions (flat index, row, label) and the weights of those rows.

    teachers: the teachers' ``[B, T, *]`` tensors (required unless alpha = 1), or None for a teacher given per
    supervised token (sparse: checked by its loss)."""
    if shape_of.dim() != 3:
        raise ValueError(f"student {name} {tuple(shape_of.shape)} must be [B, T, *]")
    if labels.shape != shape_of.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] matching {name} {tuple(shape_of.shape)}")
    for t in teachers or []:
        if t.shape[:2] != shape_of.shape[:2]:
            raise ValueError(
                f"teacher {name} {tuple(t.shape)} must match student {name} {tuple(shape_of.shape)} in [B, T]"
            )
    if teachers is not None and not teachers and args.alpha != 1.0:
        raise ValueError("teacher logits are required unless alpha == 1")
    # Supervised positions in the flattened [B*T], found where the labels live: labels kept on the host (as the
    # trainer does) cost no device sync here, where nonzero() on device labels would wait for the device.
    idx = (labels != args.ignore_index).flatten().nonzero().squeeze(1)
    rows, lab = idx // labels.shape[1], labels.flatten()[idx]
    idx, rows, lab = (x.to(shape_of.device, non_blocking=True) for x in (idx, rows, lab))
    if callable(teacher_weights):  # a router: called per chunk in _token_terms
        return idx, rows, lab, teacher_weights
    w = None if teacher_weights is None or not teachers else torch.as_tensor(teacher_weights)
    if w is not None:
        check_weights(w, len(teachers), labels.shape)
    if w is not None and w.dim() == 3:
        w = w.to(shape_of.device).flatten(0, 1)[idx]
    return idx, rows, lab, w
