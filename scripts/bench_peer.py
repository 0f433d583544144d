"""ds-distill against TRL on the same work, in one run (issue 28): the same models, the same batches in the same order,
the same objective, optimizer and schedule, one process each, alternating.

    bash scripts/setup_trl.sh                      # TRL in its own environment (.venv-trl, requirements-trl.lock)
    .venv/bin/python scripts/bench_peer.py --teacher T --student S --data DIR [--repeats 2] [--json out.json]

Objectives (``--objectives``, each a pair of runs):
    mix        0.5 CE + 0.5 forward KL: ds-distill ``--alpha 0.5`` against TRL's ``GKDTrainer`` (lmbda 0, beta 0:
               forward KL on the dataset's tokens) with the CE term added to its loss (``trl_worker``'s subclass)
    fkl        pure forward KL: ``--alpha 0`` against ``GKDTrainer`` as shipped (lmbda 0, beta 0)
    on_policy  forward KL on ``--max_new_tokens`` tokens the student samples for each prompt: ``--on_policy_fraction 1
               --alpha 0`` against TRL's ``DistillationTrainer`` (beta 0), ``--on_policy_steps`` steps
Both sides: fp32 on CPU (bf16 on a GPU: ds-distill's shipped bf16 JSON, TRL ``bf16=True``), ``--micro_batch`` x
``--seq_len`` tokens per step, no accumulation, AdamW (betas 0.9/0.95, eps 1e-8, no weight decay) at ``--lr`` with a
linear warm-up of ``--warmup`` steps then constant (TRL: ``constant_with_warmup``, step 1 at lr 0; ds-distill:
DeepSpeed's WarmupLR as the shipped JSONs write it, step 1 at step 2's rate, or with ``--ds_schedule hf``
WarmupCosineLR written as Hugging Face's, step 1 at 0: README "Learning-rate warm-up"), clipping 1.0, T = 1, sampling
at temperature 1, no top-k/p.
ds-distill runs as a user runs it: ``build(RunConfig)`` then ``Trainer.fit``, its student JSON the one its default
picks when none is named (``build.student_ds_config``) with only micro-batch, lr and warm-up set; ``--ds_stage 3``
forces its ZeRO-3 file instead; ``--ds_gradient_checkpointing`` runs it with ``--gradient_checkpointing``, as TRL's
trainers run by default.

The same batches: ds-distill's first run records the micro-batches its stream yields (train, and the held-out set read
as its evaluation reads ``--eval_data``) into ``batches_<objective>.pt``; TRL trains on exactly those tensors in that
order (its labels are the same tokens, unshifted as transformers wants them), and every later ds-distill run checks it
drew the same. On-policy: the prompts of those micro-batches, as token ids (each side samples its own completions).

Measured per run (each in its own process): step wall time from the step's start (before its batch is drawn) to its
end (after the optimizer step), median and min over steps after the first ``--skip`` (default 3); peak RSS of the
process at the end of training (GPU: the most allocated); start-up = the launch of the process to the start of step 1
(imports, models, engines, probes, data); held-out perplexity of the trained student on the recorded held-out batches,
computed by one function in both (``heldout_ppl``), and the per-step losses. The table is the median over repeats.
The machine's load average is printed with the table: on a shared machine, alternate and repeat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Stdlib only at import, as this file: TRL's environment runs it too. (scripts/ is on sys.path: this file is run.)
from bench import dispatch, one_rank_env, worker_env

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("mix", "fkl", "on_policy")
LABELS = {
    "mix": "0.5 CE + 0.5 fKL",
    "fkl": "pure fKL",
    "on_policy": "fKL on sampled tokens",
}
IGNORE = -100  # ds_distill.common.IGNORE_INDEX; not imported: the TRL worker runs without ds_distill's dependencies


# -------------------------------------------------------------------------------------- shared by both workers
def heldout_ppl(model, batches: list[dict[str, Any]], device) -> float:
    """exp(mean CE per supervised token) of ``model``'s logits over ``batches`` (labels already shifted, as ds-distill
    stores them: ``labels[:, t]`` is the target of position t, -100 where unsupervised). The same code scores both."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            labels = b["labels"].to(device)
            mask = labels != IGNORE
            total += F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum").item()
            n += int(mask.sum())
    model.train(was_training)
    return math.exp(total / max(n, 1))


def peak_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Parts:
    """CPU seconds (this process, all threads) spent in named calls, per step: ``wrap(obj, attr, part)`` times every
    call of ``obj.attr`` (an instance attribute shadowing the method); a call inside another timed call counts in the
    inner part only (its time is taken off the outer one)."""

    def __init__(self):
        self.step: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._stack: list[float] = []  # the inner time of each open call

    def wrap(self, obj, attr: str, part: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kw):
            c0 = time.process_time()
            self._stack.append(0.0)
            try:
                return inner(*args, **kw)
            finally:
                spent, nested = time.process_time() - c0, self._stack.pop()
                self.step[part] = self.step.get(part, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1] += spent

        setattr(obj, attr, timed)

    def end_step(self, cpu_s: float) -> None:
        self.step["other"] = cpu_s - sum(self.step.values())
        self.steps.append(self.step)
        self.step = {}


def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------------------------------ ds-distill worker
def ds_json(a: argparse.Namespace, world, gpu: bool) -> str:
    """The student JSON ds-distill's default picks (``build.student_ds_config``), or its ZeRO-3 file with
    ``--ds_stage 3``, copied with only the micro-batch, lr and warm-up set: N warm-up steps as the shipped JSONs write
    them (WarmupLR, min = peak / N over N - 1 steps), or ``--ds_schedule hf`` as Hugging Face's with step 1 at 0
    (WarmupCosineLR, ratio 1/N over N - 1 steps, no decay)."""
    from ds_distill.core import build
    from ds_distill.ds_config import default_ds_configs, hugging_face_warmup

    src = default_ds_configs(gpu)[0] if a.ds_stage == 3 else build.student_ds_config(a.student, world, gpu)
    d = json.loads(Path(src).read_text())
    d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"] = a.micro_batch, 1
    d["optimizer"]["params"].update(lr=a.lr, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0)
    if a.ds_schedule == "hf":
        d["scheduler"] = hugging_face_warmup(a.warmup)
    else:
        d["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": a.lr / a.warmup,
                "warmup_max_lr": a.lr,
                "warmup_num_steps": a.warmup - 1,
                "warmup_type": "linear",
            },
        }
    out = Path(a.out) / f"ds_config_{a.objective}.json"
    out.write_text(json.dumps(d, indent=2))
    return str(out)


class _Recorder:
    """Wraps a batch stream and keeps every micro-batch it yields (CPU tensors)."""

    def __init__(self, stream):
        self.stream, self.batches = stream, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.stream)
        self.batches.append(
            {
                "input_ids": batch.inputs["input_ids"].clone(),
                "attention_mask": batch.inputs["attention_mask"].clone(),
                "labels": batch.labels.clone(),
            }
        )
        return batch

    def __getattr__(self, name):
        return getattr(self.stream, name)


def ds_worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ds_distill import data
    from ds_distill.config import RunConfig
    from ds_distill.core import build
    from ds_distill.runtime import distributed
    from ds_distill.runtime.callbacks import Callback

    device, on_policy = _device(), a.objective == "on_policy"
    world = distributed.init_distributed()
    data_dir = Path(a.data)
    cfg = RunConfig(
        teacher=[a.teacher],
        student=a.student,
        data=str(data_dir / ("train_prompts.jsonl" if on_policy else "train.jsonl")),
        output_dir=str(Path(a.out) / "ds_run"),
        deepspeed_config=ds_json(a, world, device.type == "cuda"),
        seq_len=a.seq_len,
        max_steps=a.steps,
        log_steps=a.steps,
        eval_fraction=0.0,
        eval_data="" if on_policy else str(data_dir / "eval.jsonl"),  # evaluated once, after the last step
        eval_batches=0,
        export=False,
        alpha=0.5 if a.objective == "mix" else 0.0,
        loss="forward_kl",
        temperature=1.0,
        on_policy_fraction=1.0 if on_policy else 0.0,
        max_new_tokens=a.max_new_tokens,
        seed=a.seed,
        gradient_checkpointing=a.ds_gradient_checkpointing,
    )

    class Clock(Callback):
        def __init__(self):
            self.times, self.cpu, self.sums, self.norms, self.started, self.peak = [], [], [], [], 0.0, 0.0

        def on_train_start(self, trainer):
            self.started = time.time()

        def should_stop(self, trainer):  # asked at every step's start, before its micro-batches are drawn
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            return False

        def on_step_end(self, trainer, sums):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
            if a.parts:
                parts.end_step(self.cpu[-1])
            self.sums.append((sums["total"], sums["n_tokens"]))
            self.norms.append(trainer.grad_norm.latest())
            if trainer.step == trainer.cfg.max_steps:
                self.peak = peak_gib(device)

    clock, parts = Clock(), Parts()
    trainer = build.build(cfg, callbacks=[clock])
    if a.parts:  # where a step's CPU time goes
        parts.wrap(trainer.student, "forward", "student forward")
        parts.wrap(trainer.teachers, "targets", "teacher forward")
        parts.wrap(trainer, "loss_sums", "loss forward")
        parts.wrap(trainer.student, "backward", "backward (engine)")
        parts.wrap(trainer.student, "step", "optimizer step (engine)")
    # The micro-batches of the dataset (on-policy: before the student samples, for their prompts).
    recorder = _Recorder(trainer.train.stream if on_policy else trainer.train)
    if on_policy:
        trainer.train.stream = recorder
    else:
        trainer.train = recorder
    trainer.fit()
    shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)  # the last step's, not measured
    losses = [float(total) / max(float(n), 1.0) for total, n in clock.sums]
    result = {
        "system": "ds-distill",
        "config": f"ZeRO-{trainer.ds.zero_stage}, {Path(trainer.ds.path).name}",
        "step_s": clock.times,
        "cpu_s": clock.cpu,
        "parts": parts.steps,
        "losses": losses,
        "grad_norms": [float(g) if g is not None else None for g in clock.norms],
        "peak_gib": clock.peak,
        "started": clock.started,
    }
    dump = Path(a.batches)
    if on_policy:
        prompts = [_prompts(b["input_ids"], b["labels"]) for b in recorder.batches]
        record = {"prompts": prompts}
    else:
        tok = trainer.tokenizer
        eval_set = data.get_dataset(str(data_dir / "eval.jsonl"), tok, seq_len=a.seq_len)
        stream = data.BatchStream(
            eval_set,
            batch_size=a.micro_batch,
            rank=0,
            world_size=1,
            seed=0,
            pad_token_id=tok.pad_token_id,
            shuffle=False,
        )  # as Trainer.eval_metrics reads --eval_data
        held_out = []
        for _ in range(len(eval_set) // a.micro_batch):
            b = next(stream)
            held_out.append(
                {"input_ids": b.inputs["input_ids"], "attention_mask": b.inputs["attention_mask"], "labels": b.labels}
            )
        record = {"train": recorder.batches, "eval": held_out}
        lm = trainer.student.module.lm
        if trainer.ds.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(lm.parameters())):
                result["ppl"] = heldout_ppl(lm, held_out, device)
        else:
            result["ppl"] = heldout_ppl(lm, held_out, device)
        result["own_eval_ppl"] = next(h["Eval/ppl"] for h in trainer.history if "Eval/ppl" in h)  # = ppl
    if dump.exists():  # every later run checks it drew what TRL trains on
        result["same_batches"] = _same(torch.load(dump), record)
    else:
        torch.save(record, dump)
        result["same_batches"] = True
    return result


def _prompts(input_ids, labels) -> list[list[int]]:
    """Each row's prompt: every token before its first supervised target (ds_distill.on_policy.prompt_length)."""
    from ds_distill.on_policy.stream import prompt_length

    return [input_ids[i, : prompt_length(row)].tolist() for i, row in enumerate(labels.tolist())]


def _same(old: dict, new: dict) -> bool:
    import torch

    if "prompts" in old:
        return old["prompts"] == new["prompts"]
    pairs = zip(old["train"] + old["eval"], new["train"] + new["eval"])
    return len(old["train"]) == len(new["train"]) and all(
        all(torch.equal(x[k], y[k]) for k in ("input_ids", "attention_mask", "labels")) for x, y in pairs
    )


# ------------------------------------------------------------------------------------------------- TRL worker
def trl_worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    device, on_policy = _device(), a.objective == "on_policy"
    gpu = device.type == "cuda"
    record = torch.load(a.batches)
    tok = AutoTokenizer.from_pretrained(a.student)
    dtype = torch.bfloat16 if gpu else torch.float32
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=dtype)
    common = dict(
        output_dir=str(Path(a.out) / "trl_run"),
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=a.warmup,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=gpu,
        use_cpu=not gpu,
        seed=a.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        temperature=1.0,
        beta=0.0,  # forward KL (generalized JSD at beta 0 is KL(teacher || student))
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self.started, self.peak, self.logs = [], [], 0.0, 0.0, []

        def on_train_begin(self, args, state, control, **kw):
            self.started = time.time()
            if a.parts:  # the optimizer exists from here on
                parts.wrap(kw["optimizer"], "step", "optimizer step")

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
            if a.parts:
                parts.end_step(self.cpu[-1])
            if state.global_step == args.max_steps:
                self.peak = peak_gib(device)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(logs)

    clock, parts = Clock(), Parts()
    if a.parts:
        parts.wrap(student, "forward", "student forward")
        parts.wrap(teacher, "forward", "teacher forward")
    if on_policy:
        rows = [p for step in record["prompts"] for p in step]

        class Trainer(trl.DistillationTrainer):
            def _tokenize_prompts(self, prompts):  # the recorded prompt token ids, exactly
                return [json.loads(p) for p in prompts], None, {}

        trainer = Trainer(
            model=student,
            teacher_model=teacher,
            args=trl.DistillationConfig(**common, max_completion_length=a.max_new_tokens, shuffle_dataset=False),
            train_dataset=Dataset.from_dict({"prompt": [json.dumps(p) for p in rows]}),
            processing_class=tok,
            callbacks=[clock],
        )
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        train = record["train"]
        # transformers' labels are unshifted (the model shifts): position t + 1 holds the target of position t.
        hf_labels = lambda lab: torch.cat([torch.full_like(lab[:, :1], IGNORE), lab[:, :-1]], 1)
        rows = {
            "input_ids": [r for b in train for r in b["input_ids"].tolist()],
            "attention_mask": [r for b in train for r in b["attention_mask"].tolist()],
            "labels": [r for b in train for r in hf_labels(b["labels"]).tolist()],
        }
        collate = lambda feats: {
            k: torch.tensor([f[k] for f in feats]) for k in ("input_ids", "attention_mask", "labels")
        }
        alpha = 0.5 if a.objective == "mix" else 0.0

        class Trainer(GKDTrainer):
            def _get_train_sampler(self, train_dataset=None):  # the recorded order
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if alpha == 0.0:  # GKD as shipped
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                # GKD's compute_loss with a CE term: alpha * CE + (1 - alpha) * KL, both per supervised token
                s = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                self.teacher_model.eval()
                with torch.no_grad():
                    t = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                sl, tl, lab = s.logits[:, :-1, :], t.logits[:, :-1, :], inputs["labels"][:, 1:]
                kd = self.generalized_jsd_loss(
                    sl, tl, labels=lab, beta=self.beta, num_items_in_batch=num_items_in_batch
                )
                n = num_items_in_batch if num_items_in_batch is not None else (lab != IGNORE).sum().clamp_min(1)
                ce = F.cross_entropy(sl.reshape(-1, sl.size(-1)).float(), lab.reshape(-1), reduction="sum") / n
                loss = alpha * ce + (1 - alpha) * kd
                return (loss, s) if return_outputs else loss

        trainer = Trainer(
            model=student,
            teacher_model=teacher,
            args=GKDConfig(**common, lmbda=0.0, max_length=a.seq_len),
            train_dataset=Dataset.from_dict(rows),
            data_collator=collate,
            processing_class=tok,
            callbacks=[clock],
        )
    if a.parts:
        parts.wrap(trainer, "compute_loss", "loss forward")
        parts.wrap(trainer.accelerator, "backward", "backward")
        parts.wrap(trainer.accelerator, "clip_grad_norm_", "clip")
    trainer.train()
    trl_class = next(c.__name__ for c in type(trainer).__mro__ if c.__module__.startswith("trl"))
    result = {
        "system": "TRL",
        "config": f"TRL {trl.__version__} {trl_class}",
        "step_s": clock.times,
        "cpu_s": clock.cpu,
        "parts": parts.steps,
        "losses": [entry["loss"] for entry in clock.logs],
        "grad_norms": [entry.get("grad_norm") for entry in clock.logs],
        "peak_gib": clock.peak,
        "started": clock.started,
    }
    if not on_policy:
        result["ppl"] = heldout_ppl(trainer.model, record["eval"], device)
    return result


# ---------------------------------------------------------------------------------------------------- driver
def summarise(results: list[dict[str, Any]], skip: int) -> list[dict[str, Any]]:
    """One row per (objective, system): medians over repeats of each run's median step, min step, peak, start-up and
    held-out perplexity (steps after the first ``skip``)."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        rows.setdefault((r["objective"], r["system"]), []).append(r)
    out = []
    for (objective, system), runs in rows.items():
        timed = [r["step_s"][skip:] or r["step_s"] for r in runs]
        cpu = [r["cpu_s"][skip:] or r["cpu_s"] for r in runs]
        ppls = [r["ppl"] for r in runs if r.get("ppl") is not None]
        out.append(
            {
                "objective": objective,
                "system": system,
                "config": runs[0]["config"],
                "runs": len(runs),
                "median_ms": 1000 * statistics.median(statistics.median(t) for t in timed),
                "min_ms": 1000 * statistics.median(min(t) for t in timed),
                "cpu_median_ms": 1000 * statistics.median(statistics.median(t) for t in cpu),
                "per_run_median_ms": [round(1000 * statistics.median(t)) for t in timed],
                "peak_gib": statistics.median(r["peak_gib"] for r in runs),
                "startup_s": statistics.median(r["startup_s"] for r in runs),
                "ppl": statistics.median(ppls) if ppls else None,
                "parts_ms": _parts_ms([step for r in runs for step in r.get("parts", [])[skip:]]),
            }
        )
    return out


def _parts_ms(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median CPU ms per step of each part over the timed steps of every run."""
    names = sorted({k for s in steps for k in s})
    return {k: 1000 * statistics.median(s.get(k, 0.0) for s in steps) for k in names}


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| system | objective | step ms median / min | step CPU ms median | peak GiB | start-up s | held-out ppl "
        "| per-run medians (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] is not None else "-"
        lines.append(
            f"| {r['system']} ({r['config']}) | {LABELS[r['objective']]} | {r['median_ms']:.0f} / {r['min_ms']:.0f} "
            f"| {r['cpu_median_ms']:.0f} | {r['peak_gib']:.2f} | {r['startup_s']:.1f} | {ppl} "
            f"| {r['per_run_median_ms']} |"
        )
    if any(r["parts_ms"] for r in rows):
        lines += ["", "CPU ms per step by part (median over timed steps and repeats):", ""]
        for r in rows:
            if r["parts_ms"]:
                body = ", ".join(f"{k} {v:.0f}" for k, v in r["parts_ms"].items())
                lines.append(f"- {r['system']}, {LABELS[r['objective']]}: {body}")
    return "\n".join(lines) + "\n"


def run_one(a: argparse.Namespace, system: str, objective: str, repeat: int, python: str) -> dict[str, Any]:
    out = Path(a.out) / f"{objective}_{system}_{repeat}"
    out.mkdir(parents=True, exist_ok=True)
    steps = a.on_policy_steps if objective == "on_policy" else a.steps
    result = out / "result.json"
    cmd = [python, str(Path(__file__).resolve()), "--worker", system, "--objective", objective, "--result", str(result)]
    cmd += ["--out", str(out), "--batches", str(Path(a.out) / f"batches_{objective}.pt"), "--steps", str(steps)]
    for name in ("teacher", "student", "data", "micro_batch", "seq_len", "lr", "warmup", "max_new_tokens", "seed"):
        cmd += [f"--{name}", str(getattr(a, name))]
    cmd += ["--ds_stage", str(a.ds_stage), "--ds_schedule", a.ds_schedule, *(["--parts"] if a.parts else [])]
    cmd += ["--ds_gradient_checkpointing"] if a.ds_gradient_checkpointing else []
    env = {
        **worker_env(python),
        **(one_rank_env() if system == "ds" else {}),  # ds-distill: a world of its own; TRL: a plain process
    }
    env.setdefault("DS_ACCELERATOR", "cpu" if not a.gpu else "cuda")
    if not a.gpu:  # the same intra-op threads in both (docs/performance.md: OpenMP threads contending on a shared CPU)
        env["OMP_NUM_THREADS"] = str(a.cpu_threads)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    launched = time.time()
    with open(out / "log.txt", "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join((out / "log.txt").read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(
            f"error: {system} {objective} failed (exit {proc.returncode}); last lines of {out}/log.txt:\n{tail}"
        )
    r = json.loads(result.read_text())
    r.update(objective=objective, repeat=repeat, startup_s=r["started"] - launched, load=os.getloadavg())
    return r


def _refuse(message: str) -> None:
    """Bad input: one line on stderr, exit code 2 (the toolkit's rule)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    objectives = [o for o in a.objectives.split(",") if o]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        _refuse(f"unknown --objectives {bad}: use {', '.join(OBJECTIVES)}")
    systems = [s for s in a.systems.split(",") if s]
    trl_python = a.trl_python or str(ROOT / ".venv-trl" / "bin" / "python")
    if "trl" in systems and not Path(trl_python).exists():
        _refuse(f"no TRL environment at {trl_python}: run `bash scripts/setup_trl.sh` first (or pass --systems ds)")
    import torch

    a.gpu = torch.cuda.is_available()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    results = []
    load_before = os.getloadavg()
    for repeat in range(a.repeats):
        for objective in objectives:
            # ds-distill first in the first repeat (it records the batches), then alternating.
            order = systems if repeat % 2 == 0 else systems[::-1]
            if not (Path(a.out) / f"batches_{objective}.pt").exists():
                order = sorted(order, key=lambda s: s != "ds")
            for system in order:
                r = run_one(a, system, objective, repeat, sys.executable if system == "ds" else trl_python)
                print(
                    f"{objective} {system} #{repeat}: median step "
                    f"{1000 * statistics.median(r['step_s'][a.skip :] or r['step_s']):.0f} ms, "
                    f"peak {r['peak_gib']:.2f} GiB, start-up {r['startup_s']:.1f} s, ppl {r.get('ppl')}, "
                    f"load {r['load'][0]:.1f}",
                    flush=True,
                )
                results.append(r)
    rows = summarise(results, a.skip)
    loads = [r["load"][0] for r in results]
    device = torch.cuda.get_device_name(0) if a.gpu else f"CPU ({os.cpu_count()} cores)"
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {device}, one process, {'bf16' if a.gpu else 'fp32'}, "
        f"{a.micro_batch} x {a.seq_len} tokens per step, AdamW lr {a.lr:g} with {a.warmup} warm-up steps "
        f"(ds-distill's schedule: {a.ds_schedule})"
        f"{', ds-distill with --gradient_checkpointing' if a.ds_gradient_checkpointing else ''}, "
        f"{a.steps} steps "
        f"(on-policy {a.on_policy_steps}, {a.max_new_tokens} sampled tokens), step times after the first {a.skip}, "
        f"median of {a.repeats} alternating repeat(s); 1-min load average "
        f"{min(loads + [load_before[0]]):.1f} to {max(loads):.1f}"
    )
    table = markdown(rows, header)
    print(table)
    report = {"header": header, "rows": rows, "runs": results, "args": {k: v for k, v in vars(a).items()}}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    if a.markdown:
        Path(a.markdown).write_text(table)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt, allow_abbrev=False)
    p.add_argument("--teacher", required=True, help="The teacher model folder.")
    p.add_argument("--student", required=True, help="The student model folder.")
    p.add_argument("--data", required=True, help="Folder of train.jsonl, eval.jsonl, train_prompts.jsonl (the demo's).")
    p.add_argument("--out", default="bench_peer_out", help="Where the runs, recorded batches and results go.")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"Comma-separated, of {', '.join(OBJECTIVES)}.")
    p.add_argument("--systems", default="ds,trl", help="ds, trl or both (ds,trl).")
    p.add_argument("--repeats", type=int, default=1, help="Runs of each pair, alternating which goes first.")
    p.add_argument("--steps", type=int, default=30, help="Optimizer steps (off-policy objectives).")
    p.add_argument("--on_policy_steps", type=int, default=8, help="Optimizer steps of the on-policy pair.")
    p.add_argument("--skip", type=int, default=3, help="Steps left out of the step-time statistics.")
    p.add_argument("--micro_batch", type=int, default=4, help="Sequences per step.")
    p.add_argument("--seq_len", type=int, default=128, help="Tokens per sequence.")
    p.add_argument("--lr", type=float, default=5e-4, help="Peak learning rate.")
    p.add_argument("--warmup", type=int, default=5, help="Linear warm-up steps (>= 2: DeepSpeed's WarmupLR).")
    p.add_argument("--max_new_tokens", type=int, default=32, help="On-policy: tokens sampled per prompt.")
    p.add_argument("--seed", type=int, default=42, help="Seed of both runs.")
    p.add_argument(
        "--ds_schedule",
        choices=("shipped", "hf"),
        default="shipped",
        help="ds-distill's warm-up: shipped (DeepSpeed's WarmupLR as the shipped JSONs: step 1 at step 2's rate) or hf "
        "(WarmupCosineLR written as Hugging Face's, step 1 at 0: the same rate as TRL's every step).",
    )
    p.add_argument(
        "--ds_gradient_checkpointing",
        action="store_true",
        help="ds-distill with --gradient_checkpointing (TRL's trainers checkpoint by default).",
    )
    p.add_argument(
        "--ds_stage", type=int, default=0, choices=(0, 3), help="0: ds-distill's default JSON; 3: its ZeRO-3 file."
    )
    p.add_argument("--cpu_threads", type=int, default=1, help="OMP_NUM_THREADS of both workers on CPU.")
    p.add_argument("--parts", action="store_true", help="Also time the parts of each step (CPU s per call site).")
    p.add_argument("--trl_python", default="", help="TRL's python (default: .venv-trl/bin/python).")
    p.add_argument("--json", default="", help="Write every run's measurements and the table's rows to this file.")
    p.add_argument("--markdown", default="", help="Write the table to this Markdown file.")
    # Internal: one run in this process.
    p.add_argument("--worker", choices=("ds", "trl"), help=argparse.SUPPRESS)
    for name in ("objective", "result", "batches"):
        p.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(a: argparse.Namespace) -> dict[str, Any]:
    return (ds_worker if a.worker == "ds" else trl_worker)(a)


def main(argv: list[str] | None = None) -> int:
    return dispatch(argv, parse_args, run, worker)


if __name__ == "__main__":
    sys.exit(main())
