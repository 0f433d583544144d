"""The real entry point on tiny random models, in one process: invariances, resume, export, bad input."""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill import train
from ds_distill.core import trainer as trainer_mod
from ds_distill.ds_config import REPO_CONFIGS
from ds_distill.runtime.callbacks import Callback
from tests.helpers import ROOT, base_args, ds_json, losses_of, make_cfg, process_group_not_started, run_main


@pytest.mark.parametrize("stage_config", ["cpu_zero1.json", "cpu_zero2.json"])
def test_zero_stages_agree_with_stage3(tiny, dist_env, tmp_path, stage_config):
    ref = train.run(make_cfg(tiny, tmp_path / "z3", deepspeed_config=ds_json(tmp_path, "cpu_zero3.json")))
    other = train.run(make_cfg(tiny, tmp_path / "zx", deepspeed_config=ds_json(tmp_path, stage_config)))
    a, b = losses_of(ref), losses_of(other)
    assert len(a) == 3 and abs(a[0] - a[-1]) > 1e-3, "the steps must move the loss, or the comparison proves nothing"
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_grad_accumulation_is_exact(tiny, dist_env, tmp_path):
    """micro 4 x accumulation 2 == micro 8 x 1, although the micro-batches hold different numbers of tokens."""
    one = train.run(
        make_cfg(
            tiny,
            tmp_path / "a",
            deepspeed_config=ds_json(tmp_path, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1),
        )
    )
    two = train.run(
        make_cfg(
            tiny,
            tmp_path / "b",
            deepspeed_config=ds_json(tmp_path, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2),
        )
    )
    assert losses_of(one) == pytest.approx(losses_of(two), rel=1e-5, abs=1e-6)
    assert abs(losses_of(one)[0] - losses_of(one)[-1]) > 1e-3


def test_full_logits_path_matches_chunked(tiny, dist_env, tmp_path):
    chunked = train.run(make_cfg(tiny, tmp_path / "c", chunk_size=7, deepspeed_config=ds_json(tmp_path)))
    full = train.run(make_cfg(tiny, tmp_path / "f", chunk_size=0, deepspeed_config=ds_json(tmp_path)))
    assert losses_of(chunked) == pytest.approx(losses_of(full), rel=1e-5, abs=1e-6)


def test_teacher_placement_by_fit(tiny, dist_env, tmp_path):
    """No --teacher_deepspeed_config: one rank replicates the teacher, and the curve equals the sharded teacher's."""
    from ds_distill import models

    unset_hf_deepspeed_config()  # an earlier test's ZeRO-3 config would partition this plain load
    lm = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    n = models.parameter_count(tiny["teacher"])
    assert n == sum(p.numel() for p in lm.parameters())  # tied embedding stored and counted once
    kw = dict(sharded="S", replicated="R", bytes_per_param=4)
    assert models.teacher_placement([tiny["teacher"]], world_size=1, rank_memory=1, **kw)[0] == "R"
    assert models.teacher_placement([tiny["teacher"]] * 2, world_size=8, rank_memory=8 * n * 4, **kw)[0] == "R"
    assert models.teacher_placement([tiny["teacher"]] * 2, world_size=8, rank_memory=8 * n * 4 - 1, **kw)[0] == "S"
    assert models.teacher_placement([str(tmp_path)], world_size=8, rank_memory=2**40, **kw)[0] == "S"  # size unknown

    sharded = train.run(make_cfg(tiny, tmp_path / "s", deepspeed_config=ds_json(tmp_path)))
    auto = train.run(make_cfg(tiny, tmp_path / "a", deepspeed_config=ds_json(tmp_path), teacher_deepspeed_config=""))
    assert (
        sharded.teachers.engines[0].zero_optimization_stage() == 3
        and auto.teachers.engines[0].zero_optimization_stage() == 0
    )
    assert json.loads((tmp_path / "a" / "ds_config_teacher.json").read_text())["zero_optimization"] == {"stage": 0}
    assert abs(losses_of(auto)[0] - losses_of(auto)[-1]) > 1e-3
    assert losses_of(auto) == pytest.approx(losses_of(sharded), rel=1e-5, abs=1e-6)


def test_tokens_per_s_leaves_out_eval_and_checkpoint_time():
    """The trainer wraps eval and save in window.paused(): time spent there must not lower the training rate, nor
    count in the seconds per optimizer step (step_s: the window's training seconds / its steps)."""
    import time

    sums = {
        "lr": 0.1,
        "total": torch.tensor(1.0),
        "ce": torch.tensor(1.0),
        "kd": torch.tensor(0.0),
        "n_tokens": torch.tensor(10.0),
        "input_tokens": 1000,
    }
    rates, step_s = {}, {}
    for paused in (False, True):
        window = trainer_mod._Window(torch.device("cpu"))
        window.add(sums)
        window.add(sums)  # two optimizer steps in the window: step_s is per step
        with window.paused() if paused else contextlib.nullcontext():
            time.sleep(0.5)
        metrics = window.flush(1.0, world_size=1)
        rates[paused], step_s[paused] = metrics["tokens_per_s"], metrics["step_s"]
    assert rates[False] <= 2000 / 0.5 and rates[True] > 2000 / 0.25, rates
    assert 0.5 / 2 <= step_s[False] < 0.4 and step_s[True] < 0.25 / 2, step_s


@pytest.mark.parametrize("base", ["cpu_zero3.json", "cpu_zero0.json"])  # zero0: the one-rank CPU default
def test_resume_continues_the_same_curve(tiny, dist_env, tmp_path, base):
    cfg_ds = ds_json(tmp_path, base)
    straight = train.run(make_cfg(tiny, tmp_path / "s", max_steps=6, deepspeed_config=cfg_ds))
    first = train.run(make_cfg(tiny, tmp_path / "r", max_steps=3, save_steps=3, deepspeed_config=cfg_ds))
    second = train.run(make_cfg(tiny, tmp_path / "r", max_steps=6, resume=True, deepspeed_config=cfg_ds))
    assert second.history[0]["step"] == 4
    assert losses_of(first) + losses_of(second) == pytest.approx(losses_of(straight), rel=1e-5, abs=1e-6)


def test_checkpoints_keep_last_and_latest(tiny, dist_env, tmp_path):
    trainer = train.run(
        make_cfg(tiny, tmp_path / "k", max_steps=5, save_steps=1, keep_last=2, deepspeed_config=ds_json(tmp_path))
    )
    ckpts = tmp_path / "k" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004", "step_00000005"]
    assert (ckpts / "latest").read_text() == "step_00000005" == trainer.last_tag
    tag = ckpts / "step_00000005"
    assert (tag / "rng_rank0.pt").is_file() and (tag / "hf" / "config.json").is_file()
    state = torch.load(next(tag.glob("*mp_rank_00_model_states.pt")), weights_only=False)
    assert state["step"] == 5 and state["run_config"]["max_steps"] == 5 and "epoch" in state["data"]


def test_export_gives_the_engine_logits(tiny, dist_env, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = train.run(make_cfg(tiny, tmp_path / "e", export=True, deepspeed_config=ds_json(tmp_path)))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "e" / "final")
    inputs = next(trainer.train).inputs
    with torch.no_grad():
        engine_logits = trainer.student.module.head(trainer.student(**inputs))
        exported = model(**inputs).logits
    before = AutoModelForCausalLM.from_pretrained(tiny["student"])(**inputs).logits
    assert not torch.allclose(before, exported, atol=1e-4), "training must have changed the student"
    torch.testing.assert_close(exported, engine_logits, atol=1e-5, rtol=1e-5)
    # the export CLI gives the same files from the checkpoint folder
    from ds_distill.export import main as export_main

    assert export_main([str(tmp_path / "e" / "checkpoints"), str(tmp_path / "again")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(again(**inputs).logits, exported)


def test_padded_vocabulary_is_distilled_over_the_real_tokens(tiny, dist_env, tmp_path):
    """A teacher with extra embedding rows (like 49152 vs 49280) trains as if they were not there."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    model.resize_token_embeddings(len(tiny["tokenizer"]) + 24)
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tiny["tokenizer"]) :] = 5.0  # loud padding logits, all ignored
    padded = str(tmp_path / "padded")
    model.save_pretrained(padded)
    tiny["tokenizer"].save_pretrained(padded)
    cfg_ds = ds_json(tmp_path)
    ref = train.run(make_cfg(tiny, tmp_path / "ref", deepspeed_config=cfg_ds))
    pad = train.run(make_cfg(tiny, tmp_path / "pad", teacher=[padded], deepspeed_config=cfg_ds))
    assert pad.objective.vocab_size == len(tiny["tokenizer"])
    # the same teacher on the real rows, so the same losses
    assert losses_of(pad) == pytest.approx(losses_of(ref), rel=1e-5, abs=1e-6)


def test_eval_and_monitor_csv(tiny, dist_env, tmp_path):
    trainer = train.run(
        make_cfg(
            tiny, tmp_path / "m", max_steps=4, eval_steps=2, eval_fraction=0.25, deepspeed_config=ds_json(tmp_path)
        )
    )
    evals = [h for h in trainer.history if "Eval/ppl" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all(math.isclose(h["Eval/ppl"], math.exp(h["Eval/ce"]), rel_tol=1e-6) for h in evals)
    files = {p.name for p in (tmp_path / "m" / "monitor").rglob("*.csv")}
    assert any("loss" in f for f in files), files
    train_logs = [h for h in trainer.history if "Train/loss" in h]
    assert all(
        h["Train/tokens_per_s"] > 0 and h["Train/lr"] == pytest.approx(1e-2) and h["Train/grad_norm"] >= 0
        for h in train_logs
    )
    for h in train_logs:  # loss = alpha * CE + (1 - alpha) * KD with the default alpha 0.5
        assert h["Train/loss"] == pytest.approx(0.5 * h["Train/ce"] + 0.5 * h["Train/kd"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, t: a + ["--alpha", "2"], "--alpha 2.0 must be in [0, 1]"),
        (
            lambda a, t: [x if x != t["teacher"] else "/no/such/teacher" for x in a],
            "model directory '/no/such/teacher' does not exist",
        ),
        (lambda a, t: a + ["--loss", "kl"], "--loss 'kl' is unknown"),
        (
            lambda a, t: a + ["--deepspeed_config", str(REPO_CONFIGS / "teacher_zero3_bf16.json")],
            'no "optimizer" block',
        ),
    ],
)
def test_bad_input_is_one_line(tiny, tmp_path, capsys, keep_process_group, change, message):
    code, errors = run_main(change(base_args(tiny, tmp_path / "o"), tiny), capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_a_missing_data_path_is_refused_before_the_process_group(tiny, tmp_path, capsys, monkeypatch):
    """A missing --data or --eval_data file is refused with the flags (``RunConfig.validate``, cache_teacher's
    ``validate``), before the process group starts, where DeepSpeed's log lines and the merged config dump begin: the
    one line comes first (a fresh-user trial saw it after them)."""
    from ds_distill import cache_teacher
    from ds_distill.runtime import distributed

    def no_process_group():
        raise AssertionError("the process group started before the missing data path was refused")

    monkeypatch.setattr(distributed, "init_distributed", no_process_group)
    missing = str(tmp_path / "missing.jsonl")
    args = base_args(tiny, tmp_path / "o")
    for argv in ([x if x != tiny["data"] else missing for x in args], args + ["--eval_data", missing]):
        code, errors = run_main(argv, capsys)
        assert code == 2 and len(errors) == 1 and f"data path {missing!r} does not exist" in errors[0], errors
    code = cache_teacher.main(["--teacher", tiny["teacher"], "--data", missing, "--output_dir", str(tmp_path / "c")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and f"data path {missing!r} does not exist" in errors[0], errors


def test_empty_data_and_vocab_mismatch(tiny, tmp_path, capsys, keep_process_group):
    from tests import tiny as tiny_mod

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, errors = run_main([x if x != tiny["data"] else str(empty) for x in base_args(tiny, tmp_path / "o")], capsys)
    assert code == 2 and len(errors) == 1 and "empty" in errors[0].lower(), errors
    other_tok = tiny_mod.make_tokenizer(tmp_path / "tok2", vocab_size=300)
    other = tiny_mod.make_model(tmp_path / "other", other_tok, layers=1, hidden=32, heads=4)
    code, errors = run_main(
        [x if x != tiny["teacher"] else str(other) for x in base_args(tiny, tmp_path / "o")], capsys
    )
    assert code == 2 and len(errors) == 1 and "different tokenizers" in errors[0], errors


def test_existing_checkpoints_are_never_overwritten(tiny, dist_env, tmp_path, capsys, keep_process_group, caplog):
    import logging

    out = tmp_path / "keep"
    train.run(make_cfg(tiny, out, max_steps=1, deepspeed_config=ds_json(tmp_path)))
    before = (out / "checkpoints" / "latest").read_text()
    caplog.clear()
    with process_group_not_started(), caplog.at_level(logging.INFO, logger="ds_distill"):
        code, errors = run_main(base_args(tiny, out), capsys)
    assert code == 2 and "already holds checkpoints" in errors[0] and "--resume" in errors[0]
    # refused before the JSONs are chosen by fit: the error is the only line (no config lines above it)
    assert not [r.getMessage() for r in caplog.records if "deepspeed_config" in r.getMessage()]
    assert (out / "checkpoints" / "latest").read_text() == before and (out / "checkpoints" / before).is_dir()


def test_resume_of_a_finished_run_exports_once_and_exits_0(
    tiny, dist_env, tmp_path, caplog, capsys, keep_process_group
):
    """Job scripts always pass --resume: a run at (or past) --max_steps trains nothing, exports final/ only if
    missing."""
    import logging
    import shutil

    out = tmp_path / "done"
    cfg_ds = ds_json(tmp_path)
    train.run(make_cfg(tiny, out, max_steps=2, export=True, deepspeed_config=cfg_ds))
    shutil.rmtree(out / "final")  # a job killed between its last checkpoint and the export
    # The settings of the first run (--resume refuses another --seed: the data order would change under it).
    args = base_args(tiny, out) + ["--deepspeed_config", cfg_ds, "--chunk_size", "16", "--seed", "0", "--resume"]
    with caplog.at_level(logging.INFO, logger="ds_distill"):
        assert train.main(args + ["--max_steps", "2"]) == 0
    assert (out / "final" / "config.json").is_file()
    assert sum("nothing left to train" in r.getMessage() for r in caplog.records) == 1
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    assert train.main(args + ["--max_steps", "1"]) == 0  # past max_steps: final/ is there, left as it is
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    # An allowed change that trains nothing is not recorded as what ran: the original command still resumes.
    from ds_distill.core import resume

    records = {name: (out / name).read_text() for name in (resume.RECORD, "run_config.json")}
    changed = args + ["--max_steps", "2", "--alpha", "0.3", "--resume_allow_changes", "alpha"]
    assert train.main(changed) == 0
    assert {name: (out / name).read_text() for name in records} == records
    assert train.main(args + ["--max_steps", "2"]) == 0


@pytest.mark.parametrize("base", ["cpu_zero3.json", "cpu_zero1.json"])
def test_tag_of_another_world_size_resumes_through_a_universal_checkpoint(
    tiny, dist_env, tmp_path, caplog, capsys, keep_process_group, base
):
    """A ZeRO tag written by another number of ranks is converted once (DeepSpeed's ds_to_universal) and loaded with
    "load_universal": the curve continues. Here 1 rank wrote it and a copied RNG file makes it look like 2; the real
    2 -> 1 -> 2 ranks run is tests/test_multirank.py. A conversion that fails is one line."""
    import logging
    import shutil

    cfg_ds = ds_json(tmp_path, base)
    straight = train.run(make_cfg(tiny, tmp_path / "s", max_steps=3, deepspeed_config=cfg_ds))
    out = tmp_path / "w"
    first = train.run(make_cfg(tiny, out, max_steps=2, deepspeed_config=cfg_ds))
    tag = out / "checkpoints" / "step_00000002"
    shutil.copytree(tag, tmp_path / "broken")
    shutil.copy(tag / "rng_rank0.pt", tag / "rng_rank1.pt")  # as if 2 ranks had written it
    with caplog.at_level(logging.INFO, logger="ds_distill"):
        resumed = train.run(make_cfg(tiny, out, max_steps=3, resume=True, deepspeed_config=cfg_ds))
    assert sum("converting it to a universal checkpoint" in r.getMessage() for r in caplog.records) == 1
    assert (out / "checkpoints" / "step_00000002_universal" / "zero").is_dir()
    assert json.loads((out / "ds_config_student.json").read_text())["checkpoint"] == {"load_universal": True}
    assert losses_of(first) + losses_of(resumed) == pytest.approx(losses_of(straight), rel=1e-5, abs=1e-6)

    # a tag the converter cannot read (its optimizer shards are gone): one line, exit 2
    bad = tmp_path / "bad"
    (bad / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "broken", bad / "checkpoints" / "step_00000002")
    (bad / "checkpoints" / "latest").write_text("step_00000002")
    shutil.copy(tag / "rng_rank0.pt", bad / "checkpoints" / "step_00000002" / "rng_rank1.pt")
    for f in (bad / "checkpoints" / "step_00000002").glob("*optim_states.pt"):
        f.unlink()
    code, errors = run_main(
        base_args(tiny, bad) + ["--deepspeed_config", cfg_ds, "--resume", "--max_steps", "3"], capsys
    )
    assert code == 2 and len(errors) == 1 and "to a universal checkpoint failed (" in errors[0], errors
    assert errors[0].endswith("): resume it on the number of ranks that wrote it"), errors


def test_cli_error_has_no_traceback(tiny, tmp_path):
    """Through the real `python -m ds_distill.train`: exit code 2, one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "ds_distill.train", *base_args(tiny, tmp_path / "o"), "--temperature", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [
        "error: invalid run config: --temperature 0.0 must be > 0"
    ]


def test_preemption_signal_checkpoints_exits_75_and_resumes(tiny, dist_env, tmp_path):
    import os
    import signal

    from ds_distill.extras.preemption import PREEMPTED_EXIT_CODE, Preemption
    from ds_distill.runtime.callbacks import Callback

    class SignalAtStep2(Callback):
        def on_step_end(self, trainer, sums):
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
                os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing

    cfg_ds = ds_json(tmp_path)
    straight = train.run(make_cfg(tiny, tmp_path / "s", max_steps=4, deepspeed_config=cfg_ds))
    out = tmp_path / "p"
    stopped = train.run(
        make_cfg(tiny, out, max_steps=4, export=True, deepspeed_config=cfg_ds),
        [SignalAtStep2(), Preemption(requeue=False)],
    )
    assert stopped.step == 2 and stopped.exit_code == PREEMPTED_EXIT_CODE == 75
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002" and not (out / "final").exists()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, "handlers are restored after the run"
    resumed = train.run(
        make_cfg(tiny, out, max_steps=4, resume=True, export=True, deepspeed_config=cfg_ds), [Preemption(requeue=False)]
    )
    assert resumed.exit_code == 0 and (out / "final" / "config.json").is_file()
    assert losses_of(stopped) + losses_of(resumed) == pytest.approx(losses_of(straight), rel=1e-5, abs=1e-6)


def test_step_plan_is_one_collective_and_one_host_sync(monkeypatch):
    """The step-end decisions of all ranks travel in one collective: with 2 (faked) ranks one all-gather and one
    read-back give the global token count (SUM), the chunk counts (MAX) and the stop votes (any rank: a signal that
    reached rank 1 only stops rank 0 too). With one rank: no collective and no read-back."""
    import math

    import torch.distributed as dist

    from ds_distill.core.step_sync import StepSync

    calls = {"collective": 0, "sync": 0}
    real_tolist = torch.Tensor.tolist
    other_rank = [9, 1, 0, 1]  # rank 1: tokens of its 2 micro-batches, votes of 2 callbacks (the second: a signal)

    def all_gather(out, mine):
        calls["collective"] += 1
        out.copy_(torch.cat([mine, torch.tensor(other_rank)]))  # rank 0's row, then rank 1's

    def tolist(self):
        calls["sync"] += 1
        return real_tolist(self)

    monkeypatch.setattr(dist, "all_gather_into_tensor", all_gather)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a host sync through .item()"))
    labels = [torch.tensor([[5, 6, -100, 7]]), torch.tensor([[1, 2, 3, 4], [-100, 8, 9, -100]])]  # 3 and 6 tokens
    plan = StepSync(world_size=2, chunk_size=4, device=torch.device("cpu")).plan(labels, [False, False])
    assert calls == {"collective": 1, "sync": 1}
    assert plan.n_global == 3 + 6 + 9 + 1
    assert plan.num_chunks == [math.ceil(9 / 4), math.ceil(6 / 4)]
    assert plan.votes == [False, True] and plan.stop

    calls.update(collective=0, sync=0)
    alone = StepSync(world_size=1, chunk_size=0, device=torch.device("cpu")).plan(labels, [False, True])
    assert calls == {"collective": 0, "sync": 0}
    assert (alone.n_global, alone.num_chunks, alone.votes) == (9, [None, None], [False, True])


def test_a_stop_vote_is_agreed_in_the_next_steps_plan_and_saves_once(tiny, dist_env, tmp_path, monkeypatch):
    """A vote cast after step 2 rides in step 3's plan (one per step, asked of every callback), the run stops at step
    2 and step 2, already a --save_steps checkpoint, is not saved again; on_stop reaches the callback that voted."""
    from ds_distill.core.step_sync import StepSync

    plans, saves, stopped = [], [], []
    real_plan = StepSync.plan

    def plan(self, labels, votes=()):
        plans.append(list(votes))
        return real_plan(self, labels, votes)

    monkeypatch.setattr(StepSync, "plan", plan)

    class Vote(Callback):
        def should_stop(self, trainer):
            return trainer.step == 2

        def on_stop(self, trainer):
            stopped.append(trainer.step)

        def on_save(self, trainer, tag):
            saves.append(tag)

    trainer = train.run(
        make_cfg(tiny, tmp_path / "v", max_steps=4, save_steps=2, deepspeed_config=ds_json(tmp_path)),
        [Callback(), Vote()],
    )
    assert trainer.step == 2 and stopped == [2]
    assert plans == [[False, False], [False, False], [False, True]], "one plan per step, with every callback's vote"
    assert saves == ["step_00000002"], "the stop step is saved once"


@pytest.mark.parametrize(
    "student_json, teacher_json",
    [
        ("zero3_bf16.json", "teacher_zero3_bf16.json"),
        ("zero2_bf16.json", "teacher_replicated_bf16.json"),
        ("zero1_bf16.json", "teacher_zero3_bf16.json"),
        ("zero3_offload_bf16.json", "cpu_teacher_zero3.json"),
    ],
)
def test_gpu_configs_run(tiny, dist_env, tmp_path, student_json, teacher_json):
    """The shipped GPU configs, as they are but for the optimizer implementation: no GPU here, so torch's Adam
    instead of FusedAdam / DeepSpeedCPUAdam (both JIT-compiled kernels)."""
    d = json.loads((REPO_CONFIGS / student_json).read_text())
    d["optimizer"]["params"]["torch_adam"] = True
    d["zero_force_ds_cpu_optimizer"] = False
    (tmp_path / student_json).write_text(json.dumps(d))
    trainer = train.run(
        make_cfg(
            tiny,
            tmp_path / "o",
            max_steps=2,
            deepspeed_config=str(tmp_path / student_json),
            teacher_deepspeed_config=str(REPO_CONFIGS / teacher_json),
        )
    )
    assert trainer.ds.bf16 and trainer.ds.zero_stage == int(student_json[4])
    assert all(math.isfinite(x) for x in losses_of(trainer)) and len(losses_of(trainer)) == 2


def test_fused_loss_under_zero2_equals_checkpointed(tiny, dist_env, tmp_path, monkeypatch):
    """The fused chunked loss (the default outside ZeRO-3) under ZeRO-2 with a tied lm_head gives the same SGD
    updates as the checkpointed one: the head's gradient reaches DeepSpeed's gradient hooks (reduce buckets)."""
    from ds_distill import losses

    d = json.loads(Path(ds_json(tmp_path, "cpu_zero2.json", lr=0.5)).read_text())
    d["optimizer"] = {"type": "SGD", "params": {"lr": 0.5}}  # updates proportional to the gradients (no Adam scaling)
    d["gradient_clipping"] = 0.0
    d["zero_allow_untested_optimizer"] = True
    p = tmp_path / "sgd_zero2.json"
    p.write_text(json.dumps(d))

    def run(out, checkpointed):
        if checkpointed:
            monkeypatch.setattr(losses.chunked, "fusable", lambda head: False)
        trainer = train.run(make_cfg(tiny, tmp_path / out, chunk_size=7, max_steps=2, deepspeed_config=str(p)))
        monkeypatch.undo()
        head = trainer.student.module.head
        assert losses.chunked.fusable(head)  # the default path here is the fused one
        return losses_of(trainer), head.linear.weight.detach().clone()

    fused_losses, fused_w = run("fused", False)
    ckpt_losses, ckpt_w = run("ckpt", True)
    assert fused_losses == pytest.approx(ckpt_losses, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(fused_w, ckpt_w, rtol=1e-4, atol=1e-6)


def test_resume_refuses_changed_meaning_allows_schedule_changes_and_keeps_every_attempt(
    tiny, dist_env, tmp_path, caplog, capsys, keep_process_group
):
    """--resume with another --seq_len, --alpha, data file (same path, other content), learning rate or micro-batch
    is refused before any model loads, in one line naming each change (old -> new); --max_steps and the intervals
    may change (logged); --resume_allow_changes lets named settings change; the manifest keeps every attempt."""
    import logging

    out, data = tmp_path / "run", tmp_path / "train.jsonl"
    data.write_text(Path(tiny["data"]).read_text())
    cfg_ds, other_lr = ds_json(tmp_path), ds_json(tmp_path, lr=5e-3)
    args = base_args(tiny, out) + ["--data", str(data), "--deepspeed_config", cfg_ds, "--chunk_size", "16"]
    assert train.main(args + ["--max_steps", "2", "--save_steps", "2", "--export", "false"]) == 0
    resume = args + ["--resume", "--export", "false"]
    latest = (out / "checkpoints" / "latest").read_text()
    refused = [
        (["--seq_len", "48", "--alpha", "0.3"], ["seq_len: 32 -> 48", "alpha: 0.5 -> 0.3"]),
        (["--loss", "reverse_kl"], ["loss: forward_kl -> reverse_kl"]),
        (["--deepspeed_config", other_lr], ["optimizer", "0.01", "0.005"]),
        (["--deepspeed_config", ds_json(tmp_path, train_micro_batch_size_per_gpu=4)], ["global_batch: 2 -> 4"]),
        (["--teacher", tiny["student"]], ["teacher:"]),
        (["--entropy_threshold", "1.5"], ["entropy_threshold: 3.0 -> 1.5"]),
        (["--on_policy_fraction", "0.5", "--on_policy_anchor", "0.2"], ["on_policy_anchor: 0.0 -> 0.2"]),
    ]
    for change, names in refused:
        with process_group_not_started():  # refused before DeepSpeed starts
            code, errors = run_main(resume + ["--max_steps", "3"] + change, capsys)
        assert code == 2 and len(errors) == 1 and "--resume" in errors[0], (change, errors)
        assert all(n in errors[0] for n in names) and "--resume_allow_changes" in errors[0], (change, errors)
    data.write_text(Path(tiny["data"]).read_text().replace("fox", "cat"))
    code, errors = run_main(resume + ["--max_steps", "3"], capsys)
    assert code == 2 and "data_content" in errors[0], errors
    data.write_text(Path(tiny["data"]).read_text())
    assert (out / "checkpoints" / "latest").read_text() == latest, "a refused resume leaves the run as it was"

    with caplog.at_level(logging.INFO, logger="ds_distill"):
        more = ["--log_steps", "2", "--keep_last", "3", "--collapse_distinct2_floor", "0.3"]  # when to warn: free
        assert train.main(resume + ["--max_steps", "3", *more]) == 0
    allowed = [r.getMessage() for r in caplog.records if "--resume: allowed changes" in r.getMessage()]
    assert len(allowed) == 1 and "max_steps: 2 -> 3" in allowed[0] and "log_steps: 10 -> 2" in allowed[0], allowed
    assert "collapse_distinct2_floor: 0.5 -> 0.3" in allowed[0], allowed
    assert " resume:" not in allowed[0].split("attempt:")[1], "--resume itself is no change of the run's settings"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    forced = resume + ["--max_steps", "4", "--alpha", "0.3", "--deepspeed_config", other_lr]
    assert train.main(forced + ["--resume_allow_changes", "alpha,optimizer"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["attempts"] == 3 and m["run_config"]["alpha"] == 0.3
    earlier = m["previous_attempts"]
    assert [a["run_config"]["max_steps"] for a in earlier] == [2, 3] and earlier[0]["run_config"]["alpha"] == 0.5
    assert earlier[0]["deepspeed"]["student"]["optimizer"]["params"]["lr"] == 0.01
    assert earlier[0]["resumed_at_step"] is None and earlier[1]["resumed_at_step"] == 2
    assert earlier[0]["results"]["step"] == 2 and earlier[1]["results"]["step"] == 3


def test_an_export_killed_half_way_is_never_taken_as_finished(tiny, dist_env, tmp_path, monkeypatch):
    """A kill during the final export (here: after the config and weights, before the tokenizer) leaves no final/
    that counts as done: the export is built in a temporary folder, marked complete, then renamed; --resume exports
    again."""
    from ds_distill.core import checkpoint
    from ds_distill.core import export as export_mod

    class Killed(Exception):
        pass

    def killed(*a, **k):
        raise Killed

    out, cfg_ds = tmp_path / "run", ds_json(tmp_path)
    monkeypatch.setattr(export_mod, "copy_tokenizer", killed)
    with pytest.raises(Killed):
        train.run(make_cfg(tiny, out, max_steps=2, export=True, deepspeed_config=cfg_ds))
    monkeypatch.undo()
    assert checkpoint.finished_export(out) is None and not checkpoint.is_export(out / "final")
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not checkpoint.is_export(half), "a folder with a config but no completion mark is not an export"
    resumed = train.run(make_cfg(tiny, out, max_steps=2, export=True, resume=True, deepspeed_config=cfg_ds))
    assert resumed.step == 2 and checkpoint.finished_export(out) == out / "final"
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary folder is left behind"
    from ds_distill.export import main as export_main

    mine = tmp_path / "mine"  # the CLI's out_dir is replaced whole once complete: never a folder of other files
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert export_main([str(out / "checkpoints"), str(mine)]) == 2 and (mine / "notes.txt").read_text() == "mine"
    assert export_main([str(out / "checkpoints"), str(out / "final")]) == 0 and checkpoint.is_export(out / "final")


def test_a_failing_last_evaluation_keeps_the_trained_weights(tiny, dist_env, tmp_path, monkeypatch):
    """With the defaults (no intermediate save or eval) the last step is checkpointed before it is evaluated."""

    def broken_eval(self):
        raise RuntimeError("bad eval data")

    monkeypatch.setattr(trainer_mod.Trainer, "eval_metrics", broken_eval)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="bad eval data"):
        train.run(make_cfg(tiny, out, max_steps=2, eval_fraction=0.2, deepspeed_config=ds_json(tmp_path)))
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"


def test_generation_config_is_carried_byte_for_byte(tiny, dist_env, tmp_path):
    """eos ids listed only in generation_config.json survive the checkpoint's hf/ files, the export and student_init."""
    import shutil

    from ds_distill import student_init

    student = tmp_path / "student"
    shutil.copytree(tiny["student"], student)
    text = json.dumps({"eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=1)
    (student / "generation_config.json").write_text(text + "\n")
    out = tmp_path / "run"
    train.run(make_cfg(tiny, out, student=str(student), max_steps=1, export=True, deepspeed_config=ds_json(tmp_path)))
    for folder in (out / "checkpoints" / "step_00000001" / "hf", out / "final"):
        assert (folder / "generation_config.json").read_text() == text + "\n", folder

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    (teacher / "generation_config.json").write_text(text + "\n")
    student_init.main(["--teacher", str(teacher), "--out", str(tmp_path / "init"), "--num_layers", "1"])
    assert (tmp_path / "init" / "generation_config.json").read_text() == text + "\n"


def test_logged_lr_is_the_one_each_step_trained_at(tiny, dist_env, tmp_path):
    """The shipped demo JSON's warm-up (rates change every step), 2 micro-batches per step: the logged lr of step k is
    the one the torch optimizer inside the engine holds when its step k runs, not the next step's."""
    d = json.loads((REPO_CONFIGS / "cpu_demo.json").read_text())
    d["gradient_accumulation_steps"] = 2
    (tmp_path / "s.json").write_text(json.dumps(d))
    used = []

    class Spy(Callback):
        def on_train_start(self, trainer):
            inner = trainer.student.optimizer.optimizer  # ZeRO's wrapper holds the torch optimizer
            real_step = inner.step
            inner.step = lambda *a, **k: (used.append(inner.param_groups[0]["lr"]), real_step(*a, **k))[1]

    trainer = train.run(
        make_cfg(tiny, tmp_path / "lr", max_steps=4, deepspeed_config=str(tmp_path / "s.json")), callbacks=[Spy()]
    )
    logged = losses_of(trainer, "Train/lr")
    assert len(set(used)) == 3 and used[0] > 0, used  # warm-up: steps 1 and 2 share warmup_min_lr, then it rises
    assert logged == used
