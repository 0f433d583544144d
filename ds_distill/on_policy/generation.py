"""Generation sits behind ``Generator`` (one method); ``HFGenerator`` runs transformers' ``generate`` over one of
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

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn


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
            ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[b, width - len(p) :] = 1
        config = GenerationConfig(
            do_sample=True,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        was_training = lm.training
        lm.eval()
        # A private RNG stream: the samples depend on `seed` only, and the trainer's own RNG state is untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = lm.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                synced_gpus=self.synced,
            )
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


def make_generator(
    engine, *, pad_token_id: int, eos_token_id: int, world_size: int, rank_memory: int, gather: str = "auto"
) -> tuple[HFGenerator, str]:
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


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (seed, rank, index); the odd multiplier keeps nearby tuples apart."""
    out = 0
    for v in values:
        out = (out * 1_000_003 + int(v)) % (2**63)
    return out
