"""On-policy distillation (ds_distill/on_policy.py) and ds_distill.generate on tiny random models, in process."""

import json

import pytest
import torch
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill import on_policy, train
from ds_distill.common import IGNORE_INDEX
from ds_distill.data import get_dataset
from tests.helpers import ds_json, losses_of, op_cfg


class Scripted:
    """A generator that returns fixed completions (and records its calls)."""

    def __init__(self, completions, stop_token_ids=()):
        self.completions, self.calls, self.stop_token_ids = completions, [], list(stop_token_ids)

    def generate(self, prompts, sampling, seed):
        self.calls.append((prompts, sampling, seed))
        return [list(self.completions[i % len(self.completions)]) for i in range(len(prompts))]


class ListStream:
    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_sampled_rows_supervise_exactly_the_generated_tokens(tiny, pc_data):
    """prompt -> -100; sample up to and including eos supervised; past eos and past seq_len nothing."""
    tok = tiny["tokenizer"]
    ds = get_dataset(pc_data, tok, seq_len=24)
    rows = ds[:3]
    from ds_distill.data import Batch

    batch = Batch.collate(rows, tok.pad_token_id, epoch=3, position=6)
    records = [json.loads(l) for l in open(pc_data)]
    lens = {i: len(tok(records[i]["prompt"])["input_ids"]) for i in rows["row"]}  # prompt tokens of each record
    eos = tok.eos_token_id
    gen = Scripted([[50, 51, eos], [60], list(range(100, 140))])  # ends at eos / no eos / longer than seq_len
    stream = on_policy.OnPolicyStream(
        ListStream([batch]),
        gen,
        fraction=1.0,
        sampling=on_policy.Sampling(8),
        seq_len=24,
        pad_token_id=tok.pad_token_id,
        seed=0,
        rank=0,
    )
    out = next(stream)
    assert out.example_ids.tolist() == rows["row"] and (out.epoch, out.position) == (3, 6)  # the same examples
    for b, (ids, i) in enumerate(zip(rows["input_ids"], rows["row"])):
        P = lens[i]
        prompt = tok(records[i]["prompt"])["input_ids"]
        assert ids[:P] == prompt and on_policy.prompt_length(rows["labels"][b]) == P  # read from the mask
        new = gen.completions[b][: 24 - P]
        seq = prompt + new
        assert out.inputs["input_ids"][b, : len(seq)].tolist() == seq
        T = out.inputs["input_ids"].shape[1]
        assert out.inputs["attention_mask"][b].tolist() == [1] * len(seq) + [0] * (T - len(seq))
        expect = [IGNORE_INDEX] * (P - 1) + new + [IGNORE_INDEX] * (out.labels.shape[1] - P + 1 - len(new))
        assert out.labels[b].tolist() == expect
    # The generator was asked for the prompts, with the room left before seq_len.
    prompts, sampling, _ = gen.calls[0]
    assert prompts == [ids[: lens[i]] for ids, i in zip(rows["input_ids"], rows["row"])]
    assert sampling.max_new_tokens == min(8, 24 - min(lens.values()))


def test_hf_generator_stops_at_eos_and_follows_the_model(tiny):
    """top_k=1 is greedy: the samples equal the argmax of the model's own forward, cut after eos; seeded sampling
    is reproducible and does not touch the global RNG."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = tiny["tokenizer"]
    on_policy_lm = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    prompts = [[1, 30, 31, 32, 33, 34], [1, 40]]
    ref = []
    for p in prompts:
        ids = list(p)
        for _ in range(6):
            ids.append(int(on_policy_lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        ref.append(ids[len(p) :])
    eos = ref[1][0]  # tiny random models repeat the last token: row 1 hits this eos at once, row 0 never
    gen = on_policy.HFGenerator(
        lambda: on_policy_lm, tok, generation_config=GenerationConfig(eos_token_id=eos), synced=False
    )
    state = torch.random.get_rng_state()
    out = gen.generate(prompts, on_policy.Sampling(6, top_k=1), seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    for got, want in zip(out, ref):
        assert got == (want[: want.index(eos) + 1] if eos in want else want)
    assert len(out[0]) == 6 and out[1] == [eos]
    a = gen.generate(prompts, on_policy.Sampling(6, temperature=2.0), seed=5)
    assert a == gen.generate(prompts, on_policy.Sampling(6, temperature=2.0), seed=5)
    assert a != gen.generate(prompts, on_policy.Sampling(6, temperature=2.0), seed=6)


def test_zero_fraction_is_the_off_policy_run(tiny, pc_data, dist_env, tmp_path):
    """L = 0 is today's run to the bit; so is a wrapped stream whose draws never pick a micro-batch."""
    cfg_ds = ds_json(tmp_path)
    off = train.run(op_cfg(tiny, pc_data, tmp_path / "off", deepspeed_config=cfg_ds))
    zero = train.run(op_cfg(tiny, pc_data, tmp_path / "zero", deepspeed_config=cfg_ds, on_policy_fraction=0.0))
    never = train.run(op_cfg(tiny, pc_data, tmp_path / "never", deepspeed_config=cfg_ds, on_policy_fraction=1e-9))
    assert isinstance(never.train, on_policy.OnPolicyStream) and not isinstance(zero.train, on_policy.OnPolicyStream)
    assert losses_of(off) == losses_of(zero) == losses_of(never)
    assert abs(losses_of(off)[0] - losses_of(off)[-1]) > 1e-3


def test_whole_and_layered_generation_agree_and_resume_continues_the_curve(tiny, pc_data, dist_env, tmp_path):
    """ZeRO-3: the gathered copy and the per-layer path sample the same tokens (same losses); a run stopped and
    resumed mid on-policy training continues the same loss curve."""
    cfg_ds = ds_json(tmp_path)
    kw = dict(deepspeed_config=cfg_ds, on_policy_fraction=0.5, max_steps=4)
    whole = train.run(op_cfg(tiny, pc_data, tmp_path / "w", generation_gather="whole", **kw))
    layered = train.run(op_cfg(tiny, pc_data, tmp_path / "l", generation_gather="layered", **kw))
    off = train.run(op_cfg(tiny, pc_data, tmp_path / "o", deepspeed_config=cfg_ds, max_steps=4))
    assert losses_of(whole) == pytest.approx(losses_of(layered), rel=1e-5, abs=1e-6)
    assert losses_of(whole) != pytest.approx(losses_of(off), rel=1e-3)  # some micro-batches were sampled
    assert [h for h in whole.history if "Generate/tokens" in h], "generation tokens/s is logged"

    first = train.run(op_cfg(tiny, pc_data, tmp_path / "r", save_steps=2, **{**kw, "max_steps": 2}))
    second = train.run(op_cfg(tiny, pc_data, tmp_path / "r", resume=True, **kw))
    assert losses_of(first) + losses_of(second) == pytest.approx(losses_of(whole), rel=1e-5, abs=1e-6)


def test_on_policy_second_round_resumes_in_that_round(tiny, pc_data, dist_env, tmp_path):
    """--rounds 2 with {"on_policy_fraction": 1.0} for round 2: a job stopped in round 2 resumes there (round 1 is
    skipped) and continues round 2's loss curve."""
    from ds_distill.extras import rounds
    from ds_distill.runtime.callbacks import Callback

    class StopInRound2(Callback):
        def should_stop(self, trainer):
            return trainer.cfg.on_policy_fraction == 1.0 and trainer.step == 1

    overrides = tmp_path / "r.json"
    overrides.write_text(json.dumps([{}, {"on_policy_fraction": 1.0}]))
    kw = dict(deepspeed_config=ds_json(tmp_path), rounds=2, round_overrides=str(overrides), max_steps=2, export=True)
    straight = rounds.run_rounds(op_cfg(tiny, pc_data, tmp_path / "a", **kw), lambda c: [])
    assert [t.cfg.on_policy_fraction for t in straight] == [0.0, 1.0]
    assert isinstance(straight[1].train, on_policy.OnPolicyStream)
    stopped = rounds.run_rounds(op_cfg(tiny, pc_data, tmp_path / "b", **kw), lambda c: [StopInRound2()])
    assert len(stopped) == 2 and stopped[1].step == 1
    resumed = rounds.run_rounds(op_cfg(tiny, pc_data, tmp_path / "b", resume=True, **kw), lambda c: [])
    assert len(resumed) == 1 and resumed[0].history[0]["step"] == 2
    assert losses_of(stopped[1]) + losses_of(resumed[0]) == pytest.approx(losses_of(straight[1]), rel=1e-5, abs=1e-6)


def test_tracking_on_policy_gives_each_example_its_epoch_across_a_boundary_and_a_resume(
    tiny, pc_data, dist_env, tmp_path
):
    """--track_examples with --on_policy_fraction: examples.csv names every micro-batch's examples with the epoch they
    were drawn in, also in the step that crosses an epoch boundary (micro-batch 5 x accumulation 3, an epoch of 8
    micro-batches) and in a run resumed just before that step."""
    from ds_distill import data
    from ds_distill.extras.tracking import read_examples

    A, B, steps = 3, 5, 4
    kw = dict(
        deepspeed_config=ds_json(tmp_path, train_micro_batch_size_per_gpu=B, gradient_accumulation_steps=A),
        on_policy_fraction=0.5,
        track_examples=True,
        max_steps=steps,
    )

    def tracked(out):
        return sorted(
            (int(r["step"]), int(r["epoch"]), int(r["example_id"])) for r in read_examples(out / "examples.csv")
        )

    straight = train.run(cfg := op_cfg(tiny, pc_data, tmp_path / "s", **kw), train.default_callbacks(cfg))
    # The examples each micro-batch g (of step g // A + 1) reads and its epoch, from the batch stream itself.
    ref = data.BatchStream(straight.train.dataset, batch_size=B, rank=0, world_size=1, seed=0, pad_token_id=0)
    per_epoch = len(straight.train.dataset) // B
    assert per_epoch % A and per_epoch < A * steps, "an epoch must end inside one of the steps"
    want = []
    for g in range(A * steps):
        b = next(ref)
        assert b.epoch == g // per_epoch
        want += [(g // A + 1, b.epoch, i) for i in b.example_ids.tolist()]
    want.sort()
    assert tracked(tmp_path / "s") == want
    crossing = per_epoch // A + 1  # the step with micro-batches of epochs 0 and 1
    assert {epoch for step, epoch, _ in want if step == crossing} == {0, 1}
    assert any(h.get("Generate/tokens") for h in straight.history), "some micro-batches were sampled by the student"

    first = op_cfg(tiny, pc_data, tmp_path / "r", save_steps=crossing - 1, **{**kw, "max_steps": crossing - 1})
    train.run(first, train.default_callbacks(first))
    second = op_cfg(tiny, pc_data, tmp_path / "r", resume=True, **kw)
    assert train.run(second, train.default_callbacks(second)).history[0]["step"] == crossing  # it crosses the boundary
    assert tracked(tmp_path / "r") == want


# ---------------------------------------------------------------- collapse monitors (on_policy/monitors.py)
def test_sample_counts_and_window_metrics_by_hand():
    """distinct-n within each sample (the stop token left out), pooled; length with the stop token; eos rate."""
    eos = 2
    counts = on_policy.sample_counts([[5, 6, 5, 6, eos], [7, 7, 7], [8]], [eos, 3])
    # samples, tokens, eos, unique/all unigrams, unique/all bigrams: (5,6),(6,5),(5,6) + (7,7),(7,7) + none
    assert counts == [3, 9, 1, 2 + 1 + 1, 4 + 3 + 1, 2 + 1 + 0, 3 + 2 + 0]
    m = on_policy.window_metrics(counts, nll=6.0, nll_tokens=4.0)
    assert m == {"self_nll": 1.5, "distinct_1": 0.5, "distinct_2": 0.6, "length": 3.0, "eos_rate": 1 / 3}
    assert all(v != v for v in on_policy.window_metrics([0] * 7, 0.0, 0.0).values())  # no samples: NaN, no warning
    assert on_policy.CollapseWatch(0.5, 0.75).check(on_policy.window_metrics([0] * 7, 0.0, 0.0)) == []


def test_collapse_watch_warns_once_per_crossing():
    healthy = dict(distinct_1=0.8, distinct_2=0.95, length=30.0, eos_rate=0.2)
    watch = on_policy.CollapseWatch(distinct2_floor=0.5, self_nll_fraction=0.75)
    assert watch.check({**healthy, "self_nll": 4.0}) == []  # the first window sets the reference, 4.0
    assert watch.check({**healthy, "self_nll": 3.1}) == []  # 0.775 of it: above the fraction
    lines = watch.check({**healthy, "distinct_2": 0.2, "self_nll": 2.9})  # both crossed: one line each
    assert len(lines) == 2 and "distinct-2" in lines[0] and "0.200" in lines[0] and "2.900" in lines[1]
    assert all("\n" not in line for line in lines)
    assert watch.check({**healthy, "distinct_2": 0.1, "self_nll": 2.5}) == []  # still crossed: said already
    assert watch.check({**healthy, "self_nll": 3.5}) == []  # recovered
    assert len(watch.check({**healthy, "distinct_2": 0.3, "self_nll": 3.5})) == 1  # crossed again: said again
    off = on_policy.CollapseWatch(distinct2_floor=0.0, self_nll_fraction=0.0)
    assert off.check({**healthy, "self_nll": 4.0}) == off.check({**healthy, "distinct_2": 0.0, "self_nll": 0.1}) == []


def test_a_student_that_repeats_one_token_trips_the_warning_a_healthy_one_does_not(
    tiny, pc_data, dist_env, tmp_path, caplog
):
    """Real runs of the tiny student (all micro-batches sampled): greedy decoding (top_k 1) of a tiny random model
    repeats one token, which trips the distinct-2 warning; sampling at temperature 1 from it is diverse and trips
    nothing. The monitors are the samples' own statistics and the loss's own CE on them (self_nll = Train/ce when
    every micro-batch is sampled), logged every step to the history and the csv monitor."""
    import csv
    import logging

    kw = dict(deepspeed_config=ds_json(tmp_path), on_policy_fraction=1.0, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="ds_distill.on_policy"):
        greedy = train.run(op_cfg(tiny, pc_data, tmp_path / "greedy", top_k=1, **kw))
    warned = [r.getMessage() for r in caplog.records if "collapse" in r.getMessage()]
    assert len(warned) == 1 and "distinct-2" in warned[0], warned  # once, at the first step, not at every step
    gen = [h for h in greedy.history if "Generate/distinct_2" in h]
    assert len(gen) == 3 and all(h["Generate/distinct_2"] < 0.5 for h in gen)
    train_ce = losses_of(greedy, "Train/ce")
    assert [h["Generate/self_nll"] for h in gen] == pytest.approx(train_ce, rel=1e-6)
    rows = list(csv.reader(open(tmp_path / "greedy" / "monitor" / "train" / "Generate_distinct_2.csv")))
    assert [float(r[1]) for r in rows[1:]] == pytest.approx([h["Generate/distinct_2"] for h in gen])

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ds_distill.on_policy"):
        sampled = train.run(op_cfg(tiny, pc_data, tmp_path / "sampled", **kw))
    assert not [r for r in caplog.records if "collapse" in r.getMessage()]
    gen = [h for h in sampled.history if "Generate/distinct_2" in h]
    assert len(gen) == 3 and all(h["Generate/distinct_2"] > 0.9 for h in gen)
    assert all(0 <= h["Generate/eos_rate"] <= 1 and 1 <= h["Generate/length"] <= 8 for h in gen)


# ---------------------------------------------------------------- the anchor (on_policy/anchor.py)
def test_stabiliser_flags_out_of_range_are_refused_together(tiny, pc_data, tmp_path):
    from ds_distill.common import UsageError

    bad = dict(
        on_policy_anchor=0.5, entropy_threshold=-1.0, collapse_distinct2_floor=1.5, collapse_self_nll_fraction=-0.1
    )
    with pytest.raises(UsageError) as err:
        op_cfg(tiny, pc_data, tmp_path / "x", **bad).validate()
    for name in ("--on_policy_anchor 0.5", "--entropy_threshold -1.0", "--collapse_distinct2_floor 1.5", "-0.1"):
        assert name in str(err.value)
    assert "\n" not in str(err.value)
    op_cfg(
        tiny, pc_data, tmp_path / "x", on_policy_fraction=0.5, on_policy_anchor=0.5, entropy_threshold=float("inf")
    ).validate()


def _sgd_zero3(tmp_path, micro):
    """cpu_zero3.json with plain SGD at lr 1, no clipping (0: DeepSpeed's default is 1.0), no scheduler: a step is
    exactly p -= grad."""
    from ds_distill.ds_config import REPO_CONFIGS

    d = json.loads((REPO_CONFIGS / "cpu_zero3.json").read_text())
    for key in ("scheduler", "csv_monitor"):
        d.pop(key)
    d["optimizer"] = {"type": "SGD", "params": {"lr": 1.0}}
    d["zero_allow_untested_optimizer"] = True
    d.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, gradient_clipping=0.0)
    path = tmp_path / "sgd.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_anchor_zero_is_todays_run_and_a_weight_changes_it(tiny, pc_data, dist_env, tmp_path):
    from ds_distill.teachers.live import LiveTeachers

    kw = dict(deepspeed_config=ds_json(tmp_path), on_policy_fraction=0.5, max_steps=3)
    today = train.run(op_cfg(tiny, pc_data, tmp_path / "t", **kw))
    zero = train.run(op_cfg(tiny, pc_data, tmp_path / "z", on_policy_anchor=0.0, **kw))
    anchored = train.run(op_cfg(tiny, pc_data, tmp_path / "a", on_policy_anchor=1.0, **kw))
    assert type(zero.teachers) is LiveTeachers and not zero.train.anchor  # nothing wired, no batch kept
    assert losses_of(zero) == losses_of(today) and "Train/anchor_ce" not in zero.history[0]
    assert isinstance(anchored.teachers, on_policy.anchor.AnchoredTeachers)
    assert losses_of(anchored) != pytest.approx(losses_of(today), rel=1e-3)
    assert any(h.get("Train/anchor_ce", 0) > 0 for h in anchored.history)  # logged where a micro-batch was sampled


def test_anchor_step_is_the_sum_computed_directly(tiny, pc_data, dist_env, tmp_path, monkeypatch):
    """One plain-SGD step under ZeRO-3 (the student runs twice before one backward): the update is minus the gradient
    of [the sampled rows' loss + W x the dataset completions' CE sum] / sampled tokens, computed with plain Hugging
    Face models; the logged anchor_ce is that CE sum per sampled token."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from ds_distill import data, losses
    from ds_distill.on_policy import stream as stream_mod

    W, micro = 0.5, 4
    gen = Scripted([[40, 41, 42], [50, tiny["tokenizer"].eos_token_id], [60, 61, 62, 63, 64]])
    monkeypatch.setattr(stream_mod, "make_generator", lambda *a, **k: (gen, "scripted"))
    cfg = op_cfg(
        tiny,
        pc_data,
        tmp_path / "a",
        deepspeed_config=_sgd_zero3(tmp_path, micro),
        on_policy_fraction=1.0,
        on_policy_anchor=W,
        max_steps=1,
    )
    trainer = train.run(cfg)
    import deepspeed

    params = dict(trainer.student.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        after = {k: v.detach().clone().float() for k, v in params.items()}

    # The step's micro-batch (the anchor) and its sampled rows, rebuilt from the data and the same scripted samples.
    pad = tiny["tokenizer"].pad_token_id
    kept = data.BatchStream(trainer.train.dataset, batch_size=micro, rank=0, world_size=1, seed=0, pad_token_id=pad)
    batch = next(kept)
    sampled = next(
        on_policy.OnPolicyStream(
            ListStream([batch]),
            gen,
            fraction=1.0,
            sampling=on_policy.Sampling(8),
            seq_len=24,
            pad_token_id=pad,
            seed=0,
            rank=0,
        )
    )
    unset_hf_deepspeed_config()
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        t_logits = teacher(**sampled.inputs).logits
    kd = losses.loss_sums(student(**sampled.inputs).logits, [t_logits], sampled.labels, **trainer.objective.loss_kw())
    logits = student(**batch.inputs).logits
    ce_sum = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    ((kd.total + W * ce_sum) / kd.n_tokens).backward()
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    assert set(after) == set(before)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in student.parameters())).item()
    assert norm > 1e-2, "a step that barely moves proves nothing"
    (logged,) = [h for h in trainer.history if "Train/loss" in h]
    assert logged["Train/anchor_ce"] == pytest.approx((ce_sum / kd.n_tokens).item(), rel=1e-5)
    assert logged["Train/loss"] == pytest.approx(((kd.total + W * ce_sum) / kd.n_tokens).item(), rel=1e-5)
    for name, p in student.named_parameters():
        torch.testing.assert_close(
            after[name] - before[name], -p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )


# The tests below call entry points' main(), which tears the process group down (as a real run does at exit); the
# engine-building tests above run first, on the session's group.


def test_on_policy_needs_prompts_and_no_packing(tiny, dist_env, tmp_path, capsys):
    base = [
        "--teacher",
        tiny["teacher"],
        "--student",
        tiny["student"],
        "--output_dir",
        str(tmp_path / "x"),
        "--max_steps",
        "1",
    ]
    assert train.main([*base, "--data", tiny["data"], "--on_policy_fraction", "0.5"]) == 2
    assert "--on_policy_fraction needs prompts" in capsys.readouterr().err
    assert train.main([*base, "--data", tiny["data"], "--on_policy_fraction", "0.5", "--packing"]) == 2
    assert "drop --packing" in capsys.readouterr().err
    # A conversation's prompt is everything before its last assistant reply.
    assert on_policy.prompt_length([-100, -100, 5, 6, -100, -100, -100, 7, 8, -100, -100]) == 8
    assert on_policy.prompt_length([-100, 5, -100]) == 2 and on_policy.prompt_length([5, 6, -100]) == 1


def test_generate_writes_records_and_resumes(tiny, pc_data, tmp_path, capsys):
    """Greedy (top_k=1) completions equal the model's own argmax continuation; a rerun redoes only missing prompts."""
    from transformers import AutoModelForCausalLM

    from ds_distill import generate

    tok = tiny["tokenizer"]
    prompts = [json.loads(l)["prompt"] for l in open(pc_data).readlines()[:5]]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "extra": 1}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    args = [
        "--model",
        tiny["student"],
        "--data",
        str(src),
        "--output",
        str(out),
        "--max_new_tokens",
        "4",
        "--batch_size",
        "2",
    ]
    assert generate.main([*args, "--top_k", "1"]) == 0
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3, 4] and [r["prompt"] for r in records] == prompts
    unset_hf_deepspeed_config()
    lm = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    for r in records:
        ids = tok(r["prompt"])["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(4):
                new.append(int(lm(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert r["completion"] == tok.decode(new)
    assert not list(tmp_path.glob("out.jsonl.rank*"))

    # Resume: drop two records and rerun with another seed and sampling: only those two are written again.
    sampled = [*args, "--temperature", "2.0", "--seed", "7"]
    kept = [l for n, l in enumerate(out.read_text().splitlines(keepends=True)) if n not in (1, 3)]
    out.write_text("".join(kept))
    assert generate.main(sampled) == 0
    again = out.read_text().splitlines(keepends=True)
    assert [json.loads(l)["id"] for l in again] == [0, 1, 2, 3, 4]
    assert [again[n] for n in (0, 2, 4)] == kept
    assert generate.main(sampled) == 0 and out.read_text() == "".join(again)  # nothing left to do

    assert (
        generate.main(["--model", tiny["student"], "--data", tiny["data"], "--output", str(tmp_path / "x.jsonl")]) == 2
    )
    assert "no 'prompt'" in capsys.readouterr().err
