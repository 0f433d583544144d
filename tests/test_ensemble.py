"""Ensembles across teacher sources (``ds_distill.teachers.ensemble``): full members (live teachers) mixed with top-K
members (caches, servers) against float64 from the full distributions, chunked = at once, the live ensemble when
no member is top-K, and the refusal of what cannot be honest. Training runs: test_teacher_cache.py (live + cache) and
test_served.py (live + served)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ds_distill import losses, train
from ds_distill.losses.routing import LowestTeacherCE
from ds_distill.teachers import cache_format
from ds_distill.teachers.ensemble import MixedTeachers, mix
from ds_distill.teachers.live import LiveTeachers

N, V, H, T = 9, 11, 8, 1.5


def reference_kd(s_logits, full, tops, w, loss, temperature):
    """float64, token by token: the buckets are the union U of the top-K members' ids plus one for the rest; a full
    member contributes its own probabilities (exact), a top-K member its top K and its tail spread uniformly over
    its V - K other ids; T^2 * D(mixture buckets || student buckets)."""
    total = 0.0
    for i in range(s_logits.shape[0]):
        dists, union = [], set()
        for x in full:
            dists.append((x[i].double() / temperature).softmax(-1))
        for x, k in tops:
            p = (x[i].double() / temperature).softmax(-1)
            top = p.topk(k).indices
            r = torch.full((V,), (1 - p[top].sum()).item() / (V - k), dtype=torch.float64)
            r[top] = p[top]
            dists.append(r)
            union |= set(top.tolist())
        mixture = sum(w[i, m].double() * d for m, d in enumerate(dists))
        sp = (s_logits[i].detach().double() / temperature).softmax(-1)
        u = sorted(union) if union else list(range(V))
        rest = [v for v in range(V) if v not in union]
        tb, sb = mixture[u], sp[u]
        if rest:
            tb, sb = torch.cat([tb, mixture[rest].sum()[None]]), torch.cat([sb, sp[rest].sum()[None]])
        total += temperature**2 * losses.LOSSES[loss](tb.log(), sb.log(), beta=0.5, skew=0.1).item()
    return total


def teachers(seed=0):
    torch.manual_seed(seed)
    t = [torch.randn(N, V) * 3 for _ in range(3)]
    t[2][:3] = t[1][:3] + 0.1 * torch.randn(3, V)  # close top-K members on 3 tokens: smaller unions, padded rows
    w = torch.rand(N, 3)
    return t, w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_full_and_top_k_members_mix_on_the_buckets_as_float64(loss):
    """One full member (live: its log-probs of every id) and two top-K members of different K, per-token weights."""
    t, w = teachers()
    full = F.log_softmax(t[0] / T, -1)
    tops = [cache_format.top_k(x, k, T)[:3] for x, k in zip(t[1:], (3, 5))]
    s_logits = torch.randn(1, N, V, requires_grad=True)
    labels = torch.randint(0, V, (1, N))
    mixed = mix([full, *tops], w, V)
    assert (mixed[0] < 0).any() and mixed[0].shape[1] < V  # padded rows; U is the top-K members' union only
    got = losses.sparse_loss_sums(s_logits, *mixed, labels, loss=loss, alpha=0.0, temperature=T)
    ref = reference_kd(s_logits[0], [t[0]], list(zip(t[1:], (3, 5))), w, loss, T)
    assert got.kd.item() == pytest.approx(ref, rel=1e-5)
    assert torch.isfinite(torch.autograd.grad(got.total, s_logits)[0]).all()


def test_with_no_top_k_member_the_mixture_is_the_live_ensembles():
    """A full member beside a top-K member that covers the vocabulary (a server or cache with K >= V): the live
    ensemble's loss with the same per-token weights."""
    t, w = teachers()
    s_logits = torch.randn(1, N, V)
    labels = torch.randint(0, V, (1, N))
    exact = cache_format.top_k(t[1], V, T)[:3]
    mixed = mix([F.log_softmax(t[0] / T, -1), exact], w[:, :2] / w[:, :2].sum(1, keepdim=True), V)
    assert mixed[0].shape[1] == V and (mixed[0] >= 0).all() and torch.isinf(mixed[2]).all()
    kw = dict(loss="jsd", alpha=0.3, temperature=T)
    got = losses.sparse_loss_sums(s_logits, *mixed, labels, **kw)
    live = losses.loss_sums(
        s_logits,
        [t[0][None], t[1][None]],
        labels,
        teacher_weights=(w[:, :2] / w[:, :2].sum(1, keepdim=True))[None],
        **kw,
    )
    assert got.total.item() == pytest.approx(live.total.item(), rel=1e-5)


class Sparse:
    """The sparse member source of a MixedTeachers: fixed top-K parts (what a cache or server returns)."""

    def __init__(self, parts):
        self.parts = parts

    def targets(self, batch, split):
        return self.parts


@pytest.mark.parametrize("weights", ["fixed", "router"])
def test_mixed_teachers_chunked_equals_at_once_and_float64(weights):
    """``MixedTeachers.loss_sums`` from hidden states: a live teacher (a real head on hidden states) and two top-K
    members; chunks of 2 tokens (widths differ per chunk: padded) with one head call more than the tokens need
    (ZeRO-3's common count), and full logits, give the float64 reference and the same gradients."""
    torch.manual_seed(1)
    B, L = 2, 6
    labels = torch.randint(0, V, (B, L))
    labels[0, :2] = -100
    n = int((labels != -100).sum())
    t_head = torch.nn.Linear(H, V + 2)  # a padded teacher vocabulary: rows past V are ignored
    t_hidden = torch.randn(B, L, H)
    calls = []
    engine = SimpleNamespace(module=SimpleNamespace(head=lambda h: calls.append(h.shape[0]) or t_head(h)))
    with torch.no_grad():
        t_full = t_head(t_hidden.flatten(0, 1)[(labels != -100).flatten()])[:, :V]
    others = [torch.randn(n, V) * 3 for _ in range(2)]
    tops = [cache_format.top_k(x, k, 1.0)[:3] for x, k in zip(others, (3, 4))]
    source = MixedTeachers(LiveTeachers([engine]), Sparse(tops))
    s_head = torch.nn.Linear(H, V)
    s_hidden = torch.randn(B, L, H, requires_grad=True)
    w, w_tok = (LowestTeacherCE(), None) if weights == "router" else (torch.tensor([0.2, 0.5, 0.3]), None)
    if weights == "fixed":
        w_tok = torch.tensor([0.2, 0.5, 0.3]).expand(n, 3)
    kw = dict(loss="forward_kl", alpha=0.4, temperature=1.0, beta=0.5, skew=0.1, vocab_size=V, teacher_weights=w)
    chunked = source.loss_sums(s_hidden, s_head, ([t_hidden], tops), labels, chunk_size=2, num_chunks=6, **kw)
    assert n == 10 and calls == [2, 2, 2, 2, 2, 0]
    at_once = source.loss_sums(s_hidden, s_head, ([t_hidden], tops), labels, chunk_size=0, num_chunks=None, **kw)
    s_sup = s_head(s_hidden.flatten(0, 1)[(labels != -100).flatten()])
    if w_tok is None:  # the router's choice, from the members' distributions at temperature 1 (top-K: reconstructed)
        lab = labels[labels != -100]
        recon = [F.log_softmax(t_full, -1)]
        for ids, logp, tail in tops:
            r = (tail - torch.log(torch.tensor(V - ids.shape[1], dtype=torch.float32)))[:, None].expand(-1, V)
            recon.append(r.scatter(1, ids, logp))
        w_tok = LowestTeacherCE()(recon, lab)
        assert len(set(w_tok.argmax(1).tolist())) > 1, "the router must pick more than one member"
    ref = reference_kd(s_sup, [t_full], list(zip(others, (3, 4))), w_tok, "forward_kl", 1.0)
    for out in (chunked, at_once):
        assert out.kd.item() == pytest.approx(ref, rel=1e-5)
        assert out.n_tokens.item() == n
    g_chunked, g_once = (torch.autograd.grad(out.total, s_hidden)[0] for out in (chunked, at_once))
    assert torch.allclose(g_chunked, g_once, rtol=1e-5, atol=1e-7)


def test_a_mixed_ensemble_refuses_what_a_served_top_k_cannot_give_in_one_line(tiny, dist_env, capsys):
    """A live teacher beside a served one at --temperature 2 with top-K below the vocabulary: the live member could
    be rescaled, the served one cannot (its top-K at temperature 1 does not fix the tail): one line, exit 2, before
    any model loads or any server is asked."""
    args = ["--teacher", tiny["teacher"], "--teacher_url", "http://127.0.0.1:9", "--teacher_top_k", "16"]
    args += ["--student", tiny["student"], "--data", tiny["data"], "--output_dir", str(tiny["root"] / "refused")]
    args += ["--teacher_url_wait", "1"]  # if the refusal were missing: a quick "no server" error, not a 600 s wait
    code = train.main(args + ["--temperature", "2", "--seq_len", "32", "--max_steps", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "do not fix the tail at another temperature" in errors[0], errors
