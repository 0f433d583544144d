"""Running a loss ``chunk_size`` supervised tokens at a time, never holding ``[tokens, V]`` logits: the fused path
(gradients computed in the forward, as fused linear-cross-entropy kernels do) and the checkpointed path."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ds_distill.losses.terms import LossSums, OutputHead, sum_terms

Tensor = torch.Tensor
log = logging.getLogger("ds_distill.losses")


def chunk_slices(n: int, chunk_size: int, num_chunks: int | None) -> list[slice]:
    """``num_chunks`` slices of ``chunk_size`` (>= 1) over ``n`` rows (trailing ones may be empty); as many as ``n``
    needs if None."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    needed = -(-n // chunk_size)
    if num_chunks is not None and num_chunks < needed:
        raise ValueError(f"num_chunks={num_chunks} is too few for {n} tokens in chunks of {chunk_size}")
    return [
        slice(start, start + chunk_size)
        for start in range(0, chunk_size * (needed if num_chunks is None else num_chunks), chunk_size)
    ]


def checkpointed_map(fn: Callable, slices: list[slice], *xs: Tensor, n_out: int = 2) -> tuple[Tensor, ...]:
    """``fn(*(x[sl] for x in xs), sl)`` -> ``n_out`` per-row tensors, for each slice under activation checkpointing
    (recomputed in backward, never kept), concatenated over the slices: ``n_out x [rows]`` (fp32 empties if none).

    Every slice is called, empty ones too: under ZeRO-3 each head call inside ``fn`` gathers its weight on every
    rank, so all ranks must make the same calls."""
    parts = [checkpoint(fn, *(x[sl] for x in xs), sl, use_reentrant=False) for sl in slices]
    if not parts:
        return (xs[0].new_zeros(0, dtype=torch.float32),) * n_out
    return tuple(torch.cat(p) for p in zip(*parts))


_LOGGED: set[str] = set()


def fusable(head) -> bool:
    """Whether the fused path serves ``head``; logs the choice once per reason."""
    fused = isinstance(head, OutputHead) and isinstance(head.linear, torch.nn.Linear)
    if fused:
        why = "fused: gradients computed in the forward, each head runs once per chunk"
    else:
        why = (
            f"checkpointed: the student head is a {type(head).__name__}, not an OutputHead over an nn.Linear, so "
            "both heads run again in backward"
        )
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

    forward(value, into, *pairs): ``value`` a detached scalar; ``pairs`` = tensors then their gradients (same count), a
    gradient None where its tensor needs none. ``into``: the leaf tensors (one per pair, else None) whose gradient is
    added straight into their ``.grad`` (made from it when None) instead of handed to autograd. A tied weight's other
    use then accumulates into that buffer in place: with a sparse embedding gradient, the tied weight's two ``[V, H]``
    gradients never exist at once (``models.head.sparse_tied_embedding``). The gradients are scaled in place: a second
    backward through the same graph (retain_graph) raises instead of handing out twice-scaled gradients.
    """

    @staticmethod
    def forward(ctx, value: Tensor, into: tuple, *pairs):
        half = len(pairs) // 2
        ctx.save_for_backward(*pairs[half:])
        ctx.dtypes = [None if t is None else t.dtype for t in pairs[:half]]
        ctx.into = into
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grads = ctx.saved_tensors
        outs = []
        for g, dtype, leaf in zip(grads, ctx.dtypes, ctx.into):
            g = None if g is None else g.mul_(grad).to(dtype)
            if g is not None and leaf is not None:  # before autograd reaches the leaf's other uses (it is upstream)
                leaf.grad = g if leaf.grad is None else leaf.grad.add_(g)
                g = None
            outs.append(g)
        del grads
        return (None, None, *outs, *[None] * len(outs))


def _accumulate(acc: Tensor | None, x: Tensor) -> Tensor:
    """acc + x in fp32 (a new fp32 tensor for the first chunk, then in place)."""
    return x.float() if acc is None else acc.add_(x)


def fused_chunks(
    hs: Tensor, head: OutputHead, chunks: list[slice], teacher_logits, terms, alpha: float, finish, grad_terms=None
) -> LossSums:
    """The fused path of ``chunked_loss_sums`` (see there): ``hs`` ``[n, H]`` the supervised student hidden states;
    ``finish(ce, kd)`` makes the ``LossSums`` of the per-token terms (its total is replaced by one that carries the
    gradients computed here). ``grad_terms(z, t_logits, sl) -> (CE, kd, dL/dz) | None``: where given and the head
    has no ``transform``, a chunk's ``dL/dz`` by its formula (``terms.forward_kl_terms_and_grad``, which overwrites
    ``z``) instead of by autograd through ``terms``; None falls back to autograd.

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
            by_formula = any(need) and grad_terms is not None and head.transform is None
            got = grad_terms(z_lin, t_logits, sl) if by_formula else None  # dL/dz in z's storage, or None
            if got is not None:
                ce, kd, g_z = got
                del got, z_lin, t_logits
            elif not any(need):
                with torch.no_grad():
                    ce, kd = terms(z_lin if head.transform is None else head.transform(z_lin), t_logits, sl)
            else:
                with torch.enable_grad():
                    z_lin.requires_grad_()
                    ce, kd = terms(z_lin if head.transform is None else head.transform(z_lin), t_logits, sl)
                    del t_logits  # [c, V]: the terms hold what their gradient needs; freed before it is taken
                    (g_z,) = torch.autograd.grad((alpha * ce + (1.0 - alpha) * kd).sum(), z_lin)
                # Let go of the chunk's logits and its graph before the [V, H] and [c, H] products are made.
                ce, kd = ce.detach(), kd.detach()
                del z_lin
            if any(need):
                # Without grad: g_z @ weight would record a graph (the weight requires grad) that keeps g_z [c, V]
                # alive through g_h until backward.
                with torch.no_grad():
                    if need[0]:
                        g_hs.append(g_z @ weight)
                    if need[1]:
                        g_w = _accumulate(g_w, g_z.t() @ x)
                    if need[2]:
                        g_b = _accumulate(g_b, g_z.sum(0))
                del g_z  # not alive beside the next chunk's logits
            ces.append(ce.detach())
            kds.append(kd.detach())
        empty = h.new_zeros(0, dtype=torch.float32)
        ce, kd = (torch.cat(ces), torch.cat(kds)) if ces else (empty, empty)
        sums.append(finish(ce, kd))
        if not any(need):
            return sums[0].total
        g_h = (torch.cat(g_hs) if g_hs else torch.zeros_like(h)) if need[0] else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] and g_w is None else g_w
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] and g_b is None else g_b
        into = (None, weight if head.grad_into_weight and need[1] else None, None)
        return _GradInForward.apply(
            sums[0].total.detach(),
            into,
            h if need[0] else None,
            weight if need[1] else None,
            bias if need[2] else None,
            g_h,
            g_w,
            g_b,
        )

    total = _call_as_forward(linear, forward, hs)
    sums[0].total = total
    return sums[0]


def run_chunks(
    hs: Tensor,
    head: Callable[[Tensor], Tensor],
    chunks: list[slice],
    teacher_logits: Callable[[slice], list[Tensor]],
    terms: Callable[[Tensor, list[Tensor], slice], tuple[Tensor, Tensor]],
    rows: Tensor,
    batch: int,
    alpha: float,
    anchor: Tensor,
    grad_terms: Callable | None = None,
) -> LossSums:
    """The chunk loop of the chunked losses: ``hs`` ``[n, H]`` the supervised student hidden states, ``rows`` ``[n]``
    their rows of the ``batch``; per chunk ``terms(student logits, teacher_logits(sl), sl) -> (CE [c], T^2 D [c])``.
    Fused when ``fusable(head)`` (see ``fused_chunks``), else checkpointed: each chunk's logits, the student's and
    the teachers', are recomputed in backward, cheaper in memory than keeping them alive. ``anchor``: as
    ``sum_terms``. ``grad_terms``: as ``fused_chunks`` (the checkpointed path does not use it)."""
    if fusable(head):
        finish = lambda ce, kd: sum_terms(ce, kd, rows, batch, alpha, anchor.detach())
        return fused_chunks(hs, head, chunks, teacher_logits, terms, alpha, finish, grad_terms)
    ce, kd = checkpointed_map(lambda h, sl: terms(head(h), teacher_logits(sl), sl), chunks, hs)
    return sum_terms(ce, kd, rows, batch, alpha, anchor)
