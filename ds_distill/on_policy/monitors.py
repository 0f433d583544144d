"""Collapse monitors of on-policy distillation: what the student's own samples look like, logged with the generation
rate at every log step (``Generate/*``: console, history, DeepSpeed's csv / tensorboard / wandb monitors), and two
thresholds that warn in one line when crossed.

Over a log window (the optimizer steps since the last log line: every step with ``--log_steps 1``), the samples of
every rank, each as kept in its training row (at most ``--seq_len`` with its prompt):

    self_nll    sum of -log p_student(sampled token) / sampled tokens, nats/token: the CE the loss itself computes on
                the sampled micro-batches (the student's logits at temperature 1, as ``evaluate``'s ``gen_self_nll``)
    distinct_n  sum over samples of #distinct n-grams / sum over samples of #n-grams, n = 1, 2 (distinct-n, Li et al.
                2016, "A Diversity-Promoting Objective Function for Neural Conversation Models", counted within each
                sample and pooled, so that it does not depend on how many samples a window holds; the stop token is
                left out)
    length      sampled tokens per sample (its stop token included)
    eos_rate    the fraction of samples that ended in a stop token (the others ran into --max_new_tokens or --seq_len)

A collapse shows as samples that repeat themselves (distinct_2 falls) and a student ever surer of them (self_nll falls
while the teacher's view does not improve: issue 29's run went from 3.98 to 2.92 nats/token, 0.73 of its start).
``CollapseWatch`` warns once per crossing: distinct_2 below ``--collapse_distinct2_floor``, or self_nll below
``--collapse_self_nll_fraction`` x the first window's self_nll (this attempt's first: a resumed run starts afresh).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ds_distill.runtime.callbacks import Callback

log = logging.getLogger("ds_distill.on_policy")

# The host sums of a window, in this order (one float64 vector, all-reduced with the device sums).
COUNTS = ("samples", "tokens", "eos", "unique_1", "ngrams_1", "unique_2", "ngrams_2")


def sample_counts(samples: Sequence[Sequence[int]], stop_token_ids: Sequence[int]) -> list[float]:
    """The ``COUNTS`` sums of some samples (token id lists as trained, each ending in a stop token if it ended)."""
    stops = set(stop_token_ids)
    out = [0.0] * len(COUNTS)
    for s in samples:
        ended = bool(s) and s[-1] in stops
        body = list(s[:-1] if ended else s)
        out[0] += 1
        out[1] += len(s)
        out[2] += ended
        for k, n in ((3, 1), (5, 2)):
            grams = [tuple(body[i : i + n]) for i in range(len(body) - n + 1)]
            out[k] += len(set(grams))
            out[k + 1] += len(grams)
    return out


def window_metrics(counts: Sequence[float], nll: float, nll_tokens: float) -> dict[str, float]:
    """The monitors of a window from its ``COUNTS`` sums and the sampled tokens' CE sum and count (all ranks)."""
    c = dict(zip(COUNTS, counts))
    ratio = lambda a, b: a / b if b else float("nan")
    return {
        "self_nll": ratio(nll, nll_tokens),
        "distinct_1": ratio(c["unique_1"], c["ngrams_1"]),
        "distinct_2": ratio(c["unique_2"], c["ngrams_2"]),
        "length": ratio(c["tokens"], c["samples"]),
        "eos_rate": ratio(c["eos"], c["samples"]),
    }


@dataclass
class CollapseWatch:
    """The thresholds (0 turns one off) and what crossing them has said so far: ``check`` returns a warning line for
    each threshold crossed by this window that the previous window had not crossed."""

    distinct2_floor: float
    self_nll_fraction: float
    first_self_nll: float | None = None
    crossed: set[str] = field(default_factory=set)

    def check(self, m: dict[str, float]) -> list[str]:
        if self.first_self_nll is None and not math.isnan(m["self_nll"]):  # the first window with sampled tokens
            self.first_self_nll = m["self_nll"]
        now: dict[str, str] = {}
        if self.distinct2_floor and m["distinct_2"] < self.distinct2_floor:
            now["distinct_2"] = (
                f"on-policy collapse? distinct-2 of the student's samples is {m['distinct_2']:.3f}, below "
                f"--collapse_distinct2_floor {self.distinct2_floor:g}: they repeat themselves"
            )
        if (
            self.self_nll_fraction
            and self.first_self_nll
            and m["self_nll"] < self.self_nll_fraction * self.first_self_nll
        ):
            now["self_nll"] = (
                f"on-policy collapse? the student's NLL of its own samples fell to {m['self_nll']:.3f} nats/token, "
                f"below --collapse_self_nll_fraction {self.self_nll_fraction:g} x its first {self.first_self_nll:.3f}: "
                "it is sharpening onto its own text"
            )
        lines = [line for key, line in now.items() if key not in self.crossed]
        self.crossed = set(now)
        if lines:  # the remedies, once per warning
            lines = [f"{line} (lower the lr, add --on_policy_anchor, or try --loss entropy_aware_kl)" for line in lines]
        return lines


def monitor(cfg, stream) -> "GenerationMonitor":
    """The on-policy run's monitor callback, its thresholds from ``--collapse_distinct2_floor`` and
    ``--collapse_self_nll_fraction``. With ``--on_policy_sampler teacher`` both warnings are off (logged once): the
    frozen teacher's samples cannot collapse onto the student, and the student's NLL of them (``self_nll``, then the
    student's CE on the teacher's text) falls as it learns."""
    if cfg.on_policy_sampler == "teacher":
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info("on-policy: the teacher samples; the collapse warnings are off (its samples cannot collapse)")
        return GenerationMonitor(stream, CollapseWatch(0.0, 0.0))
    return GenerationMonitor(stream, CollapseWatch(cfg.collapse_distinct2_floor, cfg.collapse_self_nll_fraction))


class GenerationMonitor(Callback):
    """At the trainer's log steps, when the window sampled anything: ``Generate/tokens_per_s`` (tokens sampled on all
    ranks per second of generation, beside ``Train/tokens_per_s`` which includes it), ``Generate/tokens``, and the
    collapse monitors of the module docstring; ``watch``'s warnings on rank 0.

    stream: the ``OnPolicyStream`` (``take_window``: its host counts and which micro-batches it sampled). The sampled
    tokens' CE comes from the step's per-micro-batch sums (``step_sums["per_example"]``), kept on the device until the
    log step (one all-reduce per log step, as for the rest of the line)."""

    def __init__(self, stream, watch: CollapseWatch):
        self.stream, self.watch = stream, watch
        self.nll = self.nll_tokens = 0

    def on_step_end(self, trainer, step_sums) -> None:
        sampled = self.stream.take_sampled()
        per_micro_batch = step_sums["per_example"]
        if len(sampled) != len(per_micro_batch):  # the stream is read by the loop only, one step at a time
            raise RuntimeError(f"{len(sampled)} micro-batches drawn for a step of {len(per_micro_batch)}")
        for was_sampled, (_, _, ce, _, tokens) in zip(sampled, per_micro_batch):
            if was_sampled:
                self.nll = self.nll + ce.sum().double()
                self.nll_tokens = self.nll_tokens + tokens.sum().double()
        if not trainer.cfg.is_log_step(trainer.step):
            return
        import torch.distributed as dist

        counts, generated, seconds = self.stream.take_counts()
        on = dict(dtype=torch.float64, device=trainer.device)
        host = torch.tensor([*counts, float(generated)], dtype=torch.float64).to(trainer.device)
        sums = torch.cat([host, torch.stack([torch.as_tensor(v, **on) for v in (self.nll, self.nll_tokens)])])
        longest = torch.tensor([seconds], **on)
        self.nll = self.nll_tokens = 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        *counts, generated, nll, nll_tokens = sums.tolist()
        seconds = longest.item()
        if seconds <= 0:  # nothing sampled in this window
            return
        metrics = {"tokens_per_s": generated / seconds, "tokens": generated, **window_metrics(counts, nll, nll_tokens)}
        trainer.log_metrics(metrics, "Generate")
        for line in self.watch.check(metrics):
            if trainer.rank == 0:
                log.warning(line)
