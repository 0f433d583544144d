"""The extras around the loop: manifest, early stopping, per-example tracking, routers/ensembles, rounds (monitors:
tests/test_monitors.py).

Trainer runs are in-process on the tiny models (a few steps each); tracking on 2 ranks is read from the 2-rank run
of tests/test_multirank.py.
"""

import csv
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ds_distill import data, train
from ds_distill.common import UsageError, write_json_atomic
from ds_distill.config import RunConfig, parse_args
from ds_distill.core import trainer as trainer_mod
from ds_distill.extras import rounds
from ds_distill.extras.early_stopping import EarlyStopping
from ds_distill.extras.manifest import Manifest
from ds_distill.extras.tracking import ExampleTracker, hardest_examples, write_subset
from ds_distill.losses.objective import Objective
from ds_distill.losses.routing import LowestTeacherCE
from ds_distill.runtime.callbacks import Callback
from tests.helpers import ds_json, losses_of, make_cfg, tiny_args


def fixed_inputs(trainer, n=2):
    """A deterministic batch of the run's data (model inputs only)."""
    stream = data.BatchStream(
        trainer.train.dataset, batch_size=n, rank=0, world_size=1, seed=123, pad_token_id=trainer.tokenizer.pad_token_id
    )
    return next(stream).inputs


def engine_logits(trainer, inputs):
    with torch.no_grad():
        return trainer.student.module.head(trainer.student(**inputs)).float()


def hf_logits(path, inputs):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a live ZeRO-3 engine would make from_pretrained partition the plain model
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(**inputs).logits.float()


# --------------------------------------------------------------------------------------------------- routers
def test_routers_on_a_hand_made_example():
    # 2 teachers, vocabulary 3, 3 tokens; labels 0, 2 and one unsupervised token
    p1 = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]).log()
    p2 = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.2, 0.7], [0.9, 0.05, 0.05]]).log()
    labels = torch.tensor([0, 2, -100])
    # token 0: teacher 1 gives the label 0.7 > 0.5; token 1: teacher 2 gives 0.7 > 0.1; token 2: unsupervised -> uniform
    torch.testing.assert_close(LowestTeacherCE()([p1, p2], labels), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))


def fixed_route(weights):
    """A router giving every token the same normalised ``weights`` (what --router fixed does with [K] weights)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return lambda teacher_logprobs, labels: w.to(teacher_logprobs[0].dtype).expand(labels.shape[0], -1)


def mixture_loss_by_hand(student, teachers, batches, route, alpha):
    """Plain torch, float64: sum over supervised tokens of alpha * CE + (1 - alpha) * KL(mix || student), / tokens."""
    total, n = 0.0, 0
    for b in batches:
        inputs, labels = b.inputs, b.labels.reshape(-1)
        keep = labels != -100
        s = F.log_softmax(hf_logits(student, inputs).double(), -1).flatten(0, 1)[keep]  # [n, V]
        ts = [F.log_softmax(hf_logits(t, inputs).double(), -1).flatten(0, 1)[keep] for t in teachers]
        y = labels[keep]
        w = route(ts, y)  # [n, K]
        mix = sum(w[:, k : k + 1] * ts[k].exp() for k in range(len(ts)))
        kl = (mix * (mix.log() - s)).sum(-1)
        ce = -s.gather(-1, y[:, None])[:, 0]
        total += (alpha * ce + (1 - alpha) * kl).sum().item()
        n += int(keep.sum())
    return total / n


@pytest.fixture(scope="module")
def second_teacher(tiny, tmp_path_factory):
    from tests import tiny as tiny_mod

    return str(
        tiny_mod.make_model(
            tmp_path_factory.mktemp("t2") / "teacher2", tiny["tokenizer"], layers=1, hidden=32, heads=4, seed=7
        )
    )


@pytest.mark.parametrize("router", ["fixed", "lowest_ce", "custom"])
def test_two_teacher_mixture_equals_hand_computation(tiny, dist_env, tmp_path, second_teacher, router):
    """--router through build(), and a custom router plugged in by building the objective (over --teacher_weights)."""
    teachers = [tiny["teacher"], second_teacher]
    kw = dict(router="lowest_ce") if router == "lowest_ce" else dict(teacher_weights=[1.0, 3.0])
    cfg = make_cfg(
        tiny,
        tmp_path / router,
        teacher=teachers,
        max_steps=1,
        alpha=0.3,
        chunk_size=7,
        deepspeed_config=ds_json(tmp_path, gradient_accumulation_steps=2),
        **kw,
    )
    objective = Objective.from_config(cfg, router=LowestTeacherCE()) if router == "custom" else None
    trainer = train.run(cfg, train.default_callbacks(cfg), objective=objective)
    stream = data.BatchStream(
        trainer.train.dataset, batch_size=2, rank=0, world_size=1, seed=0, pad_token_id=trainer.tokenizer.pad_token_id
    )
    batches = [next(stream), next(stream)]
    route = fixed_route([1.0, 3.0]) if router == "fixed" else LowestTeacherCE()
    expected = mixture_loss_by_hand(tiny["student"], teachers, batches, route, alpha=0.3)
    assert losses_of(trainer)[0] == pytest.approx(expected, rel=1e-5)
    # the routing matters: the other mixture gives another loss
    other = LowestTeacherCE() if router == "fixed" else fixed_route([0.5, 0.5])
    assert abs(mixture_loss_by_hand(tiny["student"], teachers, batches, other, alpha=0.3) - expected) > 1e-4


def test_second_teacher_with_another_vocabulary_fails_at_start(tiny, dist_env, tmp_path):
    from tests import tiny as tiny_mod

    other = tiny_mod.make_model(
        tmp_path / "other", tiny_mod.make_tokenizer(tmp_path / "tok2", vocab_size=300), layers=1, hidden=32, heads=4
    )
    with pytest.raises(UsageError) as exc:  # main() prints it as one `error:` line and exits 2 (tests/test_train.py)
        train.run(make_cfg(tiny, tmp_path / "o", teacher=[tiny["teacher"], str(other)]))
    assert "different tokenizers" in str(exc.value) and repr(str(other)) in str(exc.value)
    assert not (tmp_path / "o" / "checkpoints").exists(), "it fails before any model loads"


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"step": 1, "checkpoints": ["a"]})

    def disk_full(fd):
        raise OSError("disk full")  # the new bytes are written to the temporary file, not yet on disk

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"step": 2, "checkpoints": ["a", "b"]})
    assert json.loads(path.read_text()) == {"step": 1, "checkpoints": ["a"]}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"], "no temporary file is left behind"


def test_manifest_and_example_tracking_after_a_run(tiny, dist_env, tmp_path):
    """4 steps of 2 x 16 examples = 2 epochs of the 64-example corpus; a checkpoint every 2 steps; the export."""
    out = tmp_path / "run"
    cfg = make_cfg(
        tiny,
        out,
        max_steps=4,
        save_steps=2,
        keep_last=0,
        log_steps=3,
        export=True,
        track_examples=True,
        deepspeed_config=ds_json(tmp_path, train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=2),
    )
    trainer = train.run(cfg, train.default_callbacks(cfg))
    assert any(isinstance(cb, ExampleTracker) for cb in trainer.callbacks)

    m = json.loads((out / "manifest.json").read_text())
    assert m["run_config"] == cfg.to_dict()
    assert (
        m["deepspeed"]["student"]["train_micro_batch_size_per_gpu"] == 16
        and "optimizer" not in m["deepspeed"]["teacher"]
    )
    assert m["versions"]["torch"] == torch.__version__.split("+")[0] or m["versions"]["torch"] == torch.__version__
    assert all(m["versions"][p] for p in ("deepspeed", "transformers", "datasets", "ds_distill"))
    assert m["git"] is None or len(m["git"]["commit"]) == 40
    assert m["data"]["train_fingerprint"] == trainer.train.dataset._fingerprint
    assert (
        m["data"]["train_file"]["bytes"] == Path(tiny["data"]).stat().st_size
        and len(m["data"]["train_file"]["sha256"]) == 64
    )
    assert [(c["tag"], c["step"]) for c in m["checkpoints"]] == [("step_00000002", 2), ("step_00000004", 4)]
    assert m["checkpoints"][0]["metrics"] == {}, "log_steps 3: nothing logged before the step-2 checkpoint"
    assert (
        m["checkpoints"][1]["metrics"]["Train/step"] == 4
        and m["checkpoints"][1]["metrics"]["Train/loss"] == losses_of(trainer)[-1]
    )
    assert m["exports"]["final"]["step"] == 4 and m["exports"]["final"]["path"] == str(out / "final")
    assert m["results"]["step"] == 4 and m["results"]["exit_code"] == 0
    assert m["results"]["metrics"]["Train/loss"] == losses_of(trainer)[-1]

    with open(out / "examples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    n = len(trainer.train.dataset)
    assert n == 64, "the corpus fills 2 epochs of 32 examples per step exactly"
    for epoch, steps in ((0, {1, 2}), (1, {3, 4})):
        ids = [int(r["example_id"]) for r in rows if int(r["epoch"]) == epoch]
        assert sorted(ids) == list(range(n)), f"every example exactly once in epoch {epoch}"
        assert {int(r["step"]) for r in rows if int(r["epoch"]) == epoch} == steps
    assert Counter(int(r["step"]) for r in rows) == {s: 32 for s in range(1, 5)}

    # one example of step 1 recomputed by hand from the initial student and the teacher (forward KL, T = 1)
    row = next(r for r in rows if int(r["step"]) == 1)
    ex = trainer.train.dataset[[int(row["example_id"])]]
    batch = data.Batch.collate(ex, trainer.tokenizer.pad_token_id, epoch=0, position=0)
    inputs, labels = batch.inputs, batch.labels[0]
    keep = labels != -100
    s = F.log_softmax(hf_logits(tiny["student"], inputs)[0].double(), -1)[keep]
    t = F.log_softmax(hf_logits(tiny["teacher"], inputs)[0].double(), -1)[keep]
    ce = -s.gather(-1, labels[keep][:, None]).sum().item()
    kd = (t.exp() * (t - s)).sum().item()
    assert float(row["ce"]) == pytest.approx(ce, rel=1e-4) and float(row["kd"]) == pytest.approx(kd, rel=1e-4)
    assert int(row["tokens"]) == int(keep.sum())

    # data selection: the hardest third by CE per token, written as a new corpus that keeps the ids
    hard = hardest_examples(out / "examples.csv", 1 / 3)
    assert len(hard) == math.ceil(64 / 3)
    assert write_subset(tiny["data"], hard, str(tmp_path / "hard.jsonl")) == len(hard)
    subset = data.get_dataset(str(tmp_path / "hard.jsonl"), trainer.tokenizer, seq_len=32)
    assert set(subset["id"]) == hard
    filtered = data.get_dataset(tiny["data"], trainer.tokenizer, seq_len=32, example_filter=lambda r: r["id"] in hard)
    assert filtered["input_ids"] == subset["input_ids"]


def test_hardest_examples_uses_latest_per_token_values(tmp_path):
    path = tmp_path / "examples.csv"
    rows = [
        (1, 0, 0, 10.0, 1.0, 10),
        (1, 0, 1, 4.0, 1.0, 2),
        (1, 0, 2, 1.0, 9.0, 1),  # per-token CE: 1, 2, 1
        (2, 1, 0, 30.0, 1.0, 10),
    ]  # example 0 later: 3 per token
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "epoch", "example_id", "ce", "kd", "tokens"])
        w.writerows(rows)
    assert hardest_examples(path, 0.34) == {0, 1}
    assert hardest_examples(path, 0.1) == {0}
    assert hardest_examples(path, 0.1, key="kd") == {2}


# ------------------------------------------------------------------------------------------ early stopping
def test_early_stopping_on_a_scripted_eval_curve(tiny, dist_env, tmp_path, monkeypatch):
    # best at step 2; step 4 improves by less than min_delta; patience 3 runs out at step 5
    curve = {1: 3.0, 2: 2.0, 3: 2.5, 4: 1.95, 5: 2.1, 6: 1.0}

    monkeypatch.setattr(trainer_mod.Trainer, "eval_metrics", lambda self: {"loss": curve[self.step]})
    snapshots, saves = {}, []

    class Snapshot(Callback):
        def on_step_end(self, trainer, sums):
            snapshots.setdefault("inputs", fixed_inputs(trainer))
            snapshots[trainer.step] = engine_logits(trainer, snapshots["inputs"])

        def on_eval(self, trainer, metrics):
            if trainer.step == 3:  # the manifest already names the new best, before the run ends
                m = json.loads((trainer.output_dir / "manifest.json").read_text())
                snapshots["manifest_best_at_3"] = m["exports"]["best"]["step"]

        def on_save(self, trainer, tag):
            saves.append(trainer.step)

    out = tmp_path / "es"
    # save_steps 2: the new best at step 2 falls on a regular save, and the loop still saves it once
    cfg = make_cfg(
        tiny,
        out,
        max_steps=8,
        eval_steps=1,
        save_steps=2,
        eval_fraction=0.25,
        export=True,
        deepspeed_config=ds_json(tmp_path),
    )
    trainer = train.run(cfg, [EarlyStopping(patience=3, min_delta=0.1), Manifest(), Snapshot()])
    assert trainer.step == 5 and not (out / "final").exists()
    assert json.loads((out / "best" / "export.json").read_text())["step"] == 2
    assert json.loads((out / "best" / "early_stopped.json").read_text()) == {"stopped_at": 5, "best_step": 2}
    best = hf_logits(out / "best", snapshots["inputs"])
    torch.testing.assert_close(best, snapshots[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(best, snapshots[5], atol=1e-4), "the steps after the best must have moved the weights"
    m = json.loads((out / "manifest.json").read_text())
    assert m["exports"]["best"]["step"] == 2 and m["results"]["step"] == 5 and snapshots["manifest_best_at_3"] == 2
    assert saves == [1, 2, 4, 5], "each new best (1, 2), the save_steps (2, 4) and the stop (5): every step saved once"
    assert [c["step"] for c in m["checkpoints"]] == [1, 2, 4, 5]


def test_extra_flags_wire_callbacks_and_validate(tiny, tmp_path):
    base = tiny_args(tiny, tmp_path)
    cfg = parse_args(base + ["--track_examples", "--early_stopping_patience", "2", "--router", "lowest_ce"])
    names = [type(cb).__name__ for cb in train.default_callbacks(cfg)]
    assert names == ["Preemption", "EarlyStopping", "ExampleTracker", "Manifest"]
    plain = [type(cb).__name__ for cb in train.default_callbacks(parse_args(base))]
    assert plain == ["Preemption", "Manifest"], "every extra off: nothing else runs around the step"
    assert Manifest.on_step_end is Callback.on_step_end and Manifest.should_stop is Callback.should_stop, (
        "no per-step work"
    )
    with pytest.raises(UsageError) as exc:
        parse_args(
            base + ["--early_stopping_patience", "2", "--eval_fraction", "0", "--router", "best", "--rounds", "0"]
        ).validate()
    for part in ("--early_stopping_patience needs an eval set", "--router 'best'", "--rounds 0 must be >= 1"):
        assert part in str(exc.value)


# ------------------------------------------------------------------------------------------------ rounds
def test_rounds_chain_exports_and_resume_in_the_right_round(tiny, dist_env, tmp_path):
    out = tmp_path / "rounds"
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps([{}, {"temperature": 2.0}]))
    cfg_ds = ds_json(tmp_path)
    built, starts = [], {}

    class StopAtStep1(Callback):
        """Preemption in round 2: stop (and checkpoint) after step 1, exit code 75."""

        def should_stop(self, trainer):
            return trainer.step == 1

        def on_stop(self, trainer):
            return 75

    class Start(Callback):
        def on_train_start(self, trainer):
            starts[trainer.cfg.output_dir] = (
                trainer.step,
                fixed_inputs(trainer),
                engine_logits(trainer, fixed_inputs(trainer)),
            )

    def factory(kill):
        def callbacks(rcfg):
            built.append(Path(rcfg.output_dir).name)
            extra = [StopAtStep1()] if kill and rcfg.output_dir.endswith("round_2") else []
            return [Start(), *extra, Manifest()]

        return callbacks

    cfg = make_cfg(
        tiny, out, max_steps=2, rounds=2, round_overrides=str(overrides), export=True, deepspeed_config=cfg_ds
    )
    first = rounds.run_rounds(cfg, factory(kill=True))
    assert built == ["round_1", "round_2"] and first[-1].exit_code == 75 and first[-1].step == 1
    assert (out / "round_1" / "final" / "config.json").is_file() and not (out / "round_2" / "final").exists()
    assert (out / "round_2" / "checkpoints" / "latest").read_text() == "step_00000001"
    # round 2 started from round 1's export, with its own temperature
    step, inputs, logits = starts[str(out / "round_2")]
    assert step == 0
    torch.testing.assert_close(logits, hf_logits(out / "round_1" / "final", inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, hf_logits(tiny["student"], inputs), atol=1e-4)
    r2 = json.loads((out / "round_2" / "run_config.json").read_text())
    assert r2["temperature"] == 2.0 and r2["student"] == str(out / "round_1" / "final")
    round1_latest = (out / "round_1" / "checkpoints" / "latest").stat().st_mtime_ns

    built.clear()
    cfg.resume = True
    second = rounds.run_rounds(cfg, factory(kill=False))
    assert built == ["round_2"], "round 1 is complete and not re-run"
    assert starts[str(out / "round_2")][0] == 1 and second[-1].history[0]["step"] == 2
    assert second[-1].exit_code == 0 and (out / "round_2" / "final" / "config.json").is_file()
    assert second[-1].student is None and second[-1].teachers is None, "a finished round releases its engines"
    assert (out / "round_1" / "checkpoints" / "latest").stat().st_mtime_ns == round1_latest
    assert json.loads((out / "round_2" / "manifest.json").read_text())["attempts"] == 2
    assert rounds.run_rounds(cfg, factory(kill=False)) == [] and built == ["round_2"], "all rounds done: nothing runs"


def test_round_overrides_are_checked(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"temprature": 2.0}, {"output_dir": "x"}]))
    with pytest.raises(UsageError) as exc:
        rounds.load_overrides(RunConfig(rounds=2, round_overrides=str(bad)))
    assert "round 1: 'temprature' is not a run-config field" in str(exc.value)
    assert "round 2: 'output_dir' cannot change between rounds" in str(exc.value)
    bad.write_text(json.dumps([{}]))
    with pytest.raises(UsageError, match="list of 2 objects"):
        rounds.load_overrides(RunConfig(rounds=2, round_overrides=str(bad)))


def test_losses_accept_a_router_as_teacher_weights():
    from ds_distill import losses

    torch.manual_seed(0)
    B, T, V, H = 2, 5, 11, 4
    s_h, t1_h, t2_h = torch.randn(B, T, H), torch.randn(B, T, H), torch.randn(B, T, H)
    heads = [torch.nn.Linear(H, V) for _ in range(3)]
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    kw = dict(loss="forward_kl", alpha=0.3, temperature=2.0)
    logits = [h(x).detach() for h, x in zip(heads, (s_h, t1_h, t2_h))]
    # a fixed-weights router == the [K] weights, on both paths
    ref = losses.loss_sums(logits[0], logits[1:], labels, teacher_weights=torch.tensor([1.0, 3.0]), **kw)
    full = losses.loss_sums(logits[0], logits[1:], labels, teacher_weights=fixed_route([1.0, 3.0]), **kw)
    chunked = losses.chunked_loss_sums(
        s_h, heads[0], [t1_h, t2_h], heads[1:], labels, chunk_size=3, teacher_weights=fixed_route([1.0, 3.0]), **kw
    )
    for out in (full, chunked):
        torch.testing.assert_close(out.total, ref.total)
        torch.testing.assert_close(out.kd_per_seq, ref.kd_per_seq)
    # lowest_ce == the per-token [B, T, K] one-hot weights of the teacher with the higher probability of the label
    # (T = 1)
    lp = [F.log_softmax(t, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] for t in logits[1:]]
    per_token = F.one_hot((lp[1] > lp[0]).long(), 2).float()  # [B, T, K]
    ref = losses.loss_sums(logits[0], logits[1:], labels, teacher_weights=per_token, **kw)
    routed = losses.chunked_loss_sums(
        s_h, heads[0], [t1_h, t2_h], heads[1:], labels, chunk_size=3, teacher_weights=LowestTeacherCE(), **kw
    )
    torch.testing.assert_close(routed.total, ref.total)
    torch.testing.assert_close(routed.kd_per_seq, ref.kd_per_seq)
