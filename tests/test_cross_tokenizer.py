"""Cross-tokenizer losses (ds_distill.losses.cross_tokenizer) in float64.

Identity: with one tokenizer on both sides every chunk is one token, and
  - vocab_map with every token mapped is today's loss (``loss_sums``), values and gradients;
  - ALM is the binarised loss of the label: ``sparse_loss_sums`` with the label as the only top-K id (and a float64
    reference written from probabilities).
Chain rule: a teacher whose tokenizer splits every student token into two byte pieces, its probabilities defined by
the chain rule from a known model: its chunk likelihoods are that model's, and ALM's gradient is zero at it.
"""

import itertools
import math

import pytest
import torch

from ds_distill.common import IGNORE_INDEX
from ds_distill.losses import (
    LOSSES,
    OutputHead,
    alm_loss_sums,
    chunked_alm_loss_sums,
    chunked_vocab_map_loss_sums,
    loss_sums,
    sparse_loss_sums,
    teacher_chunk_logprobs,
    vocab_map_loss_sums,
)
from tests.helpers import ref_divergence

KINDS = list(LOSSES)
B, T, V, H = 3, 6, 13, 8
KW = dict(beta=0.3, skew=0.2)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX  # a prompt
    labels[1, -1] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a row with nothing supervised
    labels[2, 3] = 5
    return s, t, labels


def one_token_chunks(labels):
    """Same tokenizer: chunk c = the c-th supervised position."""
    ch = torch.full_like(labels, -1)
    sup = labels != IGNORE_INDEX
    ch[sup] = torch.arange(int(sup.sum()))
    return ch


def grad_of(fn, x):
    x = x.clone().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad(out.total, x)
    return out, g


@pytest.mark.parametrize("kind,alpha,temperature", list(itertools.product(KINDS, [0.0, 0.4], [1.0, 2.0])))
def test_vocab_map_identity_is_todays_loss(kind, alpha, temperature):
    s, t, labels = batch()
    ch = one_token_chunks(labels)
    sup = labels != IGNORE_INDEX
    every = torch.arange(V)
    kw = dict(loss=kind, alpha=alpha, temperature=temperature, **KW)
    got, g_got = grad_of(lambda x: vocab_map_loss_sums(x, labels, ch, t[sup], every, every, **kw), s)
    want, g_want = grad_of(lambda x: loss_sums(x, t, labels, **kw), s)
    for a, b in ((got.total, want.total), (got.kd, want.kd), (got.ce, want.ce), (got.kd_per_seq, want.kd_per_seq)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want.double(), rtol=1e-5, atol=1e-7)
    assert int(got.n_tokens) == int(sup.sum())
    # A permuted vocabulary on the teacher's side, mapped back: the same loss (the map, not the ids, pairs tokens).
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    t_perm = torch.empty_like(t[sup])
    t_perm[:, perm] = t[sup]
    again = vocab_map_loss_sums(s, labels, ch, t_perm, every, perm, **kw)
    torch.testing.assert_close(again.total, got.total.detach(), rtol=1e-12, atol=1e-12)


def ref_alm(s, t, labels, kind, alpha, temperature):
    """float64 reference from probabilities: per supervised token, D([p_t(y), 1 - p_t(y)] || [p_s(y), ...])."""
    sup = labels != IGNORE_INDEX
    y = labels[sup]
    ps = torch.softmax(s[sup] / temperature, -1).gather(-1, y[:, None])
    pt = torch.softmax(t[sup] / temperature, -1).gather(-1, y[:, None])
    d = ref_divergence(kind, torch.cat([pt, 1 - pt], -1), torch.cat([ps, 1 - ps], -1), KW["beta"], KW["skew"])
    ce = -torch.log_softmax(s[sup], -1).gather(-1, y[:, None])[:, 0]
    return (alpha * ce + (1 - alpha) * temperature**2 * d).sum()


@pytest.mark.parametrize("kind,alpha,temperature", list(itertools.product(KINDS, [0.0, 0.4], [1.0, 2.0])))
def test_alm_identity_is_the_binarised_label_loss(kind, alpha, temperature):
    s, t, labels = batch()
    ch = one_token_chunks(labels)
    c = int((ch >= 0).sum())
    t_chunk = teacher_chunk_logprobs(t, labels, ch, c, temperature)
    kw = dict(loss=kind, alpha=alpha, temperature=temperature, **KW)
    got, g_got = grad_of(lambda x: alm_loss_sums(x, labels, ch, t_chunk, **kw), s)
    assert got.total.dtype == torch.float64
    # The same thing said by the sparse loss: the label as the only id, the rest of the mass in the tail.
    sup = labels != IGNORE_INDEX
    ids = labels[sup][:, None]
    tail = torch.log1p(-t_chunk.exp())
    want, g_want = grad_of(lambda x: sparse_loss_sums(x, ids, t_chunk[:, None], tail, labels, **kw), s)
    torch.testing.assert_close(got.total, want.total.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.kd_per_seq, want.kd_per_seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want.double(), rtol=1e-5, atol=1e-7)
    ref, g_ref = grad_of(lambda x: type("S", (), {"total": ref_alm(x, t, labels, kind, alpha, temperature)}), s)
    torch.testing.assert_close(got.total, ref.total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)


def head_and_hidden(seed=0, v=V):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(H, v, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(v, H, generator=g, dtype=torch.float64))
    return lin, torch.randn(B, T, H, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("chunk_size", [1, 2, 100])
def test_chunked_equals_unchunked(chunk_size):
    _, t, labels = batch()
    ch = one_token_chunks(labels)
    sup = labels != IGNORE_INDEX
    c = int(sup.sum())
    s_lin, hs = head_and_hidden(0)
    t_lin, ths = head_and_hidden(1)
    every = torch.arange(V)
    kw = dict(loss="jsd", alpha=0.3, temperature=1.5, **KW)
    t_chunk = teacher_chunk_logprobs(t, labels, ch, c, 1.5)
    cases = [
        (
            lambda h: chunked_alm_loss_sums(h, OutputHead(s_lin), labels, ch, t_chunk, chunk_size=chunk_size, **kw),
            lambda h: alm_loss_sums(s_lin(h), labels, ch, t_chunk, **kw),
        ),
        (
            lambda h: chunked_vocab_map_loss_sums(
                h, OutputHead(s_lin), labels, ch, ths[sup], t_lin, every, every, chunk_size=chunk_size, **kw
            ),
            lambda h: vocab_map_loss_sums(s_lin(h), labels, ch, t_lin(ths[sup]), every, every, **kw),
        ),
    ]
    for chunked, plain in cases:
        a, ga = grad_of(chunked, hs)
        b, gb = grad_of(plain, hs)
        torch.testing.assert_close(a.total, b.total, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
        s_lin.weight.grad = None
        chunked(hs).total.backward()  # the head's weight gets its gradient through the checkpointed chunks
        assert s_lin.weight.grad is not None and s_lin.weight.grad.abs().sum() > 0


def test_empty_and_bad_chunks():
    s, t, labels = batch()
    none = torch.full_like(labels, IGNORE_INDEX)
    out = alm_loss_sums(s.requires_grad_(), none, torch.full_like(labels, -1), torch.zeros(0, dtype=torch.float64))
    assert out.total.item() == 0 and int(out.n_tokens) == 0
    out.total.backward()
    ch = one_token_chunks(labels)
    c = int((ch >= 0).sum())
    bad = ch.clone()
    bad[0, 0] = 0  # label -100 there
    with pytest.raises(ValueError, match="unsupervised position"):
        alm_loss_sums(s, labels, bad, torch.zeros(c))
    with pytest.raises(ValueError, match="every chunk id"):
        alm_loss_sums(s, labels, ch, torch.zeros(c + 1))
    with pytest.raises(ValueError, match=r"must be \[M\]"):
        vocab_map_loss_sums(s, labels, ch, t[labels != IGNORE_INDEX], torch.arange(3), torch.arange(4))


# ------------------------------------------------------------------------------------------------- chain rule
# Student vocabulary: every pair (a, b) of N byte values, one token each (id a * N + b). Teacher vocabulary: the N
# byte values; it spells each student token as two tokens. The known model: random logits over the student vocabulary
# at each student position (the context is the text so far, the same on both sides at a chunk boundary).
N = 4


def chain_rule_teacher(model_logits):
    """The teacher's logits ``[B, 2T, N]`` defined from the model ``[B, T, N*N]`` by the chain rule: position 2k
    predicts the first byte (the marginal), position 2k + 1 the second byte given the first (the conditional)."""
    logp = torch.log_softmax(model_logits, -1).unflatten(-1, (N, N))  # [B, T, a, b]
    first = torch.logsumexp(logp, -1)  # log P(a)
    return first, logp - first[..., None]  # log P(a), log P(b | a)


def test_chain_rule_teacher_matches_the_model_exactly():
    g = torch.Generator().manual_seed(3)
    model = torch.randn(B, T, N * N, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, N * N, (B, T), generator=g)
    labels[1, :2] = IGNORE_INDEX
    first, cond = chain_rule_teacher(model)
    # The teacher's own sequence: token 2k + 1 is the first byte of student token k + 1, 2k + 2 its second byte.
    a, b = labels.clamp(min=0) // N, labels.clamp(min=0) % N
    t_logits = torch.empty(B, 2 * T, N, dtype=torch.float64)
    t_logits[:, 0::2] = first
    t_logits[:, 1::2] = cond.gather(-2, a[..., None, None].expand(B, T, 1, N))[..., 0, :]
    t_labels = torch.stack([a, b], -1).flatten(1)
    s_ch = one_token_chunks(labels)
    t_ch = s_ch.repeat_interleave(2, dim=1)  # chunk k: one student token, two teacher tokens
    c = int((s_ch >= 0).sum())
    t_labels[t_ch < 0] = IGNORE_INDEX
    t_chunk = teacher_chunk_logprobs(t_logits, t_labels, t_ch, c)
    model_lp = torch.log_softmax(model, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][labels != IGNORE_INDEX]
    torch.testing.assert_close(t_chunk, model_lp, rtol=0, atol=1e-13)  # the chunk likelihoods are the model's

    for kind in KINDS:
        kw = dict(loss=kind, alpha=0.0, **KW)
        out, g = grad_of(lambda x: alm_loss_sums(x, labels, s_ch, t_chunk, **kw), model)
        assert abs(out.total.item()) < 1e-12, kind  # the student that is the model has nothing to learn
        if kind != "tvd":  # |p_t - p_s| has no gradient at its minimum (rounding picks a sign)
            assert g.abs().max().item() < 1e-10, kind
        other, g_other = grad_of(lambda x: alm_loss_sums(x, labels, s_ch, t_chunk, **kw), model.flip(-1))
        assert other.total.item() > 1e-3 and g_other.abs().max().item() > 1e-3, kind


def test_log1mexp_has_no_nan_gradient():
    from ds_distill.losses.cross_tokenizer import log1mexp

    x = torch.tensor([-1e-12, -0.5, -math.log(2), -1.0, -50.0, -800.0], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    torch.testing.assert_close(y[1:5], torch.log(1 - torch.exp(x[1:5])), rtol=1e-12, atol=1e-15)
    assert y[0].item() < -27 and y[5].item() == 0.0
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_map_partial_map_buckets(kind):
    """Some tokens map (in another order on the teacher's side), the rest of each side's mass is its tail bucket:
    against a float64 reference from probabilities, values and gradients."""
    s, t, labels = batch(2)
    ch = one_token_chunks(labels)
    sup = labels != IGNORE_INDEX
    s_index, t_index = torch.tensor([0, 3, 4, 7, 12]), torch.tensor([5, 1, 2, 11, 0])
    kw = dict(loss=kind, alpha=0.25, temperature=1.5, **KW)
    got, g_got = grad_of(lambda x: vocab_map_loss_sums(x, labels, ch, t[sup], s_index, t_index, **kw), s)

    def ref(x):
        ps, pt = torch.softmax(x[sup] / 1.5, -1)[:, s_index], torch.softmax(t[sup] / 1.5, -1)[:, t_index]
        ps, pt = torch.cat([ps, 1 - ps.sum(-1, keepdim=True)], -1), torch.cat([pt, 1 - pt.sum(-1, keepdim=True)], -1)
        ce = -torch.log_softmax(x[sup], -1).gather(-1, labels[sup][:, None])[:, 0]
        total = 0.25 * ce.sum() + 0.75 * 1.5**2 * ref_divergence(kind, pt, ps, KW["beta"], KW["skew"]).sum()
        return type("S", (), {"total": total})

    want, g_want = grad_of(ref, s)
    torch.testing.assert_close(got.total, want.total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------ the data pipeline and the teacher
TEXTS = [
    ("what is the capital of france?", " the capital of france is paris. 🇫🇷"),
    ("write a short poem about the sea", "\nthe sea, the wind — 海と風 12345 waves"),
    ("hello, how are you today?", " i am fine, thank you. ß ü é"),
    ("one two three", " four five six seven eight nine ten 2026"),
]


class _Engine:
    """A HiddenStatesLM called as the trainer calls a DeepSpeed engine (``engine(**inputs)``, ``engine.module``)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory):
    import json

    from transformers import AutoModelForCausalLM

    from ds_distill.models.head import HiddenStatesLM
    from tests.tiny import make_metaspace_tokenizer, make_model, make_tokenizer

    root = tmp_path_factory.mktemp("cross")
    s_tok, t_tok = make_tokenizer(root / "s_tok"), make_metaspace_tokenizer(root / "t_tok")
    s_path = make_model(root / "student", s_tok, layers=1, hidden=32, seed=2)
    t_path = make_model(root / "teacher", t_tok, layers=2, hidden=32, seed=1)
    with open(root / "pc.jsonl", "w") as fh:
        for p, c in TEXTS * 2:
            fh.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float64).eval()
    s_lm, t_lm = load(s_path), load(t_path)
    return dict(root=root, s_tok=s_tok, t_tok=t_tok, s_lm=s_lm, t_lm=t_lm, t_engine=_Engine(HiddenStatesLM(t_lm)))


@pytest.mark.parametrize("packing", [False, True])
def test_pipeline_columns_spell_the_same_bytes(cross_pair, packing):
    """Every chunk's student tokens and teacher tokens spell the same bytes (read from the vocabularies, not the
    offsets); the teacher's ids are its own tokenization of each part; only supervised tokens are in chunks."""
    from ds_distill.data import get_dataset
    from ds_distill.models.tokenizers import token_bytes

    s_tok, t_tok = cross_pair["s_tok"], cross_pair["t_tok"]
    ds = get_dataset(str(cross_pair["root"] / "pc.jsonl"), s_tok, seq_len=96, teacher_tokenizer=t_tok, packing=packing)
    sb, tb = token_bytes(s_tok), token_bytes(t_tok)
    spell = lambda table, ids: b"".join(table[i] or b"" for i in ids).lstrip(b" ")  # SP prepends a space per part
    n_chunks = 0
    for row in ds:
        ids, t_ids, labels = row["input_ids"], row["teacher_input_ids"], row["labels"]
        s_ch, t_ch = row["chunk_ids"], row["teacher_chunk_ids"]
        assert len(s_ch) == len(ids) and len(t_ch) == len(t_ids)
        for c in sorted(set(s_ch) - {-1}):
            s_tokens = [ids[p + 1] for p, x in enumerate(s_ch) if x == c]
            t_tokens = [t_ids[p + 1] for p, x in enumerate(t_ch) if x == c]
            assert t_tokens, "every chunk has teacher tokens"
            if s_tokens == [s_tok.eos_token_id]:
                assert t_tokens == [t_tok.eos_token_id]
            else:
                assert spell(sb, s_tokens) == spell(tb, t_tokens), (s_tok.decode(s_tokens), t_tok.decode(t_tokens))
            assert all(labels[p] != IGNORE_INDEX for p, x in enumerate(s_ch) if x == c), "a chunk is supervised"
        n_chunks += len(set(s_ch) - {-1})
    if not packing:  # the teacher's own tokenization of each example: its prompt with BOS, the completion, its EOS
        for row, (p, c) in zip(ds, TEXTS * 2):
            want = t_tok(p)["input_ids"] + t_tok(c, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
            assert row["teacher_input_ids"] == want
            assert row["alignment"][2] == 0, "prompt and completion align whole"
    assert n_chunks > 8 * 5


@pytest.mark.parametrize("method", ["alm", "vocab_map"])
def test_teacher_source_equals_the_models_own_logits(cross_pair, method):
    """CrossTokenizerTeacher (the teacher on its own ids, chunked heads) against the loss from both models' full
    logits (their own forward): values and the student's gradients, float64."""
    from ds_distill.data import Batch, get_dataset
    from ds_distill.models.head import HiddenStatesLM
    from ds_distill.models.tokenizers import vocab_map
    from ds_distill.teachers.live import CrossTokenizerTeacher

    s_tok, t_tok, s_lm, t_lm = (cross_pair[k] for k in ("s_tok", "t_tok", "s_lm", "t_lm"))
    ds = get_dataset(str(cross_pair["root"] / "pc.jsonl"), s_tok, seq_len=96, teacher_tokenizer=t_tok)
    rows = ds[:4]
    batch = Batch.collate(rows, 0, epoch=0, position=0)
    cross, labels = batch.teacher, batch.labels
    maps = vocab_map(s_tok, t_tok) if method == "vocab_map" else None
    source = CrossTokenizerTeacher(cross_pair["t_engine"], method, maps)
    kw = dict(loss="forward_kl", alpha=0.3, temperature=1.5, beta=0.5, skew=0.1, vocab_size=len(s_tok))
    student = HiddenStatesLM(s_lm)
    inputs = batch.inputs

    targets = source.targets(batch, "train")
    got = source.loss_sums(student(**inputs), student.head, targets, labels, chunk_size=7, num_chunks=None, **kw)
    (g_got,) = torch.autograd.grad(got.total, s_lm.lm_head.weight)

    s_logits = s_lm(**inputs).logits
    with torch.no_grad():
        t_logits = t_lm(input_ids=cross["teacher_input_ids"], attention_mask=cross["teacher_attention_mask"]).logits
    n = cross["n_chunks"]
    if method == "alm":
        # The teacher's log-likelihood of each chunk, read off its own ids (position p scores token p + 1).
        t_lp = torch.log_softmax(t_logits[:, :-1] / 1.5, -1).gather(-1, cross["teacher_input_ids"][:, 1:, None])[..., 0]
        t_ch = cross["teacher_chunk_ids"][:, :-1]
        t_chunk = torch.zeros(n, dtype=torch.float64).index_add_(0, t_ch[t_ch >= 0], t_lp[t_ch >= 0])
        want = alm_loss_sums(s_logits, labels, cross["chunk_ids"], t_chunk, **kw)
    else:
        from ds_distill.losses.cross_tokenizer import chunk_starts

        starts = chunk_starts(cross["teacher_chunk_ids"].flatten(), n)
        s_index, t_index = (torch.tensor(x) for x in maps)
        want = vocab_map_loss_sums(
            s_logits, labels, cross["chunk_ids"], t_logits.flatten(0, 1)[starts], s_index, t_index, **kw
        )
    (g_want,) = torch.autograd.grad(want.total, s_lm.lm_head.weight)
    torch.testing.assert_close(got.total.double(), want.total.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-4, atol=1e-7)
    assert got.kd.item() > 0 and n > 10
    assert source.take_report().tolist() == cross["alignment"].tolist() and source.take_report() is None


def test_refusals_in_one_line(cross_pair, tmp_path):
    import json

    from ds_distill.common import UsageError
    from ds_distill.config import RunConfig
    from ds_distill.data import get_dataset
    from ds_distill.models.tokenizers import shared_vocab_size

    s_tok, t_tok = cross_pair["s_tok"], cross_pair["t_tok"]
    # Text made mostly of the student's chat markers (special tokens: in no chunk): a pair that cannot be aligned.
    path = tmp_path / "markers.jsonl"
    path.write_text("".join(json.dumps({"text": "<|user|><|end|><|assistant|><|end|> hi"}) + "\n" for _ in range(5)))
    with pytest.raises(UsageError, match=r"5 of 5 examples .* align less than 90% .* cannot be distilled") as e:
        get_dataset(str(path), s_tok, seq_len=64, teacher_tokenizer=t_tok)
    assert "\n" not in str(e.value)
    # Different tokenizers without --cross_tokenizer: one line naming the methods.
    (cross_pair["root"] / "t_tok" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"pass --cross_tokenizer METHOD \(alm or vocab_map"):
        shared_vocab_size("student", s_tok, [str(cross_pair["root"] / "t_tok")])
    assert shared_vocab_size("student", s_tok, [str(cross_pair["root"] / "t_tok")], "alm") == len(s_tok)
    base = dict(student="s", teacher=["t"], data="d", output_dir="o")
    t_dir = str(cross_pair["root"] / "t_tok")
    for extra, message in [
        (dict(cross_tokenizer="uld"), "--cross_tokenizer 'uld' is unknown: use one of alm, vocab_map"),
        (dict(cross_tokenizer="alm", teacher=["a", "b"]), "takes one --teacher"),
        (dict(cross_tokenizer="alm", on_policy_fraction=0.5), "drop --on_policy_fraction"),
        (dict(cross_tokenizer="vocab_map", teacher=[], teacher_cache=["c"]), "which no cache stores"),
        (dict(cross_tokenizer="alm", teacher_cache=["c"]), "takes one --teacher, --teacher_cache or --teacher_url"),
        (dict(cross_tokenizer="vocab_map", teacher=[], teacher_url=["u"], teacher_tokenizer=t_dir), "server's top-K"),
        (dict(cross_tokenizer="alm", teacher=[], teacher_url=["u"]), "needs --teacher_tokenizer: a folder"),
        (
            dict(cross_tokenizer="alm", teacher=[], teacher_url=["u"], teacher_tokenizer=t_dir, temperature=2.0),
            "alm with --teacher_url needs --temperature 1",
        ),
        (dict(teacher_tokenizer=t_dir), "--teacher_tokenizer names a served teacher's tokenizer"),
    ]:
        with pytest.raises(UsageError, match=message):
            RunConfig(**{**base, **extra}).validate()


def test_vocab_map_reads_a_gemma_style_tokenizer(cross_pair, tmp_path):
    """Gemma 3's tokenizer.json makes spaces "▁" in its normalizer, with no Metaspace step: its tokens' bytes are read
    (they spell the text back, byte-fallback tokens included) and vocab_map pairs them with the student's."""
    from ds_distill.models.tokenizers import token_bytes, vocab_map
    from tests.tiny import make_gemma_tokenizer

    gemma = make_gemma_tokenizer(tmp_path / "gemma")
    table = token_bytes(gemma)
    for prompt, completion in TEXTS:
        text = prompt + completion
        assert b"".join(table[i] for i in gemma(text, add_special_tokens=False)["input_ids"]) == text.encode()
    s_ids, t_ids = vocab_map(cross_pair["s_tok"], gemma)
    s_table = token_bytes(cross_pair["s_tok"])
    assert len(s_ids) > 200 and all(s_table[a] == table[b] for a, b in zip(s_ids, t_ids) if s_table[a] is not None)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ms_teacher(tmp_path_factory):
    """A 2-layer random teacher with the SentencePiece-style tokenizer (the tiny student's is byte-level BPE)."""
    from tests.tiny import make_metaspace_tokenizer, make_model

    root = tmp_path_factory.mktemp("ms_teacher")
    return make_model(root / "teacher", make_metaspace_tokenizer(root / "tok"), layers=2, hidden=32, seed=1)


def test_training_across_tokenizers_lowers_the_loss(tiny, dist_env, tmp_path, ms_teacher):
    """ALM in process (student and teacher ZeRO-3): the loss falls, the KD term is live, the report is logged. (ALM's
    KD is small between random models: their chunk likelihoods are small, and so is the binarised KL between them.)"""
    from tests.helpers import ds_json, make_cfg

    cfg = make_cfg(
        tiny,
        tmp_path / "alm",
        teacher=[ms_teacher],
        cross_tokenizer="alm",
        max_steps=4,
        deepspeed_config=ds_json(tmp_path, lr=3e-2),
    )
    report = trains_with_live_kd(cfg)
    assert len(report.history) == 4
    assert all(0 < h["align/bytes_1to1"] < 1 and h["align/bytes_unaligned"] == 0 for h in report.history)


def trains_with_live_kd(cfg):
    """Trains ``cfg`` (4 steps) in process: the loss falls by 10% and the KD term is live. Returns the run's
    AlignmentReport callback."""
    from ds_distill import train
    from ds_distill.teachers.live import AlignmentReport
    from tests.helpers import losses_of

    trainer = train.run(cfg)
    loss, kd = losses_of(trainer), losses_of(trainer, "Train/kd")
    assert len(loss) == 4 and loss[-1] < 0.9 * loss[0], loss
    assert all(k > 0 for k in kd), kd
    (report,) = [cb for cb in trainer.callbacks if isinstance(cb, AlignmentReport)]
    return report


def test_chat_across_tokenizers_trains(tiny, dist_env, tmp_path, ms_teacher):
    """Chat data, each model with its own template (the student's <|user|> markers, the teacher's [user]): ALM in
    process, the loss falls and the KD term is live on the assistant contents."""
    import random

    from tests.helpers import ds_json, make_cfg

    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun".split()
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
    conversations = [
        [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}] * rng.randint(1, 2)
        for _ in range(32)
    ]
    cfg = make_cfg(
        tiny,
        tmp_path / "chat",
        data=chat_file(tmp_path / "chat.jsonl", conversations),
        teacher=[ms_teacher],
        cross_tokenizer="alm",
        max_steps=4,
        seq_len=64,
        deepspeed_config=ds_json(tmp_path, lr=3e-2),
    )
    report = trains_with_live_kd(cfg)
    assert all(h["align/bytes_1to1"] > 0.3 and h["align/bytes_unaligned"] < 0.1 for h in report.history)


def test_different_tokenizers_need_the_flag(tiny, tmp_path, capsys, keep_process_group, ms_teacher):
    from tests.helpers import base_args, flags, run_main

    code, err = run_main(base_args(tiny, tmp_path / "o") + flags(teacher=ms_teacher), capsys)
    assert code == 2 and len(err) == 1 and "pass --cross_tokenizer METHOD (alm or vocab_map" in err[0], err


# ------------------------------------------------------------------------------------------------- chat data
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": " the capital of france is paris. 🇫🇷 "},  # Llama 3 trims it: its part aligns
    {"role": "user", "content": "and 2+2?"},
    {"role": "assistant", "content": "<think>\nadd\n</think>\n\n海と風 12345 waves"},
]


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """A ChatML student (Qwen-style BPE) and a Llama-3 teacher (another vocabulary), each with its own template."""
    from tests.tiny import CHATML_TEMPLATE, make_llama3_tokenizer, make_qwen_tokenizer

    root = tmp_path_factory.mktemp("chat_pair")
    return root, make_qwen_tokenizer(root / "s", CHATML_TEMPLATE), make_llama3_tokenizer(root / "t", vocab_size=380)


def chat_file(path, conversations):
    import json

    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return str(path)


def chunk_texts(row, s_tok, t_tok):
    """[(student bytes, teacher bytes)] of each chunk of a tokenised row, spelt from the vocabularies (added tokens,
    such as Qwen's <think>, by their text; special tokens as None)."""
    from ds_distill.models.tokenizers import token_bytes

    def table(tok):
        special = set(tok.all_special_ids)
        return [
            b if b is not None or i in special else tok.convert_ids_to_tokens(i).encode()
            for i, b in enumerate(token_bytes(tok))
        ]

    sb, tb = table(s_tok), table(t_tok)
    ids, t_ids = row["input_ids"], row["teacher_input_ids"]
    out = []
    for c in sorted(set(row["chunk_ids"]) - {-1}):
        s = [ids[p + 1] for p, x in enumerate(row["chunk_ids"]) if x == c]
        t = [t_ids[p + 1] for p, x in enumerate(row["teacher_chunk_ids"]) if x == c]
        assert None not in [sb[i] for i in s] + [tb[i] for i in t], "a special token in a chunk"
        out.append((b"".join(sb[i] for i in s), b"".join(tb[i] for i in t)))
    return out


@pytest.mark.parametrize("qwen3_student", [False, True])
def test_chat_renderings_align_on_the_contents(chat_pair, tmp_path, qwen3_student):
    """Each side's tokens are its own template's rendering, tokenised as without a teacher; every chunk spells the
    same bytes on both sides, inside one assistant content (no markup, no message boundary, nothing unsupervised).
    A student template that rewrites history (Qwen3) splits the conversation per turn: the teacher's follows."""
    from ds_distill.data import get_dataset
    from tests.tiny import make_qwen_tokenizer

    root, s_tok, t_tok = chat_pair
    if qwen3_student:
        s_tok = make_qwen_tokenizer(root / "s3")
    path = chat_file(tmp_path / "chat.jsonl", [CONVERSATION] * 2)
    alone = get_dataset(path, s_tok, seq_len=256)
    ds = get_dataset(path, s_tok, seq_len=256, teacher_tokenizer=t_tok)
    assert len(ds) == (4 if qwen3_student else 2) and ds["input_ids"] == alone["input_ids"]
    assert ds["labels"] == alone["labels"]
    assistant = [m["content"].encode() for m in CONVERSATION if m["role"] == "assistant"]
    for k, row in enumerate(ds):
        turns = 3 + 2 * (k % 2) if qwen3_student else len(CONVERSATION)  # the messages this example renders
        rendered = t_tok.apply_chat_template(CONVERSATION[:turns], tokenize=False)
        assert row["teacher_input_ids"] == t_tok(rendered, add_special_tokens=False)["input_ids"]
        pairs = chunk_texts(row, s_tok, t_tok)
        assert len(pairs) >= 8
        for s_bytes, t_bytes in pairs:
            assert s_bytes == t_bytes and any(s_bytes in a for a in assistant), (s_bytes, t_bytes)
        # The last reply's content (as both show it: trimmed) ends the chunks, in order.
        assert b"".join(s for s, _ in pairs).endswith(CONVERSATION[turns - 1]["content"].strip()[-12:].encode())
        n_bytes, _, unaligned = row["alignment"][:3]
        shown = s_tok.decode(row["input_ids"])
        assert n_bytes == sum(len(m["content"].encode()) for m in CONVERSATION[:turns] if m["content"] in shown)
        assert 0 < unaligned < 0.2 * n_bytes  # the trimmed spaces, " the" against "the" at the trim


def test_chat_probe_refuses_contents_that_cannot_be_aligned(chat_pair, tmp_path):
    """A teacher template that drops the system message, rewrites a content, or is missing: one line each, from the
    data pipeline (before any model loads)."""
    import copy

    from ds_distill.common import UsageError
    from ds_distill.data import get_dataset
    from tests.tiny import LLAMA3_TEMPLATE

    root, s_tok, t_tok = chat_pair
    path = chat_file(tmp_path / "chat.jsonl", [CONVERSATION[1:3]])
    teacher_says = r"the teacher '.*'s chat template does not write the probe conversation's message"
    cases = [
        (
            LLAMA3_TEMPLATE.replace("loop_messages = messages", "loop_messages = messages[1:]"),
            teacher_says + " 0 .system",
        ),
        (LLAMA3_TEMPLATE.replace("message['content'] | trim", "message['content'] | upper"), teacher_says),
        (None, "teacher tokenizer .* has no chat template"),
    ]
    for template, message in cases:
        teacher = copy.deepcopy(t_tok)
        teacher.chat_template = template
        with pytest.raises(UsageError, match=message) as e:
            get_dataset(path, s_tok, seq_len=64, teacher_tokenizer=teacher)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ teacher caches
def write_alm_cache(tiny, teacher, out, *extra):
    """``cache_teacher`` for a teacher of another tokenizer: ALM's targets over the tiny data, for the tiny student."""
    from ds_distill import cache_teacher
    from ds_distill.config import parse_args
    from ds_distill.ds_config import REPO_CONFIGS
    from tests.helpers import flags

    args = flags(
        teacher=teacher,
        tokenizer=tiny["student"],
        cross_tokenizer="alm",
        data=tiny["data"],
        output_dir=out,
        seq_len=32,
        shard_examples=24,
        batch_size=4,
        temperature=1.5,
        teacher_deepspeed_config=REPO_CONFIGS / "cpu_teacher_replicated.json",
    )
    return cache_teacher.run(parse_args(args + list(extra), cache_teacher.CacheConfig))


@pytest.fixture(scope="module")
def alm_cache(tiny, tmp_path_factory, ms_teacher):
    from ds_distill.runtime import distributed

    distributed.init_distributed()
    out = tmp_path_factory.mktemp("alm_cache") / "cache"
    return out, write_alm_cache(tiny, ms_teacher, out)


def test_alm_cache_trains_like_the_live_teacher(tiny, dist_env, tmp_path, ms_teacher, alm_cache, capsys):
    """A cache of the teacher's log-probs of its own tokens: the same loss curve (train and eval, per step), gradient
    norms and alignment report as the live teacher, with no teacher model; a few bytes per teacher token."""
    from ds_distill import train
    from ds_distill.teachers.cache_reader import CachedCrossTokenizerTeacher
    from ds_distill.teachers.live import AlignmentReport
    from tests.helpers import ds_json, make_cfg

    root, manifest = alm_cache
    stats = manifest["stats"]
    print(f"\nALM cache of the tiny data: {stats['tokens']} teacher tokens, {stats['bytes_per_token']:.2f} bytes/token")
    assert stats["tokens"] > 500 and stats["bytes_per_token"] < 8 and stats["kl_buckets_per_token"] == 0
    kw = dict(
        cross_tokenizer="alm",
        max_steps=2,
        temperature=1.5,
        eval_fraction=0.1,
        deepspeed_config=ds_json(tmp_path, lr=3e-2),
    )
    live = train.run(make_cfg(tiny, tmp_path / "live", teacher=[ms_teacher], **kw))
    cached = train.run(make_cfg(tiny, tmp_path / "cached", teacher=[], teacher_cache=[str(root)], **kw))
    assert isinstance(cached.teachers, CachedCrossTokenizerTeacher)
    for key in ("Train/loss", "Train/kd", "Eval/kd", "Eval/loss", "Train/grad_norm"):
        a, b = [h[key] for h in live.history if key in h], [h[key] for h in cached.history if key in h]
        assert a and a == pytest.approx(b, rel=1e-5, abs=1e-7), key
    report = lambda t: next(cb for cb in t.callbacks if isinstance(cb, AlignmentReport)).history
    assert report(live) == report(cached) and len(report(live)) == 2


def test_alm_cache_refusals_in_one_line(tiny, dist_env, tmp_path, ms_teacher, alm_cache, capsys, keep_process_group):
    """A cache written for one student tokenizer, method or alignment and used with another stops in one line; so do
    vocab_map with a cache and cache_teacher flags that do not apply."""
    import datasets

    from ds_distill import cache_teacher, train
    from ds_distill.common import UsageError
    from ds_distill.teachers import cache_format
    from tests import tiny as tiny_mod
    from tests.helpers import flags

    root = str(alm_cache[0])
    other_tok = tiny_mod.make_tokenizer(tmp_path / "tok2", vocab_size=300)
    other_student = tiny_mod.make_model(tmp_path / "other", other_tok, layers=1, hidden=16, heads=2)
    top_k = tmp_path / "top_k"
    cache_teacher.run(
        cache_teacher.parse_args(
            flags(teacher=tiny["teacher"], data=tiny["data"], output_dir=top_k, seq_len=32, top_k=4),
            cache_teacher.CacheConfig,
        )
    )
    base = dict(student=tiny["student"], data=tiny["data"], output_dir=tmp_path / "o", teacher_cache=root)
    base.update(max_steps=1, seq_len=32, eval_fraction=0, temperature=1.5, cross_tokenizer="alm")
    cases = [
        (dict(student=other_student), "was written for another student tokenizer"),
        (dict(cross_tokenizer=None), "holds --cross_tokenizer alm targets (a teacher with another tokenizer) but"),
        (dict(cross_tokenizer="vocab_map"), "vocab_map needs the teacher's whole distribution at every chunk start"),
        (dict(teacher_cache=str(top_k), temperature=1), "holds the top-K of a teacher with the student's tokenizer"),
        (dict(temperature=2), "holds log-probs at temperature 1.5 but this run has --temperature 2.0"),
        (dict(teacher=ms_teacher), "takes one --teacher, --teacher_cache or --teacher_url"),
    ]
    for change, message in cases:
        args = flags(**{k: v for k, v in {**base, **change}.items() if v is not None})
        code = train.main(args)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (change, errors)
    # Each batch's stored log-probs must be of its scored teacher tokens (the cache's copy of the teacher tokenizer
    # aligns the data; the read rows are checked against the batch, token by token).
    from ds_distill import data
    from ds_distill.teachers import cache_reader

    t_tok = cache_reader.cross_teacher_tokenizer(root, "alm")
    ds = data.get_dataset(tiny["data"], tiny["tokenizer"], seq_len=32, teacher_tokenizer=t_tok)
    source = cache_reader.CachedCrossTokenizerTeacher(cache_reader.TeacherCache(root), {"train": "data"})
    batch = data.Batch.collate(ds[:3], 0, epoch=0, position=0)
    assert source.targets(batch, "train")["teacher_logp"].shape[0] == int((batch.teacher["teacher_labels"] >= 0).sum())
    labels = batch.teacher["teacher_labels"]
    labels[labels >= 0] = labels[labels >= 0].roll(1)
    with pytest.raises(UsageError, match="holds other teacher tokens for examples"):
        source.targets(batch, "train")
    # The data fingerprint covers the alignment: the same tokens chunked otherwise are other data.
    ds = datasets.Dataset.from_dict({"row": [0], "input_ids": [[1, 2, 3]], "chunk_ids": [[0, 1, -1]]})
    other = datasets.Dataset.from_dict({"row": [0], "input_ids": [[1, 2, 3]], "chunk_ids": [[0, 0, -1]]})
    assert cache_format.dataset_fingerprint(ds) != cache_format.dataset_fingerprint(other)
    # cache_teacher: what a cache of another tokenizer's teacher cannot hold, each in one line
    for extra, message in [
        (dict(cross_tokenizer="vocab_map"), "--cross_tokenizer vocab_map needs the teacher's whole distribution"),
        (dict(tokenizer=""), "--cross_tokenizer needs --tokenizer"),
        (dict(exact=True), "drop --top_k and --exact"),
    ]:
        with pytest.raises(UsageError, match=message) as e:
            write_alm_cache(tiny, ms_teacher, tmp_path / "c", *flags(**extra))
        assert "\n" not in str(e.value)
