"""Every loss against a float64 reference written from the definitions, plus the invariants the trainer relies on.

The reference (ref_terms below, on tests/helpers.py's ref_divergence) is deliberately plain (probabilities, not
log-probabilities; no special cases beyond the documented jsd endpoints) so that it shares no code or tricks with
``ds_distill.losses``. The library computes in fp32, hence rtol ~1e-5 on values.
"""

import itertools
import math
import weakref

import pytest
import torch

from ds_distill.common import IGNORE_INDEX
from ds_distill.losses import LOSSES, OutputHead, chunked_loss_sums, distillation_loss, loss_sums, teacher_logprobs
from tests.helpers import ref_divergence

KINDS = list(LOSSES)
B, T, V, H = 3, 5, 11, 8
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only spin against each other on a shared CPU (4x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- float64 reference
def ref_terms(student, teachers, labels, *, kind, alpha, temperature, beta=0.5, skew=0.1, weights=None):
    """Per-position (total, ce, T^2 D, mask) in float64. teachers: list of [B, T, V]; weights None, [K] or [B, T, K]."""
    s = student.double()
    k = len(teachers)
    w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    if w.dim() == 1:
        w = w / w.sum()
    pt = sum(w[..., i, None] * torch.softmax(t.double() / temperature, -1) for i, t in enumerate(teachers))
    ps = torch.softmax(s / temperature, -1)
    mask = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    ce = -torch.log_softmax(s, -1).gather(-1, safe[..., None])[..., 0]
    kd = temperature**2 * ref_divergence(kind, pt, ps, beta, skew)
    total = alpha * ce + (1 - alpha) * kd
    zero = torch.zeros_like(total)
    return torch.where(mask, total, zero), torch.where(mask, ce, zero), torch.where(mask, kd, zero), mask


def ref_mean(student, teachers, labels, **kw):
    total, _, _, mask = ref_terms(student, teachers, labels, **kw)
    return total.sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------- inputs
def make(seed, b=B, t=T, v=V, k=1, masked=0.3, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, t, v, generator=g)).requires_grad_()
    teachers = [scale * torch.randn(b, t, v, generator=g) for _ in range(k)]
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < masked] = IGNORE_INDEX
    labels[0, 0] = 1  # at least one supervised token
    return student, teachers, labels


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- values and gradients vs the reference
SETTINGS = [  # (temperature, alpha, beta, skew)
    (1.0, 0.5, 0.5, 0.1),
    (2.0, 0.0, 0.1, 0.0),
    (0.5, 0.3, 0.9, 0.5),
    (4.0, 0.9, 0.0, 1.0),
    (1.5, 0.0, 1.0, 0.9),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "T{}-a{}-b{}-s{}".format(*s))
def test_value_and_grad_match_float64_reference(kind, setting):
    temperature, alpha, beta, skew = setting
    student, teachers, labels = make(10 * KINDS.index(kind) + SETTINGS.index(setting))
    kw = dict(alpha=alpha, temperature=temperature, beta=beta, skew=skew)
    out = distillation_loss(student, teachers[0], labels, loss=kind, **kw)
    s64 = student.detach().double().requires_grad_()
    ref = ref_mean(s64, teachers, labels, kind=kind, **kw)
    close(out, ref)
    (g,) = torch.autograd.grad(out, student)
    (g_ref,) = torch.autograd.grad(ref, s64)
    close(g, g_ref, rtol=1e-4, atol=1e-6)

    sums = loss_sums(student, teachers, labels, loss=kind, **kw)
    total, ce, kd, mask = ref_terms(s64.detach(), teachers, labels, kind=kind, **kw)
    close(sums.total, total.sum())
    close(sums.ce, ce.sum())
    close(sums.kd, kd.sum())
    assert sums.n_tokens.item() == mask.sum().item()


# ---------------------------------------------------------------- exact values on a two-token vocabulary
# p_t = softmax([0, 0]) = [1/2, 1/2], p_s = softmax([0, ln 3]) = [1/4, 3/4]; the label is token 0, so CE = ln 4.
GOLDEN = {  # kind: D(p_t, p_s) in closed form, beta = 0.5, skew = 0.1
    "forward_kl": 0.5 * math.log(4 / 3),
    "reverse_kl": 0.25 * math.log(1 / 2) + 0.75 * math.log(3 / 2),
    "jsd": 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
    + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)),  # m = [3/8, 5/8]
    "skew_forward_kl": 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725),  # m = 0.1 p_t + 0.9 p_s
    "skew_reverse_kl": 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525),  # m = 0.1 p_s + 0.9 p_t
    "tvd": 0.25,
    # H(p_t) = ln 2, so w = ln 2 / 3 (the default threshold, 3 nats) on forward KL and 1 - w on reverse KL
    "entropy_aware_kl": math.log(2) / 3 * 0.5 * math.log(4 / 3)
    + (1 - math.log(2) / 3) * (0.25 * math.log(1 / 2) + 0.75 * math.log(3 / 2)),
}


@pytest.mark.parametrize("kind", KINDS)
def test_golden_values(kind):
    student = torch.tensor([[[0.0, math.log(3.0)]]])
    teacher = torch.tensor([[[0.0, 0.0]]])
    out = loss_sums(student, teacher, torch.tensor([[0]]), loss=kind, alpha=0.25, beta=0.5, skew=0.1)
    assert abs(out.ce.item() - math.log(4)) < 1e-6
    assert abs(out.kd.item() - GOLDEN[kind]) < 1e-6
    assert abs(out.total.item() - (0.25 * math.log(4) + 0.75 * GOLDEN[kind])) < 1e-6


# ---------------------------------------------------------------- invariants of the divergences
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_divergence_of_a_distribution_with_itself_is_zero(kind, temperature):
    student, _, labels = make(1)
    for beta, skew in [(0.5, 0.1), (0.0, 0.0), (1.0, 1.0), (0.3, 0.7)]:
        sums = loss_sums(
            student, student.detach(), labels, loss=kind, alpha=0.0, temperature=temperature, beta=beta, skew=skew
        )
        assert abs(sums.kd.item()) < 1e-5
        assert sums.kd_per_seq.abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_divergences_are_nonnegative_and_tvd_bounded(kind):
    # Far-apart distributions too (scale 20): near one-hot rows are where log-space tricks go wrong.
    for seed, scale in itertools.product(range(3), [0.5, 3.0, 20.0]):
        student, teachers, labels = make(seed, scale=scale, masked=0.0)
        for beta, skew in [(0.5, 0.1), (0.1, 0.9), (0.9, 0.5)]:
            sums = loss_sums(student, teachers, labels, loss=kind, alpha=0.0, beta=beta, skew=skew)
            assert (sums.kd_per_seq >= -1e-6).all()
            if kind == "tvd":
                per_token = sums.kd_per_seq / sums.tokens_per_seq
                assert (per_token <= 1 + 1e-6).all()
    # tvd reaches 1 on disjoint supports
    s = torch.tensor([[[30.0, -30.0]]])
    t = torch.tensor([[[-30.0, 30.0]]])
    assert abs(loss_sums(s, t, torch.tensor([[0]]), loss="tvd", alpha=0.0).kd.item() - 1.0) < 1e-6


def test_jsd_endpoints_are_exactly_the_two_kls():
    student, teachers, labels = make(2)
    kw = dict(alpha=0.0, temperature=2.0)
    fwd = loss_sums(student, teachers, labels, loss="forward_kl", **kw).total
    rev = loss_sums(student, teachers, labels, loss="reverse_kl", **kw).total
    assert torch.equal(loss_sums(student, teachers, labels, loss="jsd", beta=0.0, **kw).total, fwd)
    assert torch.equal(loss_sums(student, teachers, labels, loss="jsd", beta=1.0, **kw).total, rev)
    # the skewed KLs at skew = 0 are the plain ones
    assert torch.equal(loss_sums(student, teachers, labels, loss="skew_forward_kl", skew=0.0, **kw).total, fwd)
    assert torch.equal(loss_sums(student, teachers, labels, loss="skew_reverse_kl", skew=0.0, **kw).total, rev)


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_squared_scaling(kind):
    """kd is T^2 times the divergence between the temperature-softened distributions."""
    student, teachers, labels = make(3)
    for temperature in [0.5, 2.0, 5.0]:
        sums = loss_sums(student, teachers, labels, loss=kind, alpha=0.0, temperature=temperature)
        soft = loss_sums(student / temperature, [t / temperature for t in teachers], labels, loss=kind, alpha=0.0)
        close(sums.kd, temperature**2 * soft.kd)
        close(sums.total, sums.kd)  # alpha = 0: the CE is reported but not added


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_alpha_one_ignores_the_teacher(kind, temperature):
    """alpha = 1 is plain fine-tuning: CE on the *unscaled* student logits whatever the temperature."""
    student, teachers, labels = make(4)
    a = loss_sums(student, teachers, labels, loss=kind, alpha=1.0, temperature=temperature)
    b = loss_sums(student, [t * 7 + 3 for t in teachers], labels, loss=kind, alpha=1.0, temperature=temperature)
    c = loss_sums(student, [], labels, loss=kind, alpha=1.0, temperature=temperature)
    assert torch.equal(a.total, b.total) and torch.equal(a.total, c.total)
    ce = torch.nn.functional.cross_entropy(student.detach().flatten(0, 1), labels.flatten(), reduction="sum")
    close(a.total, ce)
    ga = torch.autograd.grad(a.total, student)[0]
    gb = torch.autograd.grad(b.total, student)[0]
    assert torch.equal(ga, gb)


# ---------------------------------------------------------------- masking
@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_contribute_nothing(kind):
    student, teachers, labels = make(5, masked=0.5)
    masked = (labels == IGNORE_INDEX)[..., None]
    assert masked.any()
    noise = 100 * torch.randn(student.shape)
    student2 = torch.where(masked, noise, student.detach()).requires_grad_()
    teachers2 = [torch.where(masked, -noise, t) for t in teachers]
    a = loss_sums(student, teachers, labels, loss=kind, alpha=0.4, temperature=2.0)
    b = loss_sums(student2, teachers2, labels, loss=kind, alpha=0.4, temperature=2.0)
    assert torch.equal(a.total, b.total)
    ga = torch.autograd.grad(a.total, student)[0]
    gb = torch.autograd.grad(b.total, student2)[0]
    assert torch.equal(ga, gb)
    assert (gb[masked.expand_as(gb)] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_is_a_finite_zero_with_zero_grads(kind):
    student, teachers, _ = make(6)
    labels = torch.full((B, T), IGNORE_INDEX)
    out = distillation_loss(student, teachers[0], labels, loss=kind)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, student)
    assert torch.equal(g, torch.zeros_like(g))
    sums = loss_sums(student, teachers, labels, loss=kind)
    assert sums.n_tokens.item() == 0 and sums.total.item() == 0.0
    assert torch.equal(sums.tokens_per_seq, torch.zeros(B, dtype=torch.int64))
    # chunked path, with and without (empty) head calls
    hidden = torch.randn(B, T, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    for num_chunks in [None, 2]:
        c = chunked_loss_sums(
            hidden, head, torch.randn(B, T, H), head, labels, loss=kind, chunk_size=4, num_chunks=num_chunks
        )
        assert c.total.item() == 0.0
        (gh,) = torch.autograd.grad(c.total, hidden)
        assert torch.equal(gh, torch.zeros_like(gh))


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_vocab_column_gives_no_nan(kind):
    """A masked vocabulary entry (-inf in both models) must not produce NaN in values or grads."""
    student, teachers, labels = make(7, masked=0.0)
    labels[labels == 3] = 0
    s = student.detach().clone()
    s[..., 3] = float("-inf")
    s.requires_grad_()
    ts = [t.clone() for t in teachers]
    for t in ts:
        t[..., 3] = float("-inf")
    kw = dict(alpha=0.3, temperature=2.0, beta=0.4, skew=0.2)
    out = distillation_loss(s, ts[0], labels, loss=kind, **kw)
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    assert (g[..., 3] == 0).all()
    keep = [i for i in range(V) if i != 3]
    sub = student.detach()[..., keep].requires_grad_()
    ref = distillation_loss(sub, teachers[0][..., keep], torch.where(labels > 3, labels - 1, labels), loss=kind, **kw)
    close(out, ref)
    close(g[..., keep], torch.autograd.grad(ref, sub)[0])


# ---------------------------------------------------------------- chunked == unchunked
def _chunk_setup(seed, k=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    t_hidden = [torch.randn(B, T, H + 2, generator=g) for _ in range(k)]
    t_heads = [torch.nn.Linear(H + 2, V, bias=False) for _ in range(k)]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE_INDEX
    labels[0, 0] = 2
    return hidden, head, t_hidden, t_heads, labels


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    hidden, head, t_hidden, t_heads, labels = _chunk_setup(8)
    n = int((labels != IGNORE_INDEX).sum())
    kw = dict(loss=kind, alpha=0.3, temperature=2.0, beta=0.3, skew=0.2)
    ref = loss_sums(head(hidden), [h(x) for h, x in zip(t_heads, t_hidden)], labels, **kw)
    g_ref = torch.autograd.grad(ref.total, [hidden, head.weight])
    for chunk_size, num_chunks in [(1, None), (3, None), (n + 5, None), (3, -(-n // 3) + 2), (n + 5, 3)]:
        out = chunked_loss_sums(
            hidden, head, t_hidden, t_heads, labels, chunk_size=chunk_size, num_chunks=num_chunks, **kw
        )
        close(out.total, ref.total)
        for f in ("ce", "kd", "ce_per_seq", "kd_per_seq"):
            close(getattr(out, f), getattr(ref, f))
        assert torch.equal(out.tokens_per_seq, ref.tokens_per_seq) and out.n_tokens.item() == n
        for a, b in zip(torch.autograd.grad(out.total, [hidden, head.weight]), g_ref):
            close(a, b)


def test_chunked_num_chunks_calls_the_head_exactly_that_many_times():
    hidden, head, t_hidden, t_heads, labels = _chunk_setup(9)
    calls = []
    counted = lambda h: (calls.append(h.shape[0]), head(h))[1]
    out = chunked_loss_sums(hidden, counted, t_hidden, t_heads, labels, chunk_size=1000, num_chunks=4)
    assert len(calls) == 4 and calls[1:] == [0, 0, 0]
    ref = chunked_loss_sums(hidden, head, t_hidden, t_heads, labels, chunk_size=1000)
    assert torch.equal(out.total, ref.total)


@pytest.mark.parametrize(
    "fused, seed, loss, mask_start, chunk_sizes",
    [
        (False, 10, "jsd", True, [1, 3, 100]),  # a plain callable head: the checkpointed path
        (True, 33, "forward_kl", False, [1, 5, 100]),  # an OutputHead over the tied nn.Linear: the fused path
    ],
)
def test_chunked_tied_head_shared_with_the_embedding(fused, seed, loss, mask_start, chunk_sizes):
    """The head weight is also the input embedding: its grad gets both uses, identically in both paths."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    if mask_start:
        labels[1, :2] = IGNORE_INDEX
    t_hidden = torch.randn(B, T, H, generator=g)
    t_head = torch.nn.Linear(H, V, bias=False)
    if fused:
        lin = torch.nn.Linear(H, V, bias=False)
        lin.weight = emb.weight
        full_head, head = lin, OutputHead(lin)
    else:
        full_head = head = lambda h: h @ emb.weight.T
    params = [emb.weight, proj.weight, proj.bias]
    kw = dict(loss=loss, alpha=0.5, temperature=1.5)

    def grads(chunk_size):
        hidden = torch.tanh(proj(emb(ids)))
        if chunk_size is None:
            out = loss_sums(full_head(hidden), t_head(t_hidden), labels, **kw)
        else:
            out = chunked_loss_sums(hidden, head, t_hidden, t_head, labels, chunk_size=chunk_size, **kw)
        return out.total, torch.autograd.grad(out.total, params)

    ref, g_ref = grads(None)
    for chunk_size in chunk_sizes:
        val, gs = grads(chunk_size)
        close(val, ref)
        for a, b in zip(gs, g_ref):
            close(a, b)


def test_sparse_tied_embedding_adds_into_the_heads_gradient():
    """``models.sparse_tied_embedding``: a tied student's embedding gradient is sparse and autograd adds it into the
    head's gradient, which the fused path wrote into ``weight.grad``: the same gradient as a float64 model's own
    loss, over two accumulated backwards, with no second dense [V, H] gradient made; a backward without the head
    still leaves a dense gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_distill import models

    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=2)
    cfg.num_key_value_heads, cfg.tie_word_embeddings = 2, True
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).float()
    ref = LlamaForCausalLM(cfg).double()
    ref.load_state_dict(lm.state_dict())
    module = models.HiddenStatesLM(lm)
    assert models.sparse_tied_embedding(module, 0, "cpu") and module.head.grad_into_weight
    weight = lm.get_input_embeddings().weight
    arrived = []  # what autograd hands the weight: only the embedding's rows, sparse
    weight.register_hook(lambda g: arrived.append((g.is_sparse, getattr(weight.grad, "data_ptr", lambda: None)())))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, V, (B, T), generator=g) for _ in range(2)]
    t_hidden, t_head = torch.randn(B, T, H, generator=g), torch.nn.Linear(H, V, bias=False)
    t_ref = t_hidden.double() @ t_head.weight.detach().double().T
    kw = dict(loss="forward_kl", alpha=0.5, temperature=1.0)
    for ids in batches:
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = IGNORE_INDEX
        out = chunked_loss_sums(module(input_ids=ids), module.head, t_hidden, t_head, labels, chunk_size=7, **kw)
        written = weight.grad.data_ptr() if weight.grad is not None else None
        out.total.backward()
        assert arrived[-1][0], "the embedding's gradient must arrive sparse"
        assert written is None or arrived[-1][1] == written == weight.grad.data_ptr(), "accumulated in place"
        r_out = loss_sums(ref(input_ids=ids).logits, t_ref, labels, **kw)
        r_out.total.backward()
    assert not weight.grad.is_sparse
    close(weight.grad, ref.get_input_embeddings().weight.grad.float())
    for (name, p), r in zip(lm.named_parameters(), ref.parameters()):
        close(p.grad, r.grad.float())
    weight.grad = None
    lm.get_input_embeddings()(batches[0]).sum().backward()  # the head takes no part: the sparse rows alone
    assert not weight.grad.is_sparse
    close(weight.grad, torch.zeros(V, H).index_add_(0, batches[0].flatten(), torch.ones(B * T, H)))


def test_sparse_tied_embedding_only_where_nothing_else_owns_the_gradient():
    """Not for ZeRO-2/3, CUDA, an untied or frozen embedding: nothing changes there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_distill import models

    def student(tie: bool, frozen: bool = False):
        cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=H, num_hidden_layers=1, num_attention_heads=2)
        cfg.num_key_value_heads, cfg.tie_word_embeddings = 2, tie
        lm = LlamaForCausalLM(cfg)
        lm.get_input_embeddings().weight.requires_grad_(not frozen)
        return models.HiddenStatesLM(lm)

    cases = [(student(True), 2, "cpu"), (student(True), 3, "cpu"), (student(True), 0, "cuda")]
    for module, stage, device in [*cases, (student(False), 0, "cpu"), (student(True, True), 0, "cpu")]:
        assert not models.sparse_tied_embedding(module, stage, device)
        assert not module.lm.get_input_embeddings().sparse and not module.head.grad_into_weight


# ---------------------------------------------------------------- errors and registry
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(loss="forward"), "loss"),
        (dict(loss="FORWARD_KL"), "loss"),
        (dict(loss="kl"), "loss"),
        (dict(loss="forward_kl "), "loss"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(beta=-0.01), "beta"),
        (dict(beta=1.01), "beta"),
        (dict(skew=-1.0), "skew"),
        (dict(skew=2.0), "skew"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(alpha=math.nan), "alpha"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, word):
    student, teachers, labels = make(11)
    for call in (
        lambda: distillation_loss(student, teachers[0], labels, **kwargs),
        lambda: loss_sums(student, teachers, labels, **kwargs),
        lambda: chunked_loss_sums(
            torch.randn(B, T, H), torch.nn.Linear(H, V), torch.randn(B, T, H), torch.nn.Linear(H, V), labels, **kwargs
        ),
    ):
        with pytest.raises(ValueError, match=word):
            call()


def test_mismatched_shapes_raise_naming_the_argument():
    student, teachers, labels = make(12)
    with pytest.raises(ValueError, match="labels"):
        loss_sums(student, teachers, labels[:, :-1])
    with pytest.raises(ValueError, match="teacher"):
        loss_sums(student, [teachers[0][:, :-1]], labels)
    with pytest.raises(ValueError, match="vocab_size"):
        loss_sums(student, [teachers[0][..., :-1]], labels)
    with pytest.raises(ValueError, match="student_logits"):
        distillation_loss(student, teachers[0][..., :-1], labels)
    with pytest.raises(ValueError, match="teacher"):
        loss_sums(student, [], labels, alpha=0.5)
    hidden, head = torch.randn(B, T, H), torch.nn.Linear(H, V)
    with pytest.raises(ValueError, match="labels"):
        chunked_loss_sums(hidden, head, hidden, head, labels[:-1])
    with pytest.raises(ValueError, match="heads"):
        chunked_loss_sums(hidden, head, [hidden, hidden], [head], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss_sums(hidden, head, hidden, head, labels, chunk_size=0)
    with pytest.raises(ValueError, match="num_chunks"):
        chunked_loss_sums(hidden, head, hidden, head, labels, chunk_size=1, num_chunks=1)


def test_vocab_mismatches_raise_instead_of_truncating():
    """A vocabulary mismatch must be explicit (vocab_size) in both paths; the chunked one used to cut the teacher."""
    student, teachers, labels = make(19)
    for bad in (0, V + 1):
        with pytest.raises(ValueError, match="vocab_size"):
            loss_sums(student, teachers, labels, vocab_size=bad)
    hidden, head, t_hidden, _, labels = _chunk_setup(19)
    wide_teacher = torch.nn.Linear(H + 2, V + 4, bias=False)
    with pytest.raises(ValueError, match="vocab_size"):  # no vocab_size: the vocabularies must agree
        chunked_loss_sums(hidden, head, t_hidden, wide_teacher, labels)
    with pytest.raises(ValueError, match="vocab_size"):  # larger than the student's
        chunked_loss_sums(hidden, head, t_hidden, wide_teacher, labels, vocab_size=V + 2)
    with pytest.raises(ValueError, match="logits"):
        loss_sums(student[0], teachers[0][0], labels[0])


@pytest.mark.parametrize(
    "weights",
    [
        [1.0],  # one weight for two teachers would broadcast into a "mixture" that sums to 2
        [1.0, 1.0, 1.0],
        [1.0, -0.5],
        [0.0, 0.0],
        [math.nan, 1.0],
        torch.ones(B, T),
        torch.ones(B, T, 3),
        torch.ones(B, T - 1, 2),
    ],
    ids=["K1", "K3", "negative", "zero-sum", "nan", "2d", "BTK3", "B(T-1)K"],
)
def test_bad_teacher_weights_raise(weights):
    student, teachers, labels = make(20, k=2)
    with pytest.raises(ValueError, match="teacher_weights"):
        loss_sums(student, teachers, labels, teacher_weights=weights)
    hidden, head, t_hidden, t_heads, labels = _chunk_setup(20, k=2)
    with pytest.raises(ValueError, match="teacher_weights"):
        chunked_loss_sums(hidden, head, t_hidden, t_heads, labels, teacher_weights=weights)


def test_registry_is_exactly_the_seven_kinds():
    assert set(LOSSES) == {
        "forward_kl",
        "reverse_kl",
        "jsd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "tvd",
        "entropy_aware_kl",
    }


# ---------------------------------------------------------------- vocab padding, ensembles, per-sequence sums
@pytest.mark.parametrize("kind", KINDS)
def test_vocab_size_equals_slicing_by_hand(kind):
    student, teachers, labels = make(13, v=V + 5)
    labels = labels.clamp(max=V - 1)
    padded_teacher = torch.cat([teachers[0], torch.randn(B, T, 3)], dim=-1)  # the teacher is padded differently
    out = loss_sums(student, padded_teacher, labels, loss=kind, vocab_size=V, temperature=2.0)
    ref = loss_sums(student[..., :V], teachers[0][..., :V], labels, loss=kind, temperature=2.0)
    assert torch.equal(out.total, ref.total)
    g = torch.autograd.grad(out.total, student)[0]
    assert torch.equal(g[..., :V], torch.autograd.grad(ref.total, student)[0][..., :V])
    assert (g[..., V:] == 0).all()
    # chunked too: heads with padded outputs
    hidden, head, t_hidden, _, labels2 = _chunk_setup(13)
    big_head, t_head = torch.nn.Linear(H, V + 5, bias=False), torch.nn.Linear(H + 2, V + 3, bias=False)
    c = chunked_loss_sums(hidden, big_head, t_hidden, t_head, labels2, loss=kind, vocab_size=V, chunk_size=2)
    r = loss_sums(big_head(hidden)[..., :V], t_head(t_hidden[0])[..., :V], labels2, loss=kind)
    close(c.total, r.total)


@pytest.mark.parametrize("kind", KINDS)
def test_two_teacher_mixture_matches_hand_computed(kind):
    student, teachers, labels = make(14, k=2)
    hp = dict(alpha=0.2, temperature=1.5, beta=0.3, skew=0.4)
    kw = dict(loss=kind, **hp)
    for weights in [None, [1.0, 3.0], torch.tensor([0.5, 0.5])]:
        out = loss_sums(student, teachers, labels, teacher_weights=weights, **kw)
        total, _, _, _ = ref_terms(student.detach(), teachers, labels, weights=weights, kind=kind, **hp)
        close(out.total, total.sum())
    # per-token weights [B, T, K]
    g = torch.Generator().manual_seed(0)
    per_token = torch.softmax(torch.randn(B, T, 2, generator=g), -1)
    out = loss_sums(student, teachers, labels, teacher_weights=per_token, **kw)
    s64 = student.detach().double().requires_grad_()
    total, _, _, _ = ref_terms(s64, teachers, labels, weights=per_token, kind=kind, **hp)
    close(out.total, total.sum())
    close(torch.autograd.grad(out.total, student)[0], torch.autograd.grad(total.sum(), s64)[0], rtol=1e-4)
    # and the chunked path with per-token weights
    hidden, head, t_hidden, t_heads, labels2 = _chunk_setup(14, k=2)
    pt = torch.softmax(torch.randn(B, T, 2, generator=g), -1)
    c = chunked_loss_sums(hidden, head, t_hidden, t_heads, labels2, chunk_size=2, teacher_weights=pt, **kw)
    r = loss_sums(head(hidden), [h(x) for h, x in zip(t_heads, t_hidden)], labels2, teacher_weights=pt, **kw)
    close(c.total, r.total)


def test_one_teacher_ensemble_equals_single_teacher():
    student, teachers, labels = make(15)
    single = loss_sums(student, teachers[0], labels, alpha=0.0, temperature=2.0)
    for weights in [None, [1.0], torch.ones(B, T, 1)]:
        close(
            loss_sums(student, teachers, labels, alpha=0.0, temperature=2.0, teacher_weights=weights).total,
            single.total,
        )
    lp = teacher_logprobs(teachers, 2.0, torch.tensor([2.0]))
    close(lp, torch.log_softmax(teachers[0] / 2.0, -1))


def test_per_sequence_sums_add_up():
    student, teachers, labels = make(16, masked=0.5)
    labels[2] = IGNORE_INDEX  # a row with nothing to score
    out = loss_sums(student, teachers, labels, loss="jsd", alpha=0.4)
    assert torch.equal(out.tokens_per_seq, (labels != IGNORE_INDEX).sum(1))
    assert out.tokens_per_seq.sum() == out.n_tokens
    close(out.ce_per_seq.sum(), out.ce)
    close(out.kd_per_seq.sum(), out.kd)
    close(0.4 * out.ce + 0.6 * out.kd, out.total)
    assert out.ce_per_seq[2] == 0 and out.kd_per_seq[2] == 0
    _, ce, kd, _ = ref_terms(student.detach(), teachers, labels, kind="jsd", alpha=0.4, temperature=1.0)
    close(out.ce_per_seq, ce.sum(1))
    close(out.kd_per_seq, kd.sum(1))


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs(kind):
    student, teachers, labels = make(17)
    kw = dict(loss=kind, alpha=0.5, temperature=2.0)
    s16 = student.detach().bfloat16().requires_grad_()
    t16 = teachers[0].bfloat16()
    out = distillation_loss(s16, t16, labels, **kw)
    assert out.dtype == torch.float32
    (g,) = torch.autograd.grad(out, s16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
    # internally fp32: exactly the fp32 loss of the rounded inputs, and close to the unrounded one
    close(out, distillation_loss(s16.detach().float(), t16.float(), labels, **kw))
    close(out, distillation_loss(student, teachers[0], labels, **kw), rtol=2e-2, atol=1e-2)


# ---------------------------------------------------------------- normalisation by the global token count
def test_sum_over_global_count_equals_the_concatenated_batch():
    """Micro-batches with different numbers of supervised tokens: sums / global count is the big-batch loss."""
    student, teachers, labels = make(18, b=4, masked=0.0)
    labels[:2, 1:] = IGNORE_INDEX  # micro-batch 1: 2 tokens; micro-batch 2: 10 tokens
    kw = dict(loss="forward_kl", alpha=0.3, temperature=2.0)
    a = loss_sums(student[:2], [teachers[0][:2]], labels[:2], **kw)
    b = loss_sums(student[2:], [teachers[0][2:]], labels[2:], **kw)
    whole = distillation_loss(student, teachers[0], labels, **kw)
    assert (a.n_tokens.item(), b.n_tokens.item()) == (2, 10)
    close((a.total + b.total) / (a.n_tokens + b.n_tokens), whole)
    mean_of_means = (a.total / a.n_tokens + b.total / b.n_tokens) / 2
    assert not torch.allclose(mean_of_means, whole, rtol=1e-3)


# ---------------------------------------------------------------- the fused path (gradient in the forward)
def softcap(z):
    return 3.0 * torch.tanh(z / 3.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["linear", "bias", "softcap_padded"])
def test_fused_matches_float64_reference(kind, variant):
    """OutputHead over an nn.Linear (fused path): values and grads of hidden, weight and bias against float64."""
    g = torch.Generator().manual_seed(30)
    pad = 3 if variant == "softcap_padded" else 0
    lin = torch.nn.Linear(H, V + pad, bias=variant == "bias")
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V + pad, H, generator=g))
        if lin.bias is not None:
            lin.bias.copy_(torch.randn(V + pad, generator=g))
    head = OutputHead(lin, softcap if variant == "softcap_padded" else None)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    t_hidden, t_head = torch.randn(B, T, H + 2, generator=g), torch.nn.Linear(H + 2, V + pad)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE_INDEX
    labels[0, 0] = 2
    n = int((labels != IGNORE_INDEX).sum())
    hp = dict(alpha=0.3, temperature=2.0, beta=0.3, skew=0.2)
    params = [hidden, lin.weight] + ([lin.bias] if lin.bias is not None else [])
    p64 = [p.detach().double().requires_grad_() for p in params]
    z64 = torch.nn.functional.linear(p64[0], p64[1], p64[2] if len(p64) > 2 else None)
    z64 = z64 if head.transform is None else head.transform(z64)
    t64 = torch.nn.functional.linear(t_hidden.double(), t_head.weight.double(), t_head.bias.double()).detach()
    total64, ce64, kd64, _ = ref_terms(z64[..., :V], [t64[..., :V]], labels, kind=kind, **hp)
    g64 = torch.autograd.grad(total64.sum(), p64)
    for chunk_size, num_chunks in [(1, None), (4, None), (n + 5, None), (4, -(-n // 4) + 2)]:
        out = chunked_loss_sums(
            hidden,
            head,
            t_hidden,
            t_head,
            labels,
            chunk_size=chunk_size,
            num_chunks=num_chunks,
            vocab_size=V,
            loss=kind,
            **hp,
        )
        close(out.total, total64.sum())
        close(out.ce_per_seq, ce64.sum(1))
        close(out.kd_per_seq, kd64.sum(1))
        for a, b in zip(torch.autograd.grad(out.total, params), g64):
            close(a, b, rtol=1e-4, atol=1e-5)


class _VocabMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matrix products with a vocabulary-sized (V) operand or result: the heads' work, forward and backward."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            shapes = [a.shape for a in args if isinstance(a, torch.Tensor)] + [out.shape]
            self.count += any(V in s for s in shapes)
        return out


def test_fused_runs_each_head_once_per_chunk_and_equals_checkpointed():
    """Per non-empty chunk the fused path does 4 head-sized matmuls (teacher head, student head, dL/dh, dL/dW), as
    full logits do; the checkpointed path 6 (both heads again in backward). Same values and gradients."""
    hidden, lin, t_hidden, t_heads, labels = _chunk_setup(31)
    k = -(-int((labels != IGNORE_INDEX).sum()) // 4)  # non-empty chunks; one empty chunk follows
    kw = dict(loss="jsd", alpha=0.4, temperature=1.5, chunk_size=4, num_chunks=k + 1)
    results = {}
    for name, head in (("fused", OutputHead(lin)), ("checkpointed", lin)):
        with _VocabMatmuls() as counter:
            out = chunked_loss_sums(hidden, head, t_hidden, t_heads, labels, **kw)
            grads = torch.autograd.grad(out.total, [hidden, lin.weight])
        results[name] = (out, grads, counter.count)
    (f, fg, f_mm), (c, cg, c_mm) = results["fused"], results["checkpointed"]
    assert (f_mm, c_mm) == (4 * k + 1, 6 * (k + 1))  # the empty chunk: the teacher head's (collective) call only
    close(f.total, c.total)
    close(f.kd_per_seq, c.kd_per_seq)
    for a, b in zip(fg, cg):
        close(a, b)


@pytest.mark.parametrize("weights", ["per_token", "router"])
def test_fused_ensemble_equals_checkpointed(weights):
    from ds_distill.losses.routing import LowestTeacherCE

    hidden, lin, t_hidden, t_heads, labels = _chunk_setup(32, k=2)
    w = (
        torch.softmax(torch.randn(B, T, 2, generator=torch.Generator().manual_seed(0)), -1)
        if weights == "per_token"
        else LowestTeacherCE()
    )
    kw = dict(loss="skew_reverse_kl", alpha=0.2, temperature=2.0, skew=0.3, chunk_size=2, teacher_weights=w)
    f = chunked_loss_sums(hidden, OutputHead(lin), t_hidden, t_heads, labels, **kw)
    c = chunked_loss_sums(hidden, lin, t_hidden, t_heads, labels, **kw)
    close(f.total, c.total)
    close(f.kd_per_seq, c.kd_per_seq)
    for a, b in zip(
        torch.autograd.grad(f.total, [hidden, lin.weight]), torch.autograd.grad(c.total, [hidden, lin.weight])
    ):
        close(a, b)


def test_fused_all_masked_no_grad_and_logged_once(caplog):
    hidden, lin, t_hidden, t_heads, labels = _chunk_setup(34)
    head = OutputHead(lin)
    masked = torch.full((B, T), IGNORE_INDEX)
    for num_chunks in [None, 2]:
        out = chunked_loss_sums(hidden, head, t_hidden, t_heads, masked, chunk_size=4, num_chunks=num_chunks)
        assert out.total.item() == 0.0 and out.n_tokens.item() == 0
        for gr in torch.autograd.grad(out.total, [hidden, lin.weight]):
            assert torch.equal(gr, torch.zeros_like(gr))
    ref = chunked_loss_sums(hidden, head, t_hidden, t_heads, labels, chunk_size=4)
    with torch.no_grad():  # evaluation: values only
        out = chunked_loss_sums(hidden, head, t_hidden, t_heads, labels, chunk_size=4)
    assert not out.total.requires_grad and torch.equal(out.total, ref.total.detach())
    import ds_distill.losses.chunked as losses_mod

    losses_mod._LOGGED.clear()
    with caplog.at_level("INFO", logger="ds_distill.losses"):
        for h in (head, head, lin, lin):
            chunked_loss_sums(hidden, h, t_hidden, t_heads, labels, chunk_size=4)
    lines = [r.getMessage() for r in caplog.records if r.name == "ds_distill.losses"]
    assert len(lines) == 2 and "fused" in lines[0] and "checkpointed" in lines[1] and "Linear" in lines[1]


def test_fused_loop_runs_inside_one_head_module_call():
    """ZeRO-3's contract (its hooks gather a weight only around its module's call, and again in backward from that
    call's output): the fused loop runs as one call of the head module, whose hooks see the hidden states going in
    and the loss total coming out, the total that backward enters; the module's own forward is restored after."""
    hidden, lin, t_hidden, t_heads, labels = _chunk_setup(35)
    seen = []
    lin.register_forward_pre_hook(lambda m, args: seen.append(("pre", args[0].shape)))
    lin.register_forward_hook(lambda m, args, out: seen.append(("post", out)))
    out = chunked_loss_sums(hidden, OutputHead(lin), t_hidden, t_heads, labels, chunk_size=4, num_chunks=9)
    n = int((labels != IGNORE_INDEX).sum())
    assert seen == [("pre", (n, H)), ("post", out.total)]
    assert "forward" not in lin.__dict__ and lin(hidden[0]).shape == (T, V)


def _small_head_case(n_supervised: int, seed: int = 40):
    """A fused head V=64, H=32 (with bias) over 2 x 8 positions, the first ``n_supervised`` of them supervised."""
    g = torch.Generator().manual_seed(seed)
    v, h = 64, 32
    hidden = torch.randn(2, 8, h, generator=g, requires_grad=True)
    lin, t_head = torch.nn.Linear(h, v), torch.nn.Linear(h, v)
    t_hidden = torch.randn(2, 8, h, generator=g)
    labels = torch.randint(0, v, (2, 8), generator=g)
    labels.view(-1)[n_supervised:] = IGNORE_INDEX
    return hidden, lin, t_hidden, t_head, labels


class _LiveVocabWide(torch.utils._python_dispatch.TorchDispatchMode):
    """At each product dL/dh = g_z @ W (a [c, V] operand times the [V, H] weight): how many distinct storages of
    [*, V] float tensors made so far are still alive (weak references: autograd's saved tensors count as alive)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.refs, self.alive = weight, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        v, h = self.weight.shape
        if func.overloadpacket is torch.ops.aten.mm and args[1].shape == (v, h) and args[0].shape[-1] == v:
            live = {t.untyped_storage().data_ptr() for t in (r() for r in self.refs) if t is not None}
            self.alive.append(len(live))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == v and t.is_floating_point():
                self.refs.append(weakref.ref(t))
        return out


def test_fused_chunk_lets_go_of_its_logits_before_the_head_products():
    """When a chunk's head products are made (dL/dh, dL/dW: the [c, H] and [V, H] results), its student and teacher
    logits and the graph of its terms are gone: g_z is the only [c, V] tensor alive. And once the loss has returned
    it holds nothing vocabulary-wide until backward (no g_z kept by a graph of dL/dh): only the [V, H] weight
    gradient, which autograd needs. The values and gradients are those of the float64 tests above."""
    hidden, lin, t_hidden, t_head, labels = _small_head_case(16)  # 4 chunks of 4 supervised tokens
    with _LiveVocabWide(lin.weight) as probe:
        out = chunked_loss_sums(hidden, OutputHead(lin), t_hidden, t_head, labels, chunk_size=4)
    assert probe.alive == [1, 1, 1, 1], probe.alive
    assert [r() for r in probe.refs if r() is not None] == []
    held = [t.shape for t in out.total.grad_fn.saved_tensors]  # _GradInForward's: dL/dh, dL/dW, dL/db
    assert held == [(16, 32), (64, 32), (64,)]


class _PeakVocabWide(torch.utils._python_dispatch.TorchDispatchMode):
    """The most distinct storages of float tensors shaped ``shape`` made inside the block and alive at once."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.refs, self.peak = tuple(shape), [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape and t.is_floating_point():
                self.refs.append(weakref.ref(t))
        live = {t.untyped_storage().data_ptr() for t in (r() for r in self.refs) if t is not None}
        self.peak = max(self.peak, len(live))
        return out


@pytest.mark.parametrize("grad_of", ["q", "p", "both"])
def test_kl_works_in_place_with_the_same_bits(grad_of):
    """``divergences.kl`` holds two [N, V] float tensors at once (p and one difference, masked and scaled in place)
    where ``(p * (logp - logq).masked_fill(p == 0, 0)).sum(-1)`` holds three, when only q needs a gradient (the
    distillation case: the teacher is p); when p needs one, autograd keeps the difference's old values (three, as
    before). Values and gradients are the same bits, with -inf entries (0 * log 0)."""
    from ds_distill.losses.divergences import kl

    g = torch.Generator().manual_seed(41)
    logp = torch.log_softmax(torch.randn(6, 50, generator=g), -1).masked_fill(
        torch.rand(6, 50, generator=g) < 0.2, -math.inf
    )
    logq = torch.log_softmax(torch.randn(6, 50, generator=g), -1)
    inputs = [logp.requires_grad_(grad_of in ("p", "both")), logq.requires_grad_(grad_of in ("q", "both"))]
    wanted = [t for t in inputs if t.requires_grad]
    with _PeakVocabWide(logp.shape) as probe:
        value = kl(*inputs)
    assert probe.peak == (2 if grad_of == "q" else 3)
    ref = (inputs[0].exp() * (inputs[0] - inputs[1]).masked_fill(inputs[0].exp() == 0, 0.0)).sum(-1)
    assert torch.equal(value, ref)
    weights = torch.rand(6, generator=g)
    for a, b in zip(torch.autograd.grad(value, wanted, weights), torch.autograd.grad(ref, wanted, weights)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [True, False])
def test_the_teachers_chunk_logits_are_freed_before_the_divergence(fused, monkeypatch):
    """Per chunk, the teacher's [c, V] logits are gone by the time the divergence runs (``token_terms`` empties its
    list once the log-probabilities are made, and the chunk loop holds no other reference), in the fused and the
    checkpointed path."""
    from ds_distill.losses import divergences

    hidden, lin, t_hidden, t_head, labels = _small_head_case(16)
    made, alive_at_kl = [], []

    def teacher_head(x):
        z = t_head(x)
        made.append(weakref.ref(z))
        return z

    def kl(logp, logq):
        alive_at_kl.append(sum(r() is not None for r in made))
        return real_kl(logp, logq)

    real_kl = divergences.kl
    monkeypatch.setattr(divergences, "kl", kl)
    head = OutputHead(lin) if fused else (lambda h: lin(h))
    # reverse KL: forward KL's fused path does not call kl (test_fused_forward_kl_holds_three_chunk_tensors)
    out = chunked_loss_sums(hidden, head, t_hidden, teacher_head, labels, chunk_size=4, loss="reverse_kl")
    assert alive_at_kl == [0, 0, 0, 0] and len(made) == 4
    assert torch.isfinite(out.total)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_forward_kl_terms_and_grad_matches_float64_autograd(temperature, alpha):
    """``terms.forward_kl_terms_and_grad``: CE, T^2 KL(p_T || q_T) and dL/dz by their formulas against float64
    autograd through log_softmax, with teacher entries of probability 0 (0 log 0 = 0) and a teacher of another
    scale; the teacher's list is emptied and z becomes dL/dz."""
    from ds_distill.losses.terms import forward_kl_terms_and_grad

    g = torch.Generator().manual_seed(50)
    n, v = 7, 40
    z = 3.0 * torch.randn(n, v, generator=g)
    t = 5.0 * torch.randn(n, v, generator=g)
    t[torch.rand(n, v, generator=g) < 0.25] = -math.inf  # p_T = 0 there
    labels = torch.randint(0, v, (n,), generator=g)
    z64 = z.double().requires_grad_()
    logq1 = torch.log_softmax(z64, -1)
    ce64 = -logq1.gather(1, labels[:, None]).squeeze(1)
    logp, logq = torch.log_softmax(t.double() / temperature, -1), torch.log_softmax(z64 / temperature, -1)
    p = logp.exp()
    kd64 = temperature**2 * torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
    (g64,) = torch.autograd.grad((alpha * ce64 + (1 - alpha) * kd64).sum(), z64)
    teacher = [t.clone()]
    zz = z.clone()
    ce, kd, dz = forward_kl_terms_and_grad(zz, teacher, labels, alpha, temperature)
    assert teacher == [] and dz.data_ptr() == zz.data_ptr() and dz.dtype == torch.float32
    torch.testing.assert_close(ce, ce64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, kd64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz, g64.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        forward_kl_terms_and_grad(z.double(), [t.clone()], labels, alpha, temperature)


def test_fused_forward_kl_holds_three_chunk_tensors():
    """The fused forward KL (one teacher, the whole vocabulary) makes dL/dz by its formula: at most three [c, V] fp32
    tensors alive at once per chunk, where autograd's path (``jsd`` at beta 0, the same divergence) holds more; the
    same values and gradients."""
    hidden, lin, t_hidden, t_head, labels = _small_head_case(16)  # 4 chunks of 4 supervised tokens
    kw = dict(chunk_size=4, alpha=0.4, temperature=1.5)
    results = {}
    for loss, extra in (("forward_kl", {}), ("jsd", {"beta": 0.0})):
        with _PeakVocabWide((4, 64)) as probe:
            out = chunked_loss_sums(hidden, OutputHead(lin), t_hidden, t_head, labels, loss=loss, **extra, **kw)
        grads = torch.autograd.grad(out.total, [hidden, lin.weight, lin.bias])
        results[loss] = (probe.peak, out, grads)
    (peak, out, grads), (ref_peak, ref, ref_grads) = results["forward_kl"], results["jsd"]
    assert peak <= 3 < ref_peak, (peak, ref_peak)
    close(out.total, ref.total)
    close(out.ce_per_seq, ref.ce_per_seq)
    close(out.kd_per_seq, ref.kd_per_seq)
    for a, b in zip(grads, ref_grads):
        close(a, b)


# ---------------------------------------------------------------- the entropy-aware mixture (entropy_aware_kl)
def _logps64(seed, n=6, v=V):
    g = torch.Generator().manual_seed(seed)
    t = torch.log_softmax(3.0 * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    s = torch.log_softmax(3.0 * torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    return t, s


def test_entropy_aware_kl_limits_are_the_plain_divergences_in_float64():
    """h = 0 is forward KL and h = inf reverse KL, bit for bit; and the mixture itself (no special case) reaches them:
    a threshold below every row's entropy gives w = 1 exactly, a huge one w ~ 0."""
    t, s = _logps64(0)
    kw = dict(beta=0.5, skew=0.1)
    ea, fwd, rev = LOSSES["entropy_aware_kl"], LOSSES["forward_kl"](t, s, **kw), LOSSES["reverse_kl"](t, s, **kw)
    assert torch.equal(ea(t, s, entropy_threshold=0.0, **kw), fwd)
    assert torch.equal(ea(t, s, entropy_threshold=math.inf, **kw), rev)
    tiny = 0.5 * float((-(t.exp() * t).sum(-1)).min())  # below every row's entropy: w = 1 by the formula itself
    assert torch.equal(ea(t, s, entropy_threshold=tiny, **kw), fwd)
    torch.testing.assert_close(ea(t, s, entropy_threshold=1e12, **kw), rev, rtol=1e-10, atol=0)
    assert not torch.allclose(fwd, rev)  # the two limits differ on these rows


@pytest.mark.parametrize("threshold", [0.3, 1.0, 2.5, 40.0])
def test_entropy_aware_kl_matches_float64_reference_per_token(threshold):
    """Rows from near one-hot to uniform: each token's weight on forward KL is min(H(p_t) / h, 1)."""
    from tests.helpers import ref_entropy, ref_kl

    t, s = _logps64(1)
    t[0] = torch.log_softmax(torch.zeros(V, dtype=torch.float64), -1)  # uniform teacher: H = ln 11 = 2.4 nats
    t[1] = torch.log_softmax(torch.tensor([30.0] + [0.0] * (V - 1), dtype=torch.float64), -1)  # near one-hot
    got = LOSSES["entropy_aware_kl"](t, s, beta=0.5, skew=0.1, entropy_threshold=threshold)
    pt, ps = t.exp(), s.exp()
    ref = ref_divergence("entropy_aware_kl", pt, ps, 0.5, 0.1, entropy_threshold=threshold)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    w = (ref_entropy(pt) / threshold).clamp(max=1.0)
    assert w[1] < 1e-9  # the confident teacher's token is (almost) all reverse KL
    torch.testing.assert_close(got[1], ref_kl(ps[1], pt[1]), rtol=1e-6, atol=1e-9)
    if threshold <= math.log(V):  # the uniform teacher's token is all forward KL
        torch.testing.assert_close(got[0], ref_kl(pt[0], ps[0]), rtol=1e-12, atol=0)


def test_entropy_aware_kl_through_the_dense_and_chunked_losses():
    """A non-default threshold reaches the divergence through loss_sums and chunked_loss_sums (fused and checkpointed
    paths): values and gradients equal the float64 reference; the weight carries no gradient."""
    kw = dict(loss="entropy_aware_kl", alpha=0.3, temperature=2.0, entropy_threshold=0.7)
    student, teachers, labels = make(41)
    s64 = student.detach().double().requires_grad_()
    ref_total, _, ref_kd, _ = ref_terms(s64, teachers, labels, kind="entropy_aware_kl", alpha=0.3, temperature=2.0)
    out = loss_sums(student, teachers, labels, **kw)
    # the reference above used the default threshold (3 nats): redo it at 0.7
    total, _, kd, _ = _ref_terms_at(s64, teachers, labels, 0.7, alpha=0.3, temperature=2.0)
    close(out.kd, kd.sum())
    close(torch.autograd.grad(out.total, student)[0], torch.autograd.grad(total.sum(), s64)[0], rtol=1e-4)
    assert not torch.allclose(kd.sum(), ref_kd.sum())  # the threshold changed the value: it was passed through
    hidden, head, t_hidden, t_heads, labels = _chunk_setup(42)
    full = loss_sums(head(hidden), [h(x) for h, x in zip(t_heads, t_hidden)], labels, **kw)
    g_full = torch.autograd.grad(full.total, [hidden, head.weight])
    for h in (head, OutputHead(head)):  # checkpointed, then fused
        out = chunked_loss_sums(hidden, h, t_hidden, t_heads, labels, chunk_size=3, **kw)
        close(out.total, full.total)
        for a, b in zip(torch.autograd.grad(out.total, [hidden, head.weight]), g_full):
            close(a, b)


def _ref_terms_at(student, teachers, labels, threshold, *, alpha, temperature):
    """ref_terms with entropy_aware_kl at ``threshold`` nats (float64)."""
    s = student.double()
    pt = torch.softmax(teachers[0].double() / temperature, -1)
    ps = torch.softmax(s / temperature, -1)
    mask = labels != IGNORE_INDEX
    ce = -torch.log_softmax(s, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    kd = temperature**2 * ref_divergence("entropy_aware_kl", pt, ps, 0.5, 0.1, entropy_threshold=threshold)
    zero = torch.zeros_like(ce)
    total = torch.where(mask, alpha * ce + (1 - alpha) * kd, zero)
    return total, torch.where(mask, ce, zero), torch.where(mask, kd, zero), mask


def test_entropy_threshold_is_checked():
    student, teachers, labels = make(43)
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="entropy_threshold"):
            loss_sums(student, teachers, labels, loss="entropy_aware_kl", entropy_threshold=bad)
