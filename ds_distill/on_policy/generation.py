"""Generation sits behind ``Generator`` (one method); ``HFGenerator`` runs transformers' ``generate`` over one of
    direct   ZeRO 0-2: the student's own modules, whole on every rank, no collectives;
    whole    ZeRO-3 when the student fits (``models.REPLICATE_FRACTION`` of a rank's memory): its trained parameters
             are gathered once per optimizer step into a plain copy (a LoRA student's frozen base once per run),
             which generates with no collectives at all;
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
    ending with the first stop token when one was sampled (kept as the last token, nothing after it). Every rank calls
    it at the same micro-batches (a backend may use collectives). ``stop_token_ids``: the ids that end a sample."""

    stop_token_ids: list[int]

    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[list[int]]: ...


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """The ids that end a sample, as the model's own ``generate`` stops: the generation config's ``eos_token_id`` (one
    id or a list, e.g. ``[</s>, <|end|>]`` from generation_config.json) first, then the tokenizer's eos if it is not
    among them. Raises UsageError when neither names one (a sample would never end before max_new_tokens)."""
    from ds_distill.common import UsageError

    eos = getattr(generation_config, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise UsageError(
            f"{tokenizer.name_or_path!r} names no eos token (generation_config.json eos_token_id, tokenizer "
            "eos_token): "
            "set one, or samples never end before max_new_tokens"
        )
    return [int(i) for i in ids]


class _MaskPaddedRows:
    """A transformers logits processor: rows at or past the tokenizer's vocabulary (a head padded to a rounder size,
    e.g. 49152 tokens in 49280 rows) get -inf, so they are never sampled. It runs before temperature, top-k and
    top-p (transformers applies the processors passed to ``generate`` before its sampling warpers), so the filters
    see only real tokens. scores: [batch, rows] float -> a masked copy (unchanged when there is no padding row)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] <= self.vocab_size:
            return scores
        return torch.cat(
            [scores[:, : self.vocab_size], torch.full_like(scores[:, self.vocab_size :], float("-inf"))], -1
        )


class HFGenerator:
    """transformers' ``generate`` (sampling) over the causal LM that ``lm_for_round()`` returns for this call.

    tokenizer: the model's; its length is the vocabulary that may be sampled (padding rows never are) and its pad id
        pads the prompts (its first stop token when it has none).
    generation_config: the model's own (``lm.generation_config``, read from generation_config.json): only its stop
        tokens are used (``stop_token_ids``). Its sampling defaults (top_k, repetition_penalty, ...) are not: a sample
        is drawn exactly as ``Sampling`` says, from the model's temperature-scaled distribution.
    synced: keep stepping until every rank's samples are done (required when each forward is a collective).
    """

    def __init__(self, lm_for_round: Callable[[], nn.Module], tokenizer, *, generation_config, synced: bool):
        self.lm_for_round, self.synced = lm_for_round, synced
        self.stop_token_ids = stop_token_ids(generation_config, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        self.vocab_size = len(tokenizer)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: int) -> list[list[int]]:
        from transformers import GenerationConfig, LogitsProcessorList

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
            top_k=sampling.top_k,  # 0 is off; None would be filled in by transformers' default, 50
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad,
        )
        was_training, own = lm.training, lm.generation_config
        lm.eval()
        # transformers fills every setting left unset from lm.generation_config: a blank one leaves only ours.
        lm.generation_config = GenerationConfig()
        # A private RNG stream: the samples depend on `seed` only, and the trainer's own RNG state is untouched.
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = lm.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList([_MaskPaddedRows(self.vocab_size)]),
                    synced_gpus=self.synced,
                )
        finally:
            lm.generation_config = own
            lm.train(was_training)
        return [cut_at_stop(row, self.stop_token_ids) for row in out[:, width:].tolist()]


def cut_at_stop(tokens: list[int], stop_token_ids: list[int]) -> list[int]:
    """``tokens`` up to and including the first stop token (all of them when none is there): a finished row is
    padded after its stop token, and with several stop ids the pad may be none of them."""
    stops = set(stop_token_ids)
    for t, token in enumerate(tokens):
        if token in stops:
            return tokens[: t + 1]
    return tokens


class _WholeCopy:
    """A plain (unpartitioned) copy of a ZeRO-3 student for generation, with no collectives: its frozen parameters
    (a LoRA student's base) are gathered once per run, its trained ones (every parameter in full training, the
    adapters with LoRA) once per optimizer step, instead of one gather per layer per generated token."""

    def __init__(self, engine):
        self.engine, self.copy, self.step = engine, None, -1

    def __call__(self) -> nn.Module:
        import deepspeed

        if self.step == self.engine.global_steps:
            return self.copy
        lm = self.engine.module.lm
        first = self.copy is None
        params = [(n, p) for n, p in lm.named_parameters() if first or p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            if first:
                self.copy = _plain_copy(self.engine.module, params[0][1].device)
            mine = dict(self.copy.named_parameters())
            for name, p in params:
                mine[name].copy_(p.data)
        self.step = self.engine.global_steps
        return self.copy


def _plain_copy(module, device: torch.device) -> nn.Module:
    """An unpartitioned model of the same structure, parameter names and dtypes as ``module.lm`` (weights not copied).

    Direct construction: transformers partitions a model at construction only in from_pretrained / from_config under
    a ZeRO-3 config, so this copy is whole and has no DeepSpeed hooks. A LoRA student's adapters are injected the same
    way (PEFT, the same config). The construction's random initialisation runs on a forked RNG: the trainer's RNG
    stream (dropout) does not depend on when the first generation happens (a resumed run builds it again).
    """
    lm = module.lm
    with torch.random.fork_rng(devices=[]):
        copy = type(lm)(lm.config)
        if module.lora is not None:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(module.lora.peft_model.peft_config["default"], copy)
    copy = copy.to(device=device).eval()
    copy.requires_grad_(False)
    dtypes = {name: p.dtype for name, p in lm.named_parameters()}  # fp32 adapters on a bf16 base stay fp32
    for name, p in copy.named_parameters():
        p.data = p.data.to(dtypes[name])
    return copy


def make_generator(
    engine, tokenizer, *, world_size: int, rank_memory: int, gather: str = "auto", who: str = "student"
) -> tuple[HFGenerator, str]:
    """(generator over ``engine``, why this mode) -- direct, whole or layered, see the module docstring; ``gather``
    "whole" / "layered" forces a ZeRO-3 mode, "auto" picks by fit. Every mode stops at the model's own stop tokens
    (its generation_config.json, then the tokenizer's eos) and never samples its padding rows. ``engine``: the
    student's, or a frozen teacher's (``who`` names it in the reason; nothing of it trains, so its whole copy is
    gathered once per run)."""
    from ds_distill.models import REPLICATE_FRACTION

    lm = engine.module.lm
    kw = dict(generation_config=lm.generation_config)  # the whole copy is built from config.json alone
    if engine.zero_optimization_stage() < 3:
        return HFGenerator(
            lambda: lm, tokenizer, synced=False, **kw
        ), f"direct: the {who} is whole on every rank (ZeRO < 3)"
    need = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in lm.parameters())
    budget = REPLICATE_FRACTION * rank_memory
    size = f"{who} {need / 2**30:.2f} GiB vs {REPLICATE_FRACTION:.0%} of {rank_memory / 2**30:.1f} GiB per rank"
    trains = any(p.requires_grad for p in lm.parameters())
    if gather == "whole" or (gather == "auto" and need <= budget):
        return HFGenerator(
            _WholeCopy(engine), tokenizer, synced=False, **kw
        ), f"whole: gathered once {'per optimizer step' if trains else 'per run (frozen)'} ({size})"
    return HFGenerator(
        lambda: lm, tokenizer, synced=world_size > 1, **kw
    ), f"layered: ZeRO-3 gathers per layer per token ({size})"


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (seed, rank, index); the odd multiplier keeps nearby tuples apart."""
    out = 0
    for v in values:
        out = (out * 1_000_003 + int(v)) % (2**63)
    return out
