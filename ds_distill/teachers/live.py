"""Where a micro-batch's teacher targets come from: live teacher engines, or a cache of their top-K (teacher_cache).

The training loop reads ``targets = teachers.targets(...)`` then ``teachers.loss_sums(student_hidden, ...)``; any object
with these two methods is a teacher source:

    targets(batch, split) -> an opaque per-micro-batch value (what loss_sums needs)
        batch: a ``data.Batch`` with its model inputs on the device (``batch.inputs``), labels ``[B, T]`` and
        example_ids ``[B]`` on the host; split: "train" or "eval" (which data the batch came from). Runs without grad.
    loss_sums(student_hidden, student_head, targets, labels, *, chunk_size, num_chunks, **loss_kw) -> losses.LossSums
        chunk_size 0: full logits; else the student head is called per chunk (``num_chunks`` times, see
        ``losses.chunked_loss_sums``). loss_kw: ``Objective.loss_kw()``, the fields of ``losses.LossArgs`` and
        teacher_weights.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ds_distill import losses
from ds_distill.data import alignment
from ds_distill.data.batching import Batch
from ds_distill.losses.cross_tokenizer import chunk_starts, chunk_sums
from ds_distill.runtime.callbacks import Callback

log = logging.getLogger("ds_distill")


class TeacherSource(Protocol):
    def targets(self, batch: Batch, split: str) -> Any: ...

    def loss_sums(
        self,
        student_hidden: torch.Tensor,
        student_head: Callable,
        targets: Any,
        labels: torch.Tensor,
        *,
        chunk_size: int,
        num_chunks: int | None,
        **loss_kw: Any,
    ) -> losses.LossSums: ...


class LiveTeachers:
    """Frozen teacher engines (``models.teacher_engine``; an ensemble when several): targets are their final hidden
    states, the loss calls their heads. No engines (alpha = 1, plain fine-tuning): no forward at all."""

    def __init__(self, engines: list):
        self.engines = list(engines)

    @torch.no_grad()
    def targets(self, batch: Batch, split: str) -> list[torch.Tensor]:
        return [t(**batch.inputs) for t in self.engines]

    @torch.no_grad()
    def logprobs(
        self, hidden: list[torch.Tensor], positions: torch.Tensor, vocab: int, temperature: float
    ) -> list[torch.Tensor]:
        """Each engine's ``log_softmax(head(h) / T)`` over its first ``vocab`` logits at the flat ``[B * T]``
        ``positions`` of its final hidden states ``hidden`` (``targets``): one ``[n, vocab]`` float32 per engine, one
        head call each (also for no positions: under ZeRO-3 a head call gathers, and every rank must make it)."""
        out = []
        for engine, h in zip(self.engines, hidden):
            z = engine.module.head(h.flatten(0, 1)[positions.to(h.device)])[:, :vocab].float()
            out.append(torch.log_softmax(z / temperature, dim=-1))
        return out

    def loss_sums(
        self,
        student_hidden: torch.Tensor,
        student_head: Callable,
        targets: list[torch.Tensor],
        labels: torch.Tensor,
        *,
        chunk_size: int,
        num_chunks: int | None,
        **loss_kw: Any,
    ) -> losses.LossSums:
        heads = [t.module.head for t in self.engines]
        if chunk_size:
            return losses.chunked_loss_sums(
                student_hidden,
                student_head,
                targets,
                heads,
                labels,
                chunk_size=chunk_size,
                num_chunks=num_chunks,
                **loss_kw,
            )
        return losses.loss_sums(student_head(student_hidden), [h(x) for h, x in zip(heads, targets)], labels, **loss_kw)


class CrossTokenizerTeacher:
    """A frozen teacher engine with another tokenizer (``--cross_tokenizer``): it runs on its own ids, which the data
    pipeline aligned with the student's once (``data.alignment``); the loss is ``losses.cross_tokenizer``'s method
    over the chunks, never with ``[tokens, V]`` logits of either model.

    ``targets(batch, split)`` reads the teacher's columns of the micro-batch (``batch.teacher``,
    ``alignment.collate_teacher``); ``vocab_map``: ``(student ids, teacher ids)`` of the mapped tokens
    (``models.vocab_map``) for that method.
    ``report`` sums the alignment reports of the micro-batches seen since it was last read (``take_report``).
    """

    def __init__(
        self,
        engine,
        method: str,
        vocab_map: tuple[list[int], list[int]] | None = None,
        vocab_size: int | None = None,
    ):
        self.engine, self.method, self.vocab_size = engine, method, vocab_size
        self.index = None if vocab_map is None else tuple(torch.tensor(x, dtype=torch.long) for x in vocab_map)
        self.report: torch.Tensor | None = None

    def take_report(self) -> torch.Tensor | None:
        out, self.report = self.report, None
        return out

    def columns(self, batch: Batch, split: str) -> dict[str, Any]:
        """The teacher's columns of the micro-batch (``batch.teacher``); a training batch's report is added up."""
        cross = batch.teacher
        if cross is None:
            raise ValueError(
                "--cross_tokenizer needs batches with the teacher's columns (data.get_dataset teacher_tokenizer)"
            )
        if split == "train":
            self.report = cross["alignment"] if self.report is None else self.report + cross["alignment"]
        return cross

    @torch.no_grad()
    def targets(self, batch: Batch, split: str) -> dict[str, Any]:
        cross = self.columns(batch, split)
        return {**cross, "hidden": teacher_hidden(self.engine, cross, batch.inputs["input_ids"].device)}

    def chunk_logp(self, targets: dict[str, Any], temperature: float, chunk_size: int, num_chunks: int | None):
        """ALM's teacher chunk log-likelihoods ``[C]`` at ``temperature``: its head on its scored positions, or the
        log-probs the targets carry (``teacher_logp`` ``[n]``, from a cache or a server, at the run's temperature)."""
        if "teacher_logp" in targets:
            return scored_chunk_sums(targets["teacher_logp"], targets)
        per_token = own_token_logp(
            targets["hidden"],
            self.engine.module.head,
            targets["teacher_labels"],
            temperature,
            chunk_size,
            num_chunks,
            self.vocab_size,
        )
        return scored_chunk_sums(per_token, targets)

    def loss_sums(
        self,
        student_hidden: torch.Tensor,
        student_head: Callable,
        targets: dict[str, Any],
        labels: torch.Tensor,
        *,
        chunk_size: int,
        num_chunks: int | None,
        **loss_kw: Any,
    ) -> losses.LossSums:
        loss_kw.pop("teacher_weights", None)  # one teacher (checked by the config)
        t_labels = targets["teacher_labels"]
        chunk_size = chunk_size or max(1, t_labels.numel(), student_hidden.shape[0] * student_hidden.shape[1])  # 0: all
        kw = dict(chunk_size=chunk_size, num_chunks=num_chunks, **loss_kw)
        if self.method == "alm":
            t_chunk = self.chunk_logp(targets, loss_kw["temperature"], chunk_size, num_chunks)
            return losses.chunked_alm_loss_sums(
                student_hidden, student_head, labels, targets["chunk_ids"], t_chunk, **kw
            )
        head, hidden, n = self.engine.module.head, targets["hidden"], targets["n_chunks"]
        starts = chunk_starts(targets["teacher_chunk_ids"].flatten(), n).to(hidden.device)
        return losses.chunked_vocab_map_loss_sums(
            student_hidden,
            student_head,
            labels,
            targets["chunk_ids"],
            hidden.flatten(0, 1)[starts],
            head,
            *self.index,
            **kw,
        )


def teacher_hidden(engine, cross: dict[str, Any], device: torch.device) -> torch.Tensor:
    """A teacher engine's final hidden states ``[B, T', H]`` on its own ids (the teacher's columns of a batch,
    ``alignment.collate_teacher``; padded rows masked, or packed rows by their position ids)."""
    keys = ("teacher_input_ids", "teacher_attention_mask", "teacher_position_ids")
    return engine(**{k.removeprefix("teacher_"): cross[k].to(device, non_blocking=True) for k in keys if k in cross})


@torch.no_grad()
def own_token_logp(hidden, head, teacher_labels, temperature, chunk_size, num_chunks, vocab_size=None) -> torch.Tensor:
    """The teacher's log-probability at ``temperature`` of each of its own next tokens where one is scored
    (``teacher_labels`` ``[B, T']`` != -100), in row-major position order: ``[n]`` float32, from its hidden states
    ``[B, T', H]``, its head (its first ``vocab_size`` logits, all when None) called on the scored positions a slice at
    a time: ``num_chunks`` calls when given (the same number on every rank, as ZeRO-3's gathers need, each slice
    ``ceil(n / num_chunks)`` rows), else ``chunk_size`` rows per call. ALM's targets, live and cached alike."""
    pos = (teacher_labels != -100).flatten().nonzero().squeeze(1)
    hs = hidden.flatten(0, 1)[pos.to(hidden.device)]
    lab = teacher_labels.flatten()[pos].to(hidden.device)
    per = chunk_size if num_chunks is None else max(1, -(-hs.shape[0] // max(num_chunks, 1)))
    calls = -(-hs.shape[0] // per) if num_chunks is None else num_chunks
    lps = []
    for k in range(calls):
        z = head(hs[k * per : (k + 1) * per])[:, :vocab_size].float()
        lps.append(torch.log_softmax(z / temperature, -1).gather(-1, lab[k * per : (k + 1) * per, None])[:, 0])
    return torch.cat(lps) if lps else hs.new_zeros(0, dtype=torch.float32)


def scored_chunk_sums(per_token: torch.Tensor, targets: dict[str, Any]) -> torch.Tensor:
    """Per scored teacher position values ``[n]`` (``own_token_logp``'s order) summed into the batch's chunks
    ``[C]`` (``teacher_chunk_ids``)."""
    t_labels = targets["teacher_labels"].flatten()
    ids = targets["teacher_chunk_ids"].flatten()[t_labels != -100]
    return chunk_sums(per_token, ids.to(per_token.device), targets["n_chunks"])


class AlignmentReport(Callback):
    """The per-step alignment report of a ``CrossTokenizerTeacher`` run, every ``--log_steps`` steps: the training
    micro-batches' reports since the last line, summed over the ranks (one small all-reduce at each log step, on every
    rank), logged on rank 0 as ``align/bytes_1to1``, ``align/chunk_tokens``, ``align/bytes_unaligned``
    (``alignment.alignment_metrics``) and kept in ``history`` (one dict per log step, with its ``step``)."""

    def __init__(self, source: CrossTokenizerTeacher):
        self.source, self.history = source, []
        self.sums = torch.zeros(len(alignment.REPORT_KEYS), dtype=torch.long)

    def on_step_end(self, trainer, step_sums) -> None:
        report = self.source.take_report()
        if report is not None:
            self.sums += report
        if trainer.step % trainer.cfg.log_steps and trainer.step != trainer.cfg.max_steps:
            return
        sums = self.sums.to(torch.device(get_accelerator().current_device_name()))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        metrics = alignment.alignment_metrics(dict(zip(alignment.REPORT_KEYS, sums.tolist())))
        self.history.append({"step": trainer.step, **metrics})
        self.sums.zero_()
        if trainer.rank == 0:
            log.info("step %d %s", trainer.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
