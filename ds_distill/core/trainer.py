"""The training loop: ``Trainer.fit`` (one screen) and the little state an exact resume needs.

Per optimizer step:
    loss = sum over supervised tokens of [alpha * CE + (1 - alpha) * T^2 * D(teacher || student)] / global token count
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ds_distill import data, losses, models
from ds_distill.config import RunConfig
from ds_distill.core import checkpoint
from ds_distill.core.grad_norm import GradNorm
from ds_distill.core.step_sync import StepPlan, StepSync
from ds_distill.ds_config import DSConfig
from ds_distill.losses.objective import Objective
from ds_distill.models.layer_map import copy_provenance
from ds_distill.runtime.callbacks import Callback
from ds_distill.teachers.live import TeacherSource

log = logging.getLogger("ds_distill")


class Trainer:
    """The loop and the little state an exact resume needs (step + data position; DeepSpeed keeps the rest)."""

    def __init__(
        self,
        cfg: RunConfig,
        student,
        teachers: TeacherSource,
        train: Iterator[data.Batch],
        eval_set,
        *,
        objective: Objective,
        ds: DSConfig,
        tokenizer,
        callbacks: list[Callback] = (),
        source_ids: data.SourceIds | None = None,
    ):
        self.cfg, self.student, self.teachers, self.train, self.eval_set = cfg, student, teachers, train, eval_set
        self.objective, self.ds, self.tokenizer, self.callbacks = objective, ds, tokenizer, list(callbacks)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = checkpoint.ckpt_root(self.output_dir)
        self.step, self.last_tag = 0, None
        self.exit_code = 0  # what the run exits with: a stopping callback's on_stop may give another (stop())
        self.source_ids = source_ids  # batches' example_ids (row numbers) -> the data's ids, for the callbacks
        self.history: list[dict[str, float]] = []  # logged metrics (rank 0 also writes them to the DeepSpeed monitor)
        self.device = torch.device(get_accelerator().current_device_name())
        self.sync = StepSync(self.world_size, cfg.chunk_size, self.device)
        self.grad_norm = GradNorm(student)  # the logged grad_norm, also where DeepSpeed keeps none (stage 0, fp32)

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> int:
        for cb in self.callbacks:
            cb.on_train_start(self)
        if self.step >= self.cfg.max_steps and self.rank == 0:
            log.info(
                "--resume: the checkpoint is at step %d, at or past --max_steps %d: nothing left to train",
                self.step,
                self.cfg.max_steps,
            )
        window = _Window(self.device)
        with _progress(self.rank, self.step, self.cfg.max_steps) as bar:  # closed on errors: error: on its own line
            while self.step < self.cfg.max_steps:
                votes = [cb.should_stop(self) for cb in self.callbacks]  # rank-local; agreed in this step's collective
                position = self.train.state_dict()  # where a run stopped before this step's work resumes
                micro_batches = [next(self.train) for _ in range(self.ds.grad_accum)]
                plan = self.sync.plan([b.labels for b in micro_batches], votes)  # the step's one collective
                if plan.stop:
                    self.stop(plan, position)
                    break
                sums = self.train_step(micro_batches, plan)
                self.step += 1
                bar.update(1)
                window.add(sums)
                for cb in self.callbacks:
                    cb.on_step_end(self, sums)
                last = self.step == self.cfg.max_steps
                if self.cfg.is_log_step(self.step):
                    self.log_metrics(window.flush(self.grad_norm.latest(), self.world_size), "Train")
                with window.paused():
                    if last:  # saved before the last evaluation: whatever that meets, the trained weights are kept
                        self.save()
                    eval_step = (self.cfg.eval_steps and self.step % self.cfg.eval_steps == 0) or last
                    asked = self.evaluate() if eval_step else False  # a callback asked for a checkpoint (a new best)
                    if (self.cfg.save_steps and self.step % self.cfg.save_steps == 0) or asked or last:
                        self.save()  # once per step: a step saved already only tells the callbacks again
        return self.step

    def stop(self, plan: StepPlan, position: dict[str, Any]) -> None:
        """End training at this step boundary on every rank: tell the callbacks whose vote (on some rank) stopped the
        run and take the run's exit code from them, then save this step once, with the data position from before the
        micro-batches drawn for the next."""
        codes = [cb.on_stop(self) for cb, voted in zip(self.callbacks, plan.votes) if voted]
        self.exit_code = next((code for code in codes if code), 0)  # the votes are global: the same on every rank
        if self.last_tag != checkpoint.tag_for(self.step):
            self.save(position)

    def train_step(self, micro_batches: list[data.Batch], plan: StepPlan) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns device sums, and in
        ``per_example`` one (epoch, example_ids [B], ce [B], kd [B], tokens [B]) per micro-batch (epoch from its Batch);
        ``lr`` (a float) is the learning rate the step trained at.

        ``plan`` (``self.sync.plan`` of these micro-batches) holds the step's global token count and chunk counts; its
        collective is the step's one host sync with several ranks (none with one rank); nothing here syncs. Labels
        stay on the host, where the loss finds the supervised positions without waiting for the device.
        """
        # Divide by the global count of supervised tokens of this step (all micro-batches, all ranks), so that every
        # token weighs the same whatever the micro-batching. DeepSpeed averages gradients over ranks, hence * world.
        sums: dict[str, Any] = {
            "lr": self.student.get_lr()[0],  # read before engine.step(): the rate this step trains at, not the next
            "n_tokens": plan.n_global,
            "input_tokens": 0,
            "total": 0,
            "ce": 0,
            "kd": 0,
            "per_example": [],
            "extra": {},
        }
        for batch, chunks in zip(micro_batches, plan.num_chunks):
            batch = batch.to(self.device)
            targets = self.teachers.targets(batch, "train")
            out = self.loss_sums(self.student(**batch.inputs), targets, batch.labels, chunks)
            self.student.backward(out.total * self.world_size / max(plan.n_global, 1), scale_wrt_gas=False)
            self.grad_norm.before_step()
            self.student.step()
            for key in ("total", "ce", "kd"):
                sums[key] = sums[key] + getattr(out, key).detach()
            for key, value in out.extra.items():  # e.g. the hidden-state loss per layer pair
                sums["extra"][key] = sums["extra"].get(key, 0) + value.detach()
            sums["input_tokens"] += batch.labels.numel()
            sums["per_example"].append(
                (
                    batch.epoch,
                    batch.example_ids.to(self.device, non_blocking=True),
                    out.ce_per_seq.detach(),
                    out.kd_per_seq.detach(),
                    out.tokens_per_seq,
                )
            )
        return sums

    def loss_sums(
        self, s_hidden: torch.Tensor, targets, labels: torch.Tensor, num_chunks: int | None
    ) -> losses.LossSums:
        out = self.teachers.loss_sums(
            s_hidden,
            self.student.module.head,
            targets,
            labels,
            chunk_size=self.cfg.chunk_size,
            num_chunks=num_chunks,
            **self.objective.loss_kw(),
        )
        return self.student.module.with_router_loss(out)  # MoE students: + the router's balancing loss

    # ------------------------------------------------------------------------------------------ eval, log, save
    def evaluate(self) -> bool:
        """Evaluate, log the metrics and hand them to the callbacks' ``on_eval``; True when one of them asked for a
        checkpoint at this step (a new best). No eval set: nothing to do."""
        if self.eval_set is None:
            return False
        metrics = self.eval_metrics()
        self.log_metrics(metrics, "Eval")
        return any([cb.on_eval(self, metrics) for cb in self.callbacks])  # a list, not a generator: tell every callback

    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        """Held-out loss per supervised token: CE (-> perplexity), KD and the total, over the same batches every
        time."""
        self.student.eval()
        totals = torch.zeros(4, device=self.device)  # total, ce, kd, n_tokens
        stream = data.BatchStream(
            self.eval_set,
            batch_size=self.ds.micro_batch,
            rank=self.rank,
            world_size=self.world_size,
            seed=0,
            pad_token_id=self.tokenizer.pad_token_id,
            shuffle=False,
        )
        available = len(self.eval_set) // (self.ds.micro_batch * self.world_size)  # >= 1, checked in build()
        for _ in range(min(self.cfg.eval_batches or available, available)):
            batch = next(stream).to(self.device)
            chunks = self.sync.plan([batch.labels]).num_chunks[0]  # one collective per eval batch with several ranks
            # Targets before the student's forward, as in a training step: a source may arm hooks on the student
            # there (the hidden-state loss captures the student's layers of the forward that follows).
            targets = self.teachers.targets(batch, "eval")
            out = self.loss_sums(self.student(**batch.inputs), targets, batch.labels, chunks)
            totals += torch.stack([out.total, out.ce, out.kd, out.n_tokens.float()]).float()
        self.student.train()
        total, ce, kd, n = _all_reduce(totals).tolist()
        n = max(n, 1.0)
        return {"loss": total / n, "ce": ce / n, "kd": kd / n, "ppl": math.exp(min(ce / n, 50.0))}

    def log_metrics(self, metrics: dict[str, float], prefix: str) -> None:
        self.history.append({"step": self.step, **{f"{prefix}/{k}": v for k, v in metrics.items()}})
        if self.rank == 0:
            if self.student.monitor.enabled:
                self.student.monitor.write_events([(f"{prefix}/{k}", v, self.step) for k, v in metrics.items()])
            log.info("step %d %s", self.step, " ".join(f"{prefix.lower()}_{k}={v:.4g}" for k, v in metrics.items()))

    def save(self, data_state: dict[str, Any] | None = None) -> str:
        """Checkpoint this step (a collective: every rank), then tell the callbacks (``on_save``); a step already
        saved is not saved again, only told again (e.g. a new best found by the last evaluation). ``data_state``: the
        data position to resume from, if not the stream's current one."""
        if self.last_tag != checkpoint.tag_for(self.step):  # a step is saved once (the last one before its eval)
            state = {
                "step": self.step,
                "data": self.train.state_dict() if data_state is None else data_state,
                "run_config": self.cfg.to_dict(),
            }
            self.last_tag = checkpoint.save(
                self.student,
                self.ckpt_root,
                self.step,
                state,
                keep_last=self.cfg.keep_last,
                hf_files=self._write_hf_files,
            )
        for cb in self.callbacks:
            cb.on_save(self, self.last_tag)
        return self.last_tag

    def _write_hf_files(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.student.module.config.save_pretrained(folder)
        models.copy_generation_config(self.cfg.student, folder)  # as given: eos ids and sampling defaults included
        models.copy_tokenizer(self.cfg.student, folder)  # as given, not the loaded object re-saved
        copy_provenance(self.cfg.student, folder)
        (folder / "ds_config.json").write_text(json.dumps(self.ds.raw, indent=2))

    def resume(self, universal: str | None = None) -> None:
        state = checkpoint.load(self.student, self.ckpt_root, universal)
        self.step, self.last_tag = state["step"], checkpoint.read_latest(self.ckpt_root)
        self.train.load_state_dict(state["data"])

    def release(self) -> None:
        """Drop the student and teacher engines after ``fit`` (``--rounds``: before the next round builds its own).
        The results stay: ``step``, ``exit_code``, ``history``, ``last_tag``, the stream's position."""
        self.student = self.teachers = None


class _Window:
    """Metric sums since the last log line, kept on the device: logging costs one sync per log line, not per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.local = torch.zeros(3, device=self.device)  # this rank's total, ce, kd sums
        self.extra: dict[str, torch.Tensor] = {}  # this rank's sums of LossSums.extra (the same keys on every rank)
        self.n_tokens = torch.zeros((), device=self.device)  # global supervised tokens
        self.input_tokens, self.t0 = 0, time.perf_counter()
        self.steps = 0  # optimizer steps in this window (add is called once per step)
        self.lr = float("nan")

    def add(self, s: dict[str, Any]) -> None:
        self.local += torch.stack([s["total"], s["ce"], s["kd"]]).float()
        for key, value in s.get("extra", {}).items():
            self.extra[key] = self.extra.get(key, 0) + value.float()
        self.n_tokens += s["n_tokens"]
        self.input_tokens += s["input_tokens"]
        self.steps += 1
        self.lr = s["lr"]  # the learning rate the last step trained at

    @contextlib.contextmanager
    def paused(self):
        """Leave the time of the block (eval, checkpoint) out of tokens_per_s: it measures training."""
        start = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - start

    def flush(self, grad_norm, world_size: int) -> dict[str, float]:
        """The window's metrics, then a fresh window; ``grad_norm``: the last step's (``GradNorm.latest()``)."""
        names = list(self.extra)
        total, ce, kd, *extra = _all_reduce(
            torch.cat([self.local, *(v.reshape(1) for v in self.extra.values())])
        ).tolist()
        n = max(self.n_tokens.item(), 1.0)
        seconds = time.perf_counter() - self.t0
        metrics = {
            "loss": total / n,
            "ce": ce / n,
            "kd": kd / n,
            **{key: value / n for key, value in zip(names, extra)},
            "lr": self.lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": self.input_tokens * world_size / seconds,
            # Seconds per optimizer step, rank 0's clock, eval and save left out: what a step costs (the demo's
            # equal-cost comparison adds the teacher's share to it).
            "step_s": seconds / max(self.steps, 1),
        }
        self.reset()
        return metrics


def _progress(rank: int, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=min(start, total), disable=rank != 0, desc="distill", dynamic_ncols=True, file=sys.stderr
    )


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
