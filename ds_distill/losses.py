"""Distillation losses: pure functions of logits (or hidden states and heads), labels and a few floats.

Conventions (all functions):
    logits ``[B, T, V]``, labels ``[B, T]`` already aligned (position t is scored against ``labels[:, t]``; the caller
    shifts), ``ignore_index`` positions contribute nothing. Everything is computed in fp32. Labels may stay on the
    host while the logits are on a device (the supervised positions are then found without a device sync).
    Per supervised token: ``alpha * CE(student, label) + (1 - alpha) * T^2 * D(p_t, p_s)`` with
    ``p_t = softmax(teacher / T)``, ``p_s = softmax(student / T)`` and CE on the unscaled student logits.
    ``loss_sums`` / ``chunked_loss_sums`` return *sums* and the token count; the trainer divides by the global count.
Divergences ``D`` are looked up by exact name in ``LOSSES``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
Tensor = torch.Tensor
log = logging.getLogger(__name__)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities ``[N, V] -> [N]``; 0 * log 0 counts as 0 (no NaN at -inf)."""
    p = logp.exp()
    return (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(-1)


def _mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
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
    return _kl(t, s)


def reverse_kl(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """KL(p_s || p_t): mode-seeking (MiniLLM)."""
    return _kl(s, t)


def jsd(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """Generalised JSD (GKD): m = beta p_t + (1 - beta) p_s, D = beta KL(p_t||m) + (1 - beta) KL(p_s||m).

    By the GKD paper's convention beta = 0 is forward KL and beta = 1 reverse KL (special-cased: the formula itself
    vanishes at both ends).
    """
    if beta == 0.0:
        return _kl(t, s)
    if beta == 1.0:
        return _kl(s, t)
    m = _mix(t, s, beta)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def skew_forward_kl(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """KL(p_t || skew p_t + (1 - skew) p_s) (DistiLLM): bounded even where p_s vanishes."""
    return _kl(t, _mix(t, s, skew))


def skew_reverse_kl(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """KL(p_s || skew p_s + (1 - skew) p_t) (DistiLLM)."""
    return _kl(s, _mix(s, t, skew))


def tvd(t: Tensor, s: Tensor, *, beta: float, skew: float) -> Tensor:
    """Total variation distance 0.5 * sum |p_t - p_s|, in [0, 1]."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


LOSSES: dict[str, Callable[..., Tensor]] = {
    f.__name__: f for f in (forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd)
}


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



@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer as the loss calls it: ``logits = transform(linear(h))``, ``[n, H] -> [n, V_model]``.

    linear: the output projection module (called, never its .weight read, so ZeRO-3's hooks gather it).
    transform: what the model applies after the projection in its own forward (softcapping, logit scales, ...),
    elementwise; None when the model applies nothing (then the fast paths may use ``linear`` alone).
    """
    linear: torch.nn.Module
    transform: Callable[[Tensor], Tensor] | None = None

    def __call__(self, h: Tensor) -> Tensor:
        z = self.linear(h)
        return z if self.transform is None else self.transform(z)


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


def teacher_logprobs(teacher_logits: Sequence[Tensor], temperature: float, weights: Tensor | None) -> Tensor:
    """log of the teachers' mixture sum_k w_k softmax(t_k / T), ``K x [n, V] -> [n, V]``.

    weights: None (uniform), ``[K]`` (normalised here) or per token ``[n, K]`` (rows sum to 1, e.g. a router's).
    """
    logps = torch.stack([F.log_softmax(t.float() / temperature, dim=-1) for t in teacher_logits], dim=-1)  # [n, V, K]
    if len(teacher_logits) == 1 and weights is None:
        return logps[..., 0]
    k = len(teacher_logits)
    w = torch.full((k,), 1.0 / k, device=logps.device) if weights is None else weights.to(logps.device, torch.float32)
    w = w / w.sum() if w.dim() == 1 else w
    log_w = w.log().unsqueeze(-2)  # [1, K] or [n, 1, K]
    return torch.logsumexp(logps + log_w, dim=-1)


def _token_terms(s_logits: Tensor, t_logits: Sequence[Tensor], labels: Tensor, *, loss: str, alpha: float,
                 temperature: float, beta: float, skew: float, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """CE and T^2 * D for supervised rows only: ``[n, V], K x [n, V], [n] -> ([n], [n])``."""
    s = s_logits.float()
    ce = F.cross_entropy(s, labels, reduction="none")
    if alpha == 1.0:  # plain fine-tuning: the teacher is not needed
        return ce, torch.zeros_like(ce)
    if callable(weights):  # a router (ds_distill.routing): per-token weights from the teachers at temperature 1
        with torch.no_grad():
            weights = weights([F.log_softmax(t.float(), dim=-1) for t in t_logits], labels)
    t_logp = teacher_logprobs(t_logits, temperature, weights)
    s_logp = F.log_softmax(s / temperature, dim=-1)
    return ce, temperature**2 * LOSSES[loss](t_logp, s_logp, beta=beta, skew=skew)


def _check_vocab(vocab_size: int | None, student_v: int, teacher_vs: Sequence[int]) -> int:
    """The vocabulary to score: ``vocab_size``, or the student's when None (then the teachers' must be the same)."""
    if vocab_size is None:
        for tv in teacher_vs:
            if tv != student_v:
                raise ValueError(f"teacher vocab {tv} != student vocab {student_v}: pass vocab_size (the shared real vocabulary)")
        return student_v
    if not 1 <= vocab_size <= min([student_v, *teacher_vs]):
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {min([student_v, *teacher_vs])}] "
                         f"(student vocab {student_v}, teacher vocabs {list(teacher_vs)})")
    return vocab_size


def _check_weights(w: Tensor, k: int, bt: torch.Size) -> None:
    """``[K]`` or ``[B, T, K]`` teacher weights; a wrong K would silently broadcast into a mixture that is not one."""
    if w.dim() not in (1, 3) or w.shape[-1] != k or (w.dim() == 3 and w.shape[:2] != bt):
        raise ValueError(f"teacher_weights {tuple(w.shape)} must be [K] or [B, T, K] with K={k} teachers and "
                         f"[B, T]={tuple(bt)}")
    # Values are checked only on the CPU (config lists land there): on an accelerator it would be a host sync per step.
    if w.dim() == 1 and w.device.type == "cpu" and not (torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError(f"teacher_weights={w.tolist()} must be finite, >= 0, with a positive sum")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _sums(ce: Tensor, kd: Tensor, rows: Tensor, batch: int, alpha: float, anchor: Tensor) -> LossSums:
    """Per-token terms -> LossSums; ``anchor`` keeps an all-masked batch connected to the graph (0, not NaN)."""
    # An empty slice sums to 0 with zero grads; 0 * anchor.sum() would be NaN as soon as a logit is -inf (masked vocab).
    total = (alpha * ce + (1.0 - alpha) * kd).sum() + anchor.narrow(-1, 0, 0).sum()
    per_seq = lambda v: torch.zeros(batch, device=v.device, dtype=torch.float32).index_add_(0, rows, v.detach().float())
    counts = torch.zeros(batch, device=rows.device, dtype=torch.int64).index_add_(0, rows, torch.ones_like(rows))
    return LossSums(total, ce.sum().detach(), kd.sum().detach(), counts.sum(), per_seq(ce), per_seq(kd), counts)


def _prepare(shape_of: Tensor, labels: Tensor, teachers: list, teacher_weights, ignore_index: int, alpha: float, name: str):
    """Check shapes; return the supervised positions (flat index, row, label) and the weights of those rows."""
    if shape_of.dim() != 3:
        raise ValueError(f"student {name} {tuple(shape_of.shape)} must be [B, T, *]")
    if labels.shape != shape_of.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] matching {name} {tuple(shape_of.shape)}")
    for t in teachers:
        if t.shape[:2] != shape_of.shape[:2]:
            raise ValueError(f"teacher {name} {tuple(t.shape)} must match student {name} {tuple(shape_of.shape)} in [B, T]")
    if not teachers and alpha != 1.0:
        raise ValueError("teacher logits are required unless alpha == 1")
    # Supervised positions in the flattened [B*T], found where the labels live: labels kept on the host (as the
    # trainer does) cost no device sync here, where nonzero() on device labels would wait for the device.
    idx = (labels != ignore_index).flatten().nonzero().squeeze(1)
    rows, lab = idx // labels.shape[1], labels.flatten()[idx]
    idx, rows, lab = (x.to(shape_of.device, non_blocking=True) for x in (idx, rows, lab))
    if callable(teacher_weights):  # a router: called per chunk in _token_terms
        return idx, rows, lab, teacher_weights
    w = None if teacher_weights is None or not teachers else torch.as_tensor(teacher_weights)
    if w is not None:
        _check_weights(w, len(teachers), labels.shape)
    if w is not None and w.dim() == 3:
        w = w.to(shape_of.device).flatten(0, 1)[idx]
    return idx, rows, lab, w


def loss_sums(student_logits: Tensor, teacher_logits, labels: Tensor, *, loss: str = "forward_kl", alpha: float = 0.5,
              temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1, ignore_index: int = IGNORE_INDEX,
              vocab_size: int | None = None, teacher_weights=None) -> LossSums:
    """Loss sums from full logits. teacher_logits: ``[B, T, V]`` or a list of them (an ensemble).

    vocab_size: score only the first ``vocab_size`` logits (models padded beyond the tokenizer's vocabulary).
    teacher_weights: None (uniform), ``[K]``, per token ``[B, T, K]``, or a router (``ds_distill.routing``): a callable
    ``(K x [n, V] teacher log-probs at temperature 1, labels [n]) -> [n, K]``, called on the supervised tokens only
    (per chunk in ``chunked_loss_sums``, where it runs again when backward recomputes the chunk).
    """
    check_args(loss, alpha, temperature, beta, skew)
    teachers = _as_list(teacher_logits) if alpha != 1.0 else []  # alpha = 1: plain fine-tuning, teacher unused
    idx, rows, lab, w = _prepare(student_logits, labels, teachers, teacher_weights, ignore_index, alpha, "logits")
    v = _check_vocab(vocab_size, student_logits.shape[-1], [t.shape[-1] for t in teachers])
    s = student_logits.flatten(0, 1)[idx, :v]
    ts = [t.flatten(0, 1)[idx, :v] for t in teachers]
    ce, kd = _token_terms(s, ts, lab, loss=loss, alpha=alpha, temperature=temperature, beta=beta, skew=skew, weights=w)
    return _sums(ce, kd, rows, labels.shape[0], alpha, student_logits)


def chunked_loss_sums(student_hidden: Tensor, student_head: Callable[[Tensor], Tensor], teacher_hidden, teacher_head,
                      labels: Tensor, *, chunk_size: int = 1024, num_chunks: int | None = None,
                      vocab_size: int | None = None, loss: str = "forward_kl",
                      alpha: float = 0.5, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                      ignore_index: int = IGNORE_INDEX, teacher_weights=None) -> LossSums:
    """The same sums from final hidden states, without ever holding full ``[tokens, V]`` logits.

    student_hidden ``[B, T, H]``; teacher_hidden ``[B, T, H_t]`` or a list (ensemble) with teacher_head one callable
    or a list. Heads are callables ``[n, H] -> [n, V_model]`` (teacher heads are called under no_grad, once per chunk).
    Only supervised positions are scored, ``chunk_size`` tokens at a time. Two ways, chosen by the student head
    (logged once each):

    - fused (an ``OutputHead`` over an ``nn.Linear``, ZeRO-3's or not; the loop runs inside one call of that module,
      where ZeRO-3 has gathered its weight): the gradient is computed in the forward, as fused linear-cross-entropy
      kernels do (Liger-Kernel): per chunk the student logits ``z`` are computed once, the loss terms and ``dL/dz`` by autograd on the chunk alone (through ``transform``),
      then ``dL/dh = dL/dz @ W`` and ``dL/dW += dL/dz^T h`` (``dL/db += sum dL/dz``) are kept and the chunk's
      logits dropped. Backward recomputes nothing; the head's gradient reaches autograd's (and DeepSpeed's) gradient
      hooks through the returned ``total``. Extra memory: the ``[V, H]`` fp32 gradient buffer, plus ~3 chunks of
      ``[chunk_size, V]`` fp32.
    - checkpointed (any other callable): each chunk's logits (both models) are recomputed in backward instead of
      stored; extra memory ~3 chunks of ``[chunk_size, V]`` fp32.

    num_chunks: call the teacher heads (and, checkpointed, the student head) exactly this many times (trailing chunks
    may be empty). Under ZeRO-3 every head call is a collective weight gather, so all ranks must make the same number
    of calls although their numbers of supervised tokens differ: the trainer passes the maximum over ranks of
    ``ceil(n_tokens / chunk_size)``.
    """
    check_args(loss, alpha, temperature, beta, skew)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    t_hidden, t_heads = _as_list(teacher_hidden) if teacher_hidden is not None else [], _as_list(teacher_head)
    if alpha == 1.0:
        t_hidden = []
    if len(t_hidden) != len(t_heads) and t_hidden:
        raise ValueError(f"{len(t_hidden)} teacher hidden states but {len(t_heads)} teacher heads")
    idx, rows, lab, w = _prepare(student_hidden, labels, t_hidden, teacher_weights, ignore_index, alpha, "hidden states")
    hs = student_hidden.flatten(0, 1)[idx]
    ths = [t.flatten(0, 1)[idx] for t in t_hidden]
    kw = dict(loss=loss, alpha=alpha, temperature=temperature, beta=beta, skew=skew)
    weights_of = lambda sl: w[sl] if isinstance(w, Tensor) and w.dim() == 2 else w

    def teacher_logits(sl: slice) -> list[Tensor]:
        with torch.no_grad():
            return [head(x[sl]) for head, x in zip(t_heads, ths)]

    def terms(s_logits: Tensor, t_logits: list[Tensor], sl: slice) -> tuple[Tensor, Tensor]:
        v = _check_vocab(vocab_size, s_logits.shape[-1], [t.shape[-1] for t in t_logits])
        return _token_terms(s_logits[:, :v], [t[:, :v] for t in t_logits], lab[sl], weights=weights_of(sl), **kw)

    chunks = _chunk_slices(hs.shape[0], chunk_size, num_chunks)
    run = _fused_chunks if _fusable(student_head) else _checkpointed_chunks
    return run(hs, student_head, chunks, teacher_logits, terms, rows, labels.shape[0], alpha, student_hidden)


def _chunk_slices(n: int, chunk_size: int, num_chunks: int | None) -> list[slice]:
    """``num_chunks`` slices of ``chunk_size`` (>= 1, checked by the callers) over ``n`` rows (trailing ones may be
    empty); as many as ``n`` needs if None."""
    needed = -(-n // chunk_size)
    if num_chunks is not None and num_chunks < needed:
        raise ValueError(f"num_chunks={num_chunks} is too few for {n} tokens in chunks of {chunk_size}")
    return [slice(start, start + chunk_size) for start in range(0, chunk_size * (needed if num_chunks is None else num_chunks), chunk_size)]


def _checkpointed_chunks(hs: Tensor, head: Callable[[Tensor], Tensor], chunks: list[slice], teacher_logits, terms,
                         rows: Tensor, batch: int, alpha: float, anchor: Tensor) -> LossSums:
    """The checkpointed path of ``chunked_loss_sums`` (see there): each chunk's logits, the student's and the
    teachers', are recomputed in backward, cheaper in memory than keeping them alive."""

    def chunk_terms(h: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        return terms(head(h), teacher_logits(sl), sl)

    ces, kds = [], []
    for sl in chunks:
        ce, kd = checkpoint(chunk_terms, hs[sl], sl, use_reentrant=False)
        ces.append(ce)
        kds.append(kd)
    empty = hs.new_zeros(0, dtype=torch.float32)
    ce, kd = (torch.cat(ces), torch.cat(kds)) if ces else (empty, empty)
    return _sums(ce, kd, rows, batch, alpha, anchor)


_LOGGED: set[str] = set()


def _fusable(head) -> bool:
    """Whether the fused path serves ``head``; logs the choice once per reason."""
    fused = isinstance(head, OutputHead) and isinstance(head.linear, torch.nn.Linear)
    if fused:
        why = "fused: gradients computed in the forward, each head runs once per chunk"
    else:
        why = (f"checkpointed: the student head is a {type(head).__name__}, not an OutputHead over an nn.Linear, so "
               "both heads run again in backward")
    if why not in _LOGGED:
        _LOGGED.add(why)
        log.info("chunked loss: %s", why)
    return fused


def _call_as_forward(module: torch.nn.Module, fn: Callable, *args):
    """``module(*args)`` with ``fn`` standing in for ``module.forward``: the module's hooks run around ``fn``.

    Under ZeRO-3 those hooks gather the module's partitioned parameters before ``fn`` runs and release them after,
    and they attach themselves to ``fn``'s inputs and outputs so that the parameters are gathered again when backward
    reaches the outputs and released once it has passed the inputs: ``fn`` must compute from the ``args`` it receives
    and return what backward enters through. Without hooks this is just ``fn(*args)``.
    """
    own = module.__dict__.get("forward")  # an instance-level forward someone else installed (restored after)
    module.forward = fn
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


class _GradInForward(torch.autograd.Function):
    """Returns ``value``; its backward hands out gradients computed in the forward, times the incoming gradient.

    forward(value, *pairs): ``value`` a detached scalar; ``pairs`` = tensors then their gradients (same count), a
    gradient None where its tensor needs none. The gradients are scaled in place: a second backward through the same graph
    (retain_graph) raises instead of handing out twice-scaled gradients.
    """

    @staticmethod
    def forward(ctx, value: Tensor, *pairs):
        half = len(pairs) // 2
        ctx.save_for_backward(*pairs[half:])
        ctx.dtypes = [None if t is None else t.dtype for t in pairs[:half]]
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grads = ctx.saved_tensors
        outs = [None if g is None else g.mul_(grad).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (None, *outs, *[None] * len(grads))


def _accumulate(acc: Tensor | None, x: Tensor) -> Tensor:
    """acc + x in fp32 (a new fp32 tensor for the first chunk, then in place)."""
    return x.float() if acc is None else acc.add_(x)


def _fused_chunks(hs: Tensor, head: OutputHead, chunks: list[slice], teacher_logits, terms, rows: Tensor, batch: int,
                  alpha: float, anchor: Tensor) -> LossSums:
    """The fused path of ``chunked_loss_sums`` (see there): ``hs`` ``[n, H]`` the supervised student hidden states.

    The chunk loop runs as the forward of ``head.linear`` (``_call_as_forward``): a ZeRO-3 weight is whole only there,
    and the loss total returned from that call is where backward enters the module, so ZeRO-3 gathers the weight
    again before ``_GradInForward`` hands its gradient to autograd, whose accumulation (summed with a tied embedding's
    gradient) fires DeepSpeed's reduce hook once, as for an ordinary module. Without ZeRO-3 the call adds nothing.
    """
    linear: torch.nn.Linear = head.linear
    sums: list[LossSums] = []

    def forward(h: Tensor) -> Tensor:
        weight, bias = linear.weight, linear.bias
        grad_of = lambda t: torch.is_grad_enabled() and t is not None and t.requires_grad
        need = [grad_of(h), grad_of(weight), grad_of(bias)]
        ces, kds, g_hs = [], [], []
        # fp32 accumulators of the weight and bias gradients: per-chunk products are summed in fp32.
        g_w = g_b = None
        for sl in chunks:
            t_logits = teacher_logits(sl)  # called for every chunk, empty ones too (collective calls under ZeRO-3)
            x = h[sl].detach()
            if x.shape[0] == 0:
                continue
            with torch.no_grad():
                z_lin = F.linear(x, weight, bias)
            if not any(need):
                with torch.no_grad():
                    ce, kd = terms(z_lin if head.transform is None else head.transform(z_lin), t_logits, sl)
            else:
                with torch.enable_grad():
                    z_lin.requires_grad_()
                    ce, kd = terms(z_lin if head.transform is None else head.transform(z_lin), t_logits, sl)
                    (g_z,) = torch.autograd.grad((alpha * ce + (1.0 - alpha) * kd).sum(), z_lin)
                if need[0]:
                    g_hs.append(g_z @ weight)
                if need[1]:
                    g_w = _accumulate(g_w, g_z.t() @ x)
                if need[2]:
                    g_b = _accumulate(g_b, g_z.sum(0))
            ces.append(ce.detach())
            kds.append(kd.detach())
        empty = h.new_zeros(0, dtype=torch.float32)
        ce, kd = (torch.cat(ces), torch.cat(kds)) if ces else (empty, empty)
        sums.append(_sums(ce, kd, rows, batch, alpha, anchor.detach()))
        if not any(need):
            return sums[0].total
        g_h = (torch.cat(g_hs) if g_hs else torch.zeros_like(h)) if need[0] else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] and g_w is None else g_w
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] and g_b is None else g_b
        return _GradInForward.apply(sums[0].total.detach(), h if need[0] else None, weight if need[1] else None,
                                    bias if need[2] else None, g_h, g_w, g_b)

    total = _call_as_forward(linear, forward, hs)
    sums[0].total = total
    return sums[0]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, loss: str = "forward_kl",
                      alpha: float = 0.5, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                      ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean over non-ignored positions of ``alpha * CE + (1 - alpha) * T^2 * D`` (a finite 0 if none)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have the same shape")
    out = loss_sums(student_logits, teacher_logits, labels, loss=loss, alpha=alpha, temperature=temperature, beta=beta,
                    skew=skew, ignore_index=ignore_index)
    return out.total / out.n_tokens.clamp(min=1)


# ------------------------------------------------------------------------------------- sparse (cached) teacher targets
def _sparse_token_terms(s_logits: Tensor, labels: Tensor, t_ids: Tensor, t_logp: Tensor, t_tail: Tensor, *, loss: str,
                        alpha: float, temperature: float, beta: float, skew: float) -> tuple[Tensor, Tensor]:
    """CE and T^2 * D on the top-K support plus one tail bucket: ``[n, V], [n], [n, K], [n, K], [n] -> ([n], [n])``."""
    s = s_logits.float()
    ce = F.cross_entropy(s, labels, reduction="none")
    if alpha == 1.0:
        return ce, torch.zeros_like(ce)
    s_logp = F.log_softmax(s / temperature, dim=-1)
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
    return ce, temperature**2 * LOSSES[loss](t, s_b, beta=beta, skew=skew)


def _check_sparse(t_ids: Tensor, t_logp: Tensor, t_tail: Tensor, n: int, v: int) -> None:
    if t_ids.dim() != 2 or t_logp.shape != t_ids.shape or t_tail.shape != t_ids.shape[:1] or t_ids.shape[0] != n:
        raise ValueError(f"teacher ids {tuple(t_ids.shape)}, log-probs {tuple(t_logp.shape)} and tail {tuple(t_tail.shape)} "
                         f"must be [n, K], [n, K], [n] with n={n} supervised tokens")
    if not 1 <= t_ids.shape[1] <= v:
        raise ValueError(f"top-K={t_ids.shape[1]} must be in [1, {v}] (the vocabulary scored)")


def sparse_loss_sums(student_logits: Tensor, teacher_ids: Tensor, teacher_logp: Tensor, teacher_tail: Tensor,
                     labels: Tensor, *, loss: str = "forward_kl", alpha: float = 0.5, temperature: float = 1.0,
                     beta: float = 0.5, skew: float = 0.1, ignore_index: int = IGNORE_INDEX,
                     vocab_size: int | None = None) -> LossSums:
    """Loss sums against a sparse teacher (e.g. ``ds_distill.teacher_cache``): its top-K plus one tail bucket.

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
    CE is the ordinary full-vocabulary cross-entropy on the labels.
    """
    check_args(loss, alpha, temperature, beta, skew)
    idx, rows, lab, _ = _prepare(student_logits, labels, [], None, ignore_index, 1.0, "logits")
    v = _check_vocab(vocab_size, student_logits.shape[-1], [])
    _check_sparse(teacher_ids, teacher_logp, teacher_tail, idx.shape[0], v)
    s = student_logits.flatten(0, 1)[idx, :v]
    t_ids, t_logp, t_tail = (x.to(s.device, non_blocking=True) for x in (teacher_ids, teacher_logp, teacher_tail))
    ce, kd = _sparse_token_terms(s, lab, t_ids, t_logp, t_tail, loss=loss, alpha=alpha, temperature=temperature, beta=beta, skew=skew)
    return _sums(ce, kd, rows, labels.shape[0], alpha, student_logits)


def chunked_sparse_loss_sums(student_hidden: Tensor, student_head: Callable[[Tensor], Tensor], teacher_ids: Tensor,
                             teacher_logp: Tensor, teacher_tail: Tensor, labels: Tensor, *, chunk_size: int = 1024,
                             num_chunks: int | None = None, vocab_size: int | None = None, loss: str = "forward_kl",
                             alpha: float = 0.5, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                             ignore_index: int = IGNORE_INDEX) -> LossSums:
    """``sparse_loss_sums`` from the student's final hidden states ``[B, T, H]``, its head called ``chunk_size``
    supervised tokens at a time, never ``[tokens, V]`` logits at once: fused (gradients in the forward) or checkpointed
    (recomputed in backward), chosen by the head as in ``chunked_loss_sums``; ``num_chunks`` as there (the same number
    of head calls on every rank under ZeRO-3)."""
    check_args(loss, alpha, temperature, beta, skew)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    idx, rows, lab, _ = _prepare(student_hidden, labels, [], None, ignore_index, 1.0, "hidden states")
    hs = student_hidden.flatten(0, 1)[idx]
    _check_sparse(teacher_ids, teacher_logp, teacher_tail, hs.shape[0], teacher_ids.shape[-1])  # K against V: per chunk
    t_ids, t_logp, t_tail = (x.to(hs.device, non_blocking=True) for x in (teacher_ids, teacher_logp, teacher_tail))
    kw = dict(loss=loss, alpha=alpha, temperature=temperature, beta=beta, skew=skew)

    def terms(s_logits: Tensor, _: list[Tensor], sl: slice) -> tuple[Tensor, Tensor]:
        v = _check_vocab(vocab_size, s_logits.shape[-1], [])
        _check_sparse(t_ids[sl], t_logp[sl], t_tail[sl], s_logits.shape[0], v)
        return _sparse_token_terms(s_logits[:, :v], lab[sl], t_ids[sl], t_logp[sl], t_tail[sl], **kw)

    chunks = _chunk_slices(hs.shape[0], chunk_size, num_chunks)
    run = _fused_chunks if _fusable(student_head) else _checkpointed_chunks
    return run(hs, student_head, chunks, lambda sl: [], terms, rows, labels.shape[0], alpha, student_hidden)
