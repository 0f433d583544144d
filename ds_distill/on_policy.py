"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes the completions, the teacher grades them.

``OnPolicyStream`` wraps the training batch stream. For a seeded fraction ``L`` of the micro-batches (GKD's lambda:
one draw per micro-batch, the same on every rank) it keeps each example's prompt, samples a completion from the
current student and rebuilds the row. The prompt is read from the row's own supervision mask (data.py's one
definition): every token before the last supervised span, i.e. a prompt/completion record's prompt, or a
conversation up to its last assistant reply. Then ``input_ids = prompt + sample`` and labels that supervise the sampled tokens
only (the prompt and everything after the sampled end-of-sequence are masked). The loop is unchanged: the teachers
score the sampled tokens in the same forward as dataset tokens, and the same chunked loss runs over them.

Generation sits behind ``Generator`` (one method); ``HFGenerator`` runs transformers' ``generate`` over one of
    direct   ZeRO 0-2: the student's own modules, whole on every rank, no collectives;
    whole    ZeRO-3 when the student fits (``models.REPLICATE_FRACTION`` of a rank's memory): its parameters are
             gathered once per optimizer step into a plain copy, which generates with no collectives at all;
    layered  ZeRO-3 otherwise: the engine's own modules, whose hooks gather each layer for every token;
             ``synced_gpus`` keeps a rank whose samples ended stepping until every rank is done (no deadlock when
             ranks finish at different lengths, DeepSpeed issue 8262).
Sampling is seeded from (seed, rank, micro-batch index), and that index is part of the stream's checkpoint state,
so a resumed run samples what the uninterrupted run would have.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ds_distill import data
from ds_distill.callbacks import Callback
from ds_distill.config import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled: at most ``max_new_tokens``; ``top_k`` 0 and ``top_p`` 1 mean no filtering."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class Generator(Protocol):
    """A generation backend. ``generate(prompts, sampling, seed)`` -> one completion per prompt: the new token ids,
    ending with the eos token when one was sampled, nothing after it. Every rank calls it at the same micro-batches
    (a backend may use collectives)."""

    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[list[int]]: ...


class HFGenerator:
    """transformers' ``generate`` (sampling) over the causal LM that ``lm_for_round()`` returns for this call.

    synced: keep stepping until every rank's samples are done (required when each forward is a collective).
    """

    def __init__(self, lm_for_round: Callable[[], nn.Module], *, eos_token_id: int, pad_token_id: int, synced: bool):
        self.lm_for_round, self.eos, self.pad, self.synced = lm_for_round, eos_token_id, pad_token_id, synced

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[list[int]]:
        from transformers import GenerationConfig

        lm = self.lm_for_round()
        device = next(lm.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: every row's next token is at the same position
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, width - len(p):] = 1
        config = GenerationConfig(do_sample=True, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, top_k=sampling.top_k or None, eos_token_id=self.eos,
                                  pad_token_id=self.pad)
        was_training = lm.training
        lm.eval()
        # A private RNG stream: the samples depend on `seed` only, and the trainer's own RNG state is untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                              synced_gpus=self.synced)
        lm.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            completions.append(row[: row.index(self.eos) + 1] if self.eos in row else row)
        return completions


class _WholeCopy:
    """A plain (unpartitioned) copy of a ZeRO-3 student, refreshed once per optimizer step: one gather of every
    parameter (a collective) instead of one per layer per generated token."""

    def __init__(self, engine):
        self.engine, self.copy, self.step = engine, None, -1

    def __call__(self) -> nn.Module:
        import deepspeed

        if self.step == self.engine.global_steps:
            return self.copy
        lm = self.engine.module.lm
        params = list(lm.parameters())
        with deepspeed.zero.GatheredParameters(params):
            if self.copy is None:
                # Direct construction: transformers partitions a model at construction only in from_pretrained /
                # from_config under a ZeRO-3 config, so this copy is whole and has no DeepSpeed hooks.
                self.copy = type(lm)(lm.config).to(device=params[0].device, dtype=params[0].dtype).eval()
                self.copy.requires_grad_(False)
            source = dict(lm.named_parameters())
            for name, p in self.copy.named_parameters():
                p.copy_(source[name].data)
        self.step = self.engine.global_steps
        return self.copy


def make_generator(engine, *, pad_token_id: int, eos_token_id: int, world_size: int, rank_memory: int,
                   gather: str = "auto") -> tuple[HFGenerator, str]:
    """(generator over the student engine, why this mode) -- direct, whole or layered, see the module docstring;
    ``gather`` "whole" / "layered" forces a ZeRO-3 mode, "auto" picks by fit."""
    from ds_distill.models import REPLICATE_FRACTION

    lm = engine.module.lm
    kw = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if engine.zero_optimization_stage() < 3:
        return HFGenerator(lambda: lm, synced=False, **kw), "direct: the student is whole on every rank (ZeRO < 3)"
    need = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in lm.parameters())
    budget = REPLICATE_FRACTION * rank_memory
    size = f"student {need / 2**30:.2f} GiB vs {REPLICATE_FRACTION:.0%} of {rank_memory / 2**30:.1f} GiB per rank"
    if gather == "whole" or (gather == "auto" and need <= budget):
        return HFGenerator(_WholeCopy(engine), synced=False, **kw), f"whole: gathered once per optimizer step ({size})"
    return HFGenerator(lambda: lm, synced=world_size > 1, **kw), f"layered: ZeRO-3 gathers per layer per token ({size})"


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (seed, rank, index); the odd multiplier keeps nearby tuples apart."""
    out = 0
    for v in values:
        out = (out * 1_000_003 + int(v)) % (2**63)
    return out


class OnPolicyStream:
    """Wraps a batch stream (``__next__``, ``state_dict``, ``load_state_dict``); see the module docstring.

    A chosen micro-batch's rows become ``prompt + sample`` (at most ``seq_len`` tokens, P = ``prompt_length(labels)``)
    with labels ``[-100] * (P - 1) + sample + [-100]``.
    """

    def __init__(self, stream, generator: Generator, *, fraction: float, sampling: Sampling, seq_len: int,
                 pad_token_id: int, seed: int, rank: int):
        self.stream, self.generator, self.fraction, self.sampling = stream, generator, fraction, sampling
        self.seq_len, self.pad, self.seed, self.rank = seq_len, pad_token_id, seed, rank
        self.dataset = getattr(stream, "dataset", None)  # what the run's manifest fingerprints
        self.micro_batches = 0  # micro-batches yielded so far: the position of every seeded draw
        self.generated_tokens, self.generation_seconds = 0, 0.0  # since the last take_counts()

    def __iter__(self) -> "OnPolicyStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self.stream)
        index = self.micro_batches
        self.micro_batches += 1
        # Seeded by (seed, index) only, so every rank takes the same decision and generates at the same micro-batches.
        draw = torch.rand((), generator=torch.Generator().manual_seed(_mix(self.seed, index))).item()
        if draw >= self.fraction:
            return batch
        return self.sample(batch, seed=_mix(self.seed, self.rank, index))

    def sample(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """The batch with every row's completion replaced by the student's sample for its prompt."""
        ids = batch["example_ids"].tolist()
        lens = [prompt_length(lab) for lab in batch["labels"].tolist()]
        prompts = [batch["input_ids"][b, :n].tolist() for b, n in enumerate(lens)]
        room = self.seq_len - min(lens)  # >= 1: rows whose prompt fills seq_len have no target and were dropped
        start = time.perf_counter()
        samples = self.generator.generate(prompts, Sampling(min(self.sampling.max_new_tokens, room), self.sampling.temperature,
                                                            self.sampling.top_p, self.sampling.top_k), seed)
        self.generation_seconds += time.perf_counter() - start
        self.generated_tokens += sum(len(s) for s in samples)
        rows: dict[str, list] = {"input_ids": [], "labels": [], "row": ids}  # example_ids are row numbers
        for prompt, new in zip(prompts, samples):
            seq = (prompt + new)[: self.seq_len]
            rows["input_ids"].append(seq)
            # labels[t] is the target of position t: supervised for the sampled tokens seq[P:], so t from P - 1.
            rows["labels"].append([data.IGNORE_INDEX] * (len(prompt) - 1) + seq[len(prompt):] + [data.IGNORE_INDEX])
        return data.collate(rows, self.pad)

    def take_counts(self) -> tuple[int, float]:
        """(tokens generated, seconds spent generating) since the last call."""
        out = (self.generated_tokens, self.generation_seconds)
        self.generated_tokens, self.generation_seconds = 0, 0.0
        return out

    def state_dict(self) -> dict:
        """{"stream": the wrapped stream's state, "micro_batches": draws taken}."""
        return {"stream": self.stream.state_dict(), "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        if "micro_batches" not in state:
            raise UsageError("the checkpoint was written by an off-policy run (--on_policy_fraction 0): resume it with "
                             "--on_policy_fraction 0, or start on-policy training in a new --output_dir (or a new round)")
        self.stream.load_state_dict(state["stream"])
        self.micro_batches = int(state["micro_batches"])


def prompt_length(labels: list[int]) -> int:
    """Tokens before the last supervised span of a row (shifted labels: ``labels[t]`` targets token ``t + 1``), >= 1."""
    t = len(labels) - 1
    while t >= 0 and labels[t] == data.IGNORE_INDEX:
        t -= 1
    while t > 0 and labels[t - 1] != data.IGNORE_INDEX:
        t -= 1
    return max(t, 0) + 1


def check_prompts(dataset, where: str) -> None:
    """Refuse data whose examples have no prompt: all supervised from their first target (plain text)."""
    sample = dataset.select(range(min(len(dataset), 256)))["labels"]
    if all(lab[0] != data.IGNORE_INDEX for lab in sample):
        raise UsageError(f"--on_policy_fraction needs prompts, but {where} is supervised from its first token (plain text): "
                         f"use prompt/completion or messages records (the student then writes the completion / the last reply)")


class GenerationRate(Callback):
    """Logs ``Generate/tokens_per_s`` (tokens sampled on all ranks per second of generation) and ``Generate/tokens``
    at the trainer's log steps, beside ``Train/tokens_per_s`` (which includes the generation time)."""

    def __init__(self, stream: OnPolicyStream):
        self.stream = stream

    def on_step_end(self, trainer, step_sums) -> None:
        if trainer.step % trainer.cfg.log_steps and trainer.step != trainer.cfg.max_steps:
            return
        import torch.distributed as dist

        tokens, seconds = self.stream.take_counts()
        t = torch.tensor([float(tokens), seconds], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = t.to(trainer.device)
            dist.all_reduce(t[:1])
            dist.all_reduce(t[1:], op=dist.ReduceOp.MAX)
        tokens, seconds = t.tolist()
        if seconds > 0:
            trainer.log_metrics({"tokens_per_s": tokens / seconds, "tokens": tokens}, "Generate")


def wrap(cfg, stream, student, tokenizer, *, world, rank_memory: int) -> OnPolicyStream:
    """The training stream of ``--on_policy_fraction`` > 0, with its generator chosen by fit (logged on rank 0)."""
    generator, why = make_generator(student, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    world_size=world.world_size, rank_memory=rank_memory, gather=cfg.generation_gather)
    if world.rank == 0:
        log.info("on-policy: %.0f%% of micro-batches sampled by the student; generation %s", 100 * cfg.on_policy_fraction, why)
    sampling = Sampling(cfg.max_new_tokens, cfg.generation_temperature, cfg.top_p, cfg.top_k)
    return OnPolicyStream(stream, generator, fraction=cfg.on_policy_fraction, sampling=sampling, seq_len=cfg.seq_len, pad_token_id=tokenizer.pad_token_id, seed=cfg.seed, rank=world.rank)
