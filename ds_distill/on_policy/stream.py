"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes the completions, the teacher grades them.

``OnPolicyStream`` wraps the training batch stream. For a seeded fraction ``L`` of the micro-batches (GKD's lambda:
one draw per micro-batch, the same on every rank) it keeps each example's prompt, samples a completion from the
current student and rebuilds the row. The prompt is read from the row's own supervision mask (data.py's one
definition): every token before the last supervised span, i.e. a prompt/completion record's prompt, or a
conversation up to its last assistant reply. Then ``input_ids = prompt + sample`` and labels that supervise the sampled
tokens
only (the prompt and everything after the sampled end-of-sequence are masked). The loop is unchanged: the teachers
score the sampled tokens in the same forward as dataset tokens, and the same chunked loss runs over them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from ds_distill import data
from ds_distill.common import IGNORE_INDEX, UsageError
from ds_distill.on_policy.generation import Generator, Sampling, make_generator, mix_seed
from ds_distill.on_policy.monitors import COUNTS, sample_counts

log = logging.getLogger("ds_distill.on_policy")


class OnPolicyStream:
    """Wraps a batch stream (``__next__``, ``state_dict``, ``load_state_dict``); see the module docstring.

    A chosen micro-batch's rows become ``prompt + sample`` (at most ``seq_len`` tokens, P = ``prompt_length(labels)``)
    with labels ``[-100] * (P - 1) + sample + [-100]``.
    stop_token_ids: the ids that end a sample (for the eos rate of ``on_policy.monitors``); default: the generator's.
    anchor: keep the replaced micro-batch as the new one's ``Batch.anchor`` (``--on_policy_anchor``).
    """

    def __init__(
        self,
        stream,
        generator: Generator,
        *,
        fraction: float,
        sampling: Sampling,
        seq_len: int,
        pad_token_id: int,
        seed: int,
        rank: int,
        stop_token_ids: list[int] | None = None,
        anchor: bool = False,
    ):
        self.anchor = anchor
        self.stream, self.generator, self.fraction, self.sampling = stream, generator, fraction, sampling
        self.seq_len, self.pad, self.seed, self.rank = seq_len, pad_token_id, seed, rank
        self.dataset = getattr(stream, "dataset", None)  # what the run's manifest fingerprints
        self.micro_batches = 0  # micro-batches yielded so far: the position of every seeded draw
        self.stop_token_ids = list(stop_token_ids if stop_token_ids is not None else generator.stop_token_ids)
        self.generated_tokens, self.generation_seconds = 0, 0.0  # since the last take_counts()
        self.counts = [0.0] * len(COUNTS)  # the kept samples' sums (on_policy.monitors), since the last take_counts()
        self.sampled: list[bool] = []  # per micro-batch yielded since the last take_sampled(): was it sampled

    def __iter__(self) -> "OnPolicyStream":
        return self

    def __next__(self) -> data.Batch:
        batch = next(self.stream)
        index = self.micro_batches
        self.micro_batches += 1
        # Seeded by (seed, index) only, so every rank takes the same decision and generates at the same micro-batches.
        draw = torch.rand((), generator=torch.Generator().manual_seed(mix_seed(self.seed, index))).item()
        self.sampled.append(bool(draw < self.fraction))
        if draw >= self.fraction:
            return batch
        return self.sample(batch, seed=mix_seed(self.seed, self.rank, index))

    def sample(self, batch: data.Batch, seed: int) -> data.Batch:
        """The batch with every row's completion replaced by the student's sample for its prompt (same examples, so
        the same example ids, epoch and position)."""
        ids = batch.example_ids.tolist()
        lens = [prompt_length(lab) for lab in batch.labels.tolist()]
        prompts = [batch.inputs["input_ids"][b, :n].tolist() for b, n in enumerate(lens)]
        room = self.seq_len - min(lens)  # >= 1: rows whose prompt fills seq_len have no target and were dropped
        start = time.perf_counter()
        samples = self.generator.generate(
            prompts,
            Sampling(
                min(self.sampling.max_new_tokens, room),
                self.sampling.temperature,
                self.sampling.top_p,
                self.sampling.top_k,
            ),
            seed,
        )
        self.generation_seconds += time.perf_counter() - start
        self.generated_tokens += sum(len(s) for s in samples)
        rows: dict[str, list] = {"input_ids": [], "labels": [], "row": ids}  # example_ids are row numbers
        kept = []
        for prompt, new in zip(prompts, samples):
            seq = (prompt + new)[: self.seq_len]
            kept.append(seq[len(prompt) :])
            rows["input_ids"].append(seq)
            # labels[t] is the target of position t: supervised for the sampled tokens seq[P:], so t from P - 1.
            rows["labels"].append([IGNORE_INDEX] * (len(prompt) - 1) + seq[len(prompt) :] + [IGNORE_INDEX])
        self.counts = [a + b for a, b in zip(self.counts, sample_counts(kept, self.stop_token_ids))]
        out = data.Batch.collate(rows, self.pad, epoch=batch.epoch, position=batch.position)
        return dataclasses.replace(out, anchor=batch) if self.anchor else out

    def take_counts(self) -> tuple[list[float], int, float]:
        """(the kept samples' ``COUNTS`` sums, tokens generated, seconds spent generating) since the last call."""
        out = (self.counts, self.generated_tokens, self.generation_seconds)
        self.counts, self.generated_tokens, self.generation_seconds = [0.0] * len(COUNTS), 0, 0.0
        return out

    def take_sampled(self) -> list[bool]:
        """For each micro-batch yielded since the last call, in order: whether the student sampled it."""
        out, self.sampled = self.sampled, []
        return out

    def state_dict(self) -> dict:
        """{"stream": the wrapped stream's state, "micro_batches": draws taken}."""
        return {"stream": self.stream.state_dict(), "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        if "micro_batches" not in state:
            raise UsageError(
                "the checkpoint was written by an off-policy run (--on_policy_fraction 0): resume it with "
                "--on_policy_fraction 0, or start on-policy training in a new --output_dir (or a new round)"
            )
        self.stream.load_state_dict(state["stream"])
        self.micro_batches = int(state["micro_batches"])


def prompt_length(labels: list[int]) -> int:
    """Tokens before the last supervised span of a row (shifted labels: ``labels[t]`` targets token ``t + 1``), >= 1."""
    t = len(labels) - 1
    while t >= 0 and labels[t] == IGNORE_INDEX:
        t -= 1
    while t > 0 and labels[t - 1] != IGNORE_INDEX:
        t -= 1
    return max(t, 0) + 1


def check_prompts(dataset, where: str) -> None:
    """Refuse data whose examples have no prompt: all supervised from their first target (plain text)."""
    sample = dataset.select(range(min(len(dataset), 256)))["labels"]
    if all(lab[0] != IGNORE_INDEX for lab in sample):
        raise UsageError(
            f"--on_policy_fraction needs prompts, but {where} is supervised from its first token (plain text): "
            "use prompt/completion or messages records (the --on_policy_sampler, student or teacher, then writes the "
            "completion / the last reply)"
        )


def wrap(cfg, stream, sampler, tokenizer, *, world, rank_memory: int) -> OnPolicyStream:
    """The training stream of ``--on_policy_fraction`` > 0, with its generator chosen by fit (logged on rank 0).

    sampler: the engine that writes the completions, ``--on_policy_sampler``'s: the student's (GKD), or the one live
    teacher's (the target's own samples, DistillSpec's draft recipe; its stop tokens and padding rows are its own, its
    vocabulary the student's: the two share a tokenizer). A frozen teacher under ZeRO-3 is gathered into its whole
    copy once per run (``generation._WholeCopy``: its step count never moves), or generates layer by layer."""
    generator, why = make_generator(
        sampler,
        tokenizer,
        world_size=world.world_size,
        rank_memory=rank_memory,
        gather=cfg.generation_gather,
        who=cfg.on_policy_sampler,
    )
    if world.rank == 0:
        log.info(
            "on-policy: %.0f%% of micro-batches sampled by the %s; generation %s",
            100 * cfg.on_policy_fraction,
            cfg.on_policy_sampler,
            why,
        )
    sampling = Sampling(cfg.max_new_tokens, cfg.generation_temperature, cfg.top_p, cfg.top_k)
    return OnPolicyStream(
        stream,
        generator,
        fraction=cfg.on_policy_fraction,
        sampling=sampling,
        seq_len=cfg.seq_len,
        pad_token_id=tokenizer.pad_token_id,
        seed=cfg.seed,
        rank=world.rank,
        anchor=cfg.on_policy_anchor > 0,
    )
