"""The draft-model recipe (--recipe draft): the target's own samples (--on_policy_sampler teacher), total
variation distance, and the logged expected acceptance rate (ds_distill/teachers/acceptance.py), checked against a
simulated speculative sampler on tiny models, in process."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill import losses, on_policy, train
from ds_distill.common import IGNORE_INDEX, UsageError
from ds_distill.config import parse_args
from ds_distill.ds_config import REPO_CONFIGS
from ds_distill.teachers import acceptance
from ds_distill.teachers.live import LiveTeachers
from tests.helpers import ds_json, flags, make_cfg


@pytest.fixture(scope="module")
def draft_pair(tiny, tmp_path_factory):
    """The tiny teacher and student with their final norms scaled by 10 and 6: random tiny models are nearly uniform
    (every draft accepted) and, scaled alike, both repeat the last token; so the teacher is peaked and the student
    flatter, and the two differ visibly."""
    root = tmp_path_factory.mktemp("draft")
    out = {}
    for name, scale in (("teacher", 10.0), ("student", 6.0)):
        lm = AutoModelForCausalLM.from_pretrained(tiny[name])
        with torch.no_grad():
            lm.model.norm.weight.mul_(scale)
        lm.save_pretrained(root / name)
        tiny["tokenizer"].save_pretrained(root / name)
        out[name] = str(root / name)
    return out


class Recorder:
    """A batch stream that keeps every micro-batch it hands the loop."""

    def __init__(self, stream):
        self.stream, self.batches = stream, []

    def __next__(self):
        self.batches.append(next(self.stream))
        return self.batches[-1]

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def test_draft_recipe_logs_the_acceptance_a_speculative_sampler_measures(tiny, draft_pair, pc_data, dist_env, tmp_path):
    """The shipped recipe, one step of micro-batch 4 x accumulation 2: the completions are the teacher's own seeded
    samples, and the logged train_acceptance (1 - TVD per sampled token) equals the rate at which a simulated
    speculative sampler (Leviathan et al. 2023: the draft proposes x ~ q, the target accepts with min(1, p(x) / q(x)))
    accepts the student's proposals at those positions: Monte Carlo with the models' own forwards in float64, within
    3 standard errors (and the exact float64 sum min(p, q) within 1e-4)."""
    argv = ["--recipe", "draft"] + flags(
        teacher=draft_pair["teacher"],
        student=draft_pair["student"],
        data=pc_data,
        output_dir=tmp_path / "run",
        deepspeed_config=ds_json(tmp_path, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2),
        teacher_deepspeed_config=REPO_CONFIGS / "cpu_teacher_zero3.json",
        max_steps=1,
        seq_len=32,
        max_new_tokens=12,
        eval_fraction=0,
        export="false",
        chunk_size=16,
    )
    cfg = parse_args(argv)
    assert (cfg.on_policy_fraction, cfg.on_policy_sampler, cfg.loss, cfg.alpha) == (1.0, "teacher", "tvd", 0.0)
    trainer = train.build(cfg)
    trainer.train = recorder = Recorder(trainer.train)
    trainer.fit()
    (logged,) = [h["Train/acceptance"] for h in trainer.history if "Train/acceptance" in h]
    assert len(recorder.batches) == 2

    unset_hf_deepspeed_config()  # the engines' ZeRO-3 config would partition the plain models loaded below
    tok = tiny["tokenizer"]
    teacher = AutoModelForCausalLM.from_pretrained(draft_pair["teacher"]).eval()
    gen = on_policy.HFGenerator(lambda: teacher, tok, generation_config=teacher.generation_config, synced=False)
    p_rows, q_rows = [], []
    f64 = {
        name: AutoModelForCausalLM.from_pretrained(draft_pair[name], dtype=torch.float64)
        for name in ("teacher", "student")
    }
    for index, batch in enumerate(recorder.batches):
        # The rows are the teacher's samples, drawn as the on-policy stream seeds them (seed, rank, micro-batch).
        lens = [on_policy.prompt_length(lab) for lab in batch.labels.tolist()]
        prompts = [batch.inputs["input_ids"][b, :n].tolist() for b, n in enumerate(lens)]
        room = min(cfg.max_new_tokens, cfg.seq_len - min(lens))
        samples = gen.generate(prompts, on_policy.Sampling(room), on_policy.mix_seed(cfg.seed, 0, index))
        for b, (prompt, new) in enumerate(zip(prompts, samples)):
            sampled = [t for t in batch.labels[b].tolist() if t != IGNORE_INDEX]
            assert sampled == (prompt + new)[: cfg.seq_len][len(prompt) :]
        with torch.no_grad():
            for name, rows in (("teacher", p_rows), ("student", q_rows)):
                logits = f64[name](**batch.inputs).logits
                rows.append(torch.softmax(logits[batch.labels != IGNORE_INDEX], dim=-1))
    p, q = torch.cat(p_rows), torch.cat(q_rows)  # [N, V]: target and draft at each sampled token
    n, draws = p.shape[0], 4000
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(q, draws, replacement=True, generator=g)  # the draft's proposals
    accepted = (torch.rand(n, draws, generator=g, dtype=torch.float64) < p.gather(1, x) / q.gather(1, x)).double()
    measured = accepted.mean().item()
    se = math.sqrt((accepted.var(1) / draws).sum().item()) / n
    exact = torch.minimum(p, q).sum(-1).mean().item()
    assert n > 50 and 0.2 < exact < 0.9, "the pair should disagree visibly"
    assert abs(logged - measured) < 3 * se, (logged, measured, se)
    assert abs(logged - exact) < 1e-4, (logged, exact)


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_acceptance_is_sum_min_at_the_kd_temperature(chunk_size):
    """extra["acceptance"] = sum over supervised tokens of sum_x min(p_t(x), p_s(x)) at T = 2 (float64 reference),
    full logits and chunked (fused); the loss itself is the tvd loss's, untouched."""
    torch.manual_seed(0)
    B, T, H, V = 2, 5, 8, 11
    s_head, t_head = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    hs, ht = torch.randn(B, T, H) * 3, torch.randn(B, T, H) * 3
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = IGNORE_INDEX
    inner = LiveTeachers([SimpleNamespace(module=SimpleNamespace(head=t_head))])
    source = acceptance.AcceptanceRate(inner)
    kw = dict(chunk_size=chunk_size, num_chunks=None, loss="tvd", alpha=0.3, temperature=2.0)
    head = losses.OutputHead(s_head)
    out = source.loss_sums(hs, head, [ht], labels, **kw)
    plain = inner.loss_sums(hs, head, [ht], labels, **kw)
    assert torch.equal(out.total, plain.total) and torch.equal(out.kd, plain.kd)
    sel = labels != IGNORE_INDEX
    with torch.no_grad():
        p = torch.softmax(t_head(ht).double()[sel] / 2.0, -1)
        q = torch.softmax(s_head(hs).double()[sel] / 2.0, -1)
    ref = torch.minimum(p, q).sum()
    assert abs(out.extra["acceptance"].item() - ref.item()) < 1e-5
    assert 0 < ref.item() < sel.sum().item() - 0.5  # far from every draft accepted


def test_acceptance_is_wired_with_tvd_and_one_live_teacher_only(tiny, tmp_path):
    source = object()
    cfg = make_cfg(tiny, tmp_path, loss="tvd")
    assert isinstance(acceptance.wrap(cfg, source, one_live_teacher=True), acceptance.AcceptanceRate)
    assert acceptance.wrap(cfg, source, one_live_teacher=False) is source
    assert acceptance.wrap(make_cfg(tiny, tmp_path), source, one_live_teacher=True) is source


@pytest.mark.parametrize(
    "kw, says",
    [
        (dict(on_policy_sampler="target"), "must be student or teacher"),
        (dict(on_policy_sampler="teacher"), "needs --on_policy_fraction > 0"),
        (dict(on_policy_sampler="teacher", on_policy_fraction=1.0, alpha=1.0), "--alpha < 1"),
        (dict(on_policy_sampler="teacher", on_policy_fraction=1.0, n_teachers=2), "exactly one --teacher"),
    ],
)
def test_teacher_sampler_refusals(tiny, tmp_path, kw, says):
    kw = dict(kw)
    teachers = [tiny["teacher"]] * kw.pop("n_teachers", 1)
    with pytest.raises(UsageError, match=says):
        make_cfg(tiny, tmp_path, teacher=teachers, **kw).validate()
