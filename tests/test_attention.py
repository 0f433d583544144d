"""MiniLMv2 attention relations (ds_distill/losses/attention.py, ds_distill/teachers/attention.py): float64 against
a plain reference, zero loss and gradient on an exact copy, a gradient check, and the wiring on tiny models."""

import math
from types import SimpleNamespace

import pytest
import torch

from ds_distill import train
from ds_distill.common import IGNORE_INDEX, UsageError
from ds_distill.losses.attention import relation_logprobs, relation_loss_sums
from tests.helpers import losses_of, make_cfg


def ref_relation_loss(s, t, labels, keep, heads):
    """Deliberately plain float64: per row, per relation head, softmax over the allowed keys and KL, in loops."""
    b_, t_, _ = s.shape
    total = torch.zeros((), dtype=torch.float64)
    for b in range(b_):
        for q in range(t_):
            if labels[b, q] == IGNORE_INDEX:
                continue
            keys = [k for k in range(q + 1) if keep[b, k] or k == q]
            for a in range(heads):
                rel = []
                for x in (t, s):
                    d = x.shape[-1] // heads
                    v = x[b, :, a * d : (a + 1) * d]
                    rel.append(torch.softmax(torch.stack([v[q] @ v[k] / math.sqrt(d) for k in keys]), 0))
                total = total + (rel[0] * (rel[0].log() - rel[1].log())).sum() / heads
    return total


def case(seed, ds=8, dt=12):
    g = torch.Generator().manual_seed(seed)
    b, t = 2, 5
    s = [torch.randn(b, t, ds, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    te = [torch.randn(b, t, dt, generator=g, dtype=torch.float64) for _ in range(3)]
    labels = torch.randint(0, 9, (b, t), generator=g)
    labels[0, 0] = labels[1, 3] = IGNORE_INDEX
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[1, 3:] = False  # right padding of row 1
    labels[1, 4] = IGNORE_INDEX
    return s, te, labels, keep


def test_relation_loss_is_the_plain_float64_reference_across_widths():
    """Student width 8, teacher 12, 2 relation heads: the per-kind sums equal the loops of the reference."""
    s, t, labels, keep = case(0)
    got = relation_loss_sums(s, t, labels, keep, heads=2)
    for k in range(3):
        assert abs(got[k].item() - ref_relation_loss(s[k], t[k], labels, keep, 2).item()) < 1e-10
    assert (got > 0).all()


def test_relation_loss_and_gradient_are_zero_on_a_copy_and_pass_gradcheck():
    s, _, labels, keep = case(1, ds=8, dt=8)
    copy = [x.detach().clone() for x in s]
    out = relation_loss_sums(s, copy, labels, keep, heads=4)
    assert out.abs().max().item() < 1e-12
    grads = torch.autograd.grad(out.sum(), s)
    assert max(g.abs().max().item() for g in grads) < 1e-12
    x = s[0][:1, :4, :4].detach().clone().requires_grad_()  # small: gradcheck perturbs every element
    t = torch.randn(1, 4, 6, dtype=torch.float64)
    check = lambda x: relation_loss_sums([x], [t], labels[:1, :4], keep[:1, :4], heads=2)
    assert torch.autograd.gradcheck(check, (x,), fast_mode=True)


def test_padding_is_no_key_and_rows_stay_finite():
    """Values at padded positions change nothing; an all-padding row keeps finite log-relations (itself)."""
    s, t, labels, keep = case(2)
    before = relation_loss_sums(s, t, labels, keep, heads=2)
    s2 = [x.detach().clone() for x in s]
    for x in s2:
        x[1, 3:] = 1e3
    assert torch.allclose(relation_loss_sums(s2, t, labels, keep, heads=2), before, atol=1e-12)
    logp = relation_logprobs(s[0], 2, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.isfinite(logp.diagonal(dim1=-2, dim2=-1)).all()
    with pytest.raises(ValueError, match="not divisible"):
        relation_logprobs(s[0], 3, keep)


def test_student_equal_to_the_teacher_has_zero_relation_loss_through_the_trainer(tiny, dist_env, tmp_path):
    """The tiny teacher distilled into itself (its last layer against the student's last): the logged relations are
    0 in fp32 under ZeRO-3 (and the end-of-run evaluation runs); the teacher kept exactly its layer's three
    projections."""
    cfg = make_cfg(
        tiny, tmp_path / "run", student=tiny["teacher"], attention_relation_weight=1.0, max_steps=1, eval_fraction=0.1
    )
    trainer = train.build(cfg)
    trainer.fit()
    logged = losses_of(trainer, "Train/attention")
    assert len(logged) == 1 and abs(logged[0]) < 1e-9  # 0.0 here; the layer-0 projections give 3.5e-4
    assert {k for h in trainer.history for k in h if k.startswith("Train/attention_")} == {
        "Train/attention_query",
        "Train/attention_key",
        "Train/attention_value",
    }
    assert len(losses_of(trainer, "Eval/loss")) == 1, "an evaluation runs with the relations armed and read"
    relations = trainer.teachers
    assert len(relations.teacher_capture.handles) == 3 and relations.teacher_capture.held == 0


@pytest.mark.parametrize(
    "kw, says",
    [
        (dict(seq_len=4096), "budget of 2048 tokens"),
        (dict(packing=True), "drop --packing"),
        (dict(alpha=1.0), "one live --teacher"),
        (dict(attention_relation_heads=-1), "must be >= 0"),
    ],
)
def test_relation_refusals(tiny, tmp_path, kw, says):
    with pytest.raises(UsageError, match=says):
        make_cfg(tiny, tmp_path, attention_relation_weight=1.0, **kw).validate()


def test_relation_heads_and_layer_are_checked_against_the_models(tiny, tmp_path):
    """3 relation heads divide none of the tiny widths (32 and 16); layer 2 of a 2-layer teacher does not exist."""
    from transformers import AutoConfig

    from ds_distill.teachers import attention

    def engine(path):
        return SimpleNamespace(module=SimpleNamespace(config=AutoConfig.from_pretrained(path)))

    source, student = SimpleNamespace(engines=[engine(tiny["teacher"])]), engine(tiny["student"])
    cfg = make_cfg(tiny, tmp_path, attention_relation_weight=1.0, attention_relation_heads=3)
    with pytest.raises(UsageError, match="does not divide the widths"):
        attention.wrap(cfg, source, student)
    with pytest.raises(UsageError, match="is not a layer of the teacher"):
        attention.wrap(
            make_cfg(tiny, tmp_path, attention_relation_weight=1.0, attention_relation_layer=2), source, student
        )
