"""Load the student and the teacher(s) as DeepSpeed engines, each under its own ZeRO config, and check vocabularies.

Both models are wrapped in ``HiddenStatesLM``: the same child modules under the same names (so checkpoints and
exports keep the Hugging Face parameter names), but ``forward`` returns the final hidden states ``[B, T, H]``. The
loss then calls the lm_head module itself, chunk by chunk, so full ``[tokens, vocab]`` logits never exist (ZeRO-3's
module hooks gather the partitioned lm_head weight on each call).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from ds_distill.config import DSConfig, UsageError
from ds_distill.losses import OutputHead

log = logging.getLogger(__name__)


class HiddenStatesLM(nn.Module):
    """A causal LM whose forward stops before the lm_head.

    Args:
        lm: a Hugging Face ``*ForCausalLM`` whose children are its decoder (``lm.base_model_prefix``) and its head.
    forward(**model_inputs) -> final hidden states ``[B, T, H]`` (after the final norm).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.decoder_name = lm.base_model_prefix
        # Not a submodule: the children above already hold every parameter once.
        object.__setattr__(self, "lm", lm)
        unsupported = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(lm.config, k, None)]
        if unsupported:
            # The head of these models is more than a Linear: applying lm_head alone would give wrong logits.
            raise UsageError(f"{type(lm).__name__} post-processes its logits ({unsupported}); ds-distill supports causal LMs whose logits are lm_head(hidden)")

    @property
    def head(self) -> OutputHead:
        """The output layer ``[n, H] -> [n, V_model]`` as the loss calls it (the projection alone: models that
        post-process their logits are refused above)."""
        return OutputHead(self.lm.get_output_embeddings())

    @property
    def config(self) -> Any:
        return self.lm.config

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.decoder_name)(**inputs, use_cache=False).last_hidden_state


@dataclass
class LoadedModel:
    model: HiddenStatesLM
    # Keeps the HfDeepSpeedConfig alive while the model is loaded: transformers holds it by weak reference only.
    hf_ds_config: Any


def load_model(path: str, ds: DSConfig, *, trainable: bool) -> LoadedModel:
    """Load a model directory; under ZeRO-3 it is partitioned while loading (zero.Init), never whole on one rank."""
    unset_hf_deepspeed_config()  # the last HfDeepSpeedConfig is global: drop the previous model's
    keep = HfDeepSpeedConfig(ds.raw) if ds.zero_stage == 3 else None
    dtype = torch.bfloat16 if ds.bf16 else (torch.float16 if ds.raw.get("fp16", {}).get("enabled") else torch.float32)
    try:
        # sdpa: packed batches carry a boolean block-diagonal mask, which eager attention would mis-read as additive.
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load model {path!r}: {str(exc).splitlines()[0]}") from None
    if not trainable:
        lm.requires_grad_(False)
        lm.eval()
    return LoadedModel(HiddenStatesLM(lm), keep)


def student_engine(path: str, ds: DSConfig):
    """The student: DeepSpeed engine with the optimizer and scheduler of its JSON."""
    loaded = load_model(path, ds, trainable=True)
    engine, *_ = deepspeed.initialize(
        model=loaded.model, model_parameters=[p for p in loaded.model.parameters() if p.requires_grad], config=ds.raw
    )
    engine.hf_ds_config = loaded.hf_ds_config
    return engine


def teacher_engine(path: str, ds: DSConfig):
    """A frozen teacher: DeepSpeed inference engine (no optimizer), ZeRO-3 sharded or replicated (stage 0)."""
    loaded = load_model(path, ds, trainable=False)
    engine, *_ = deepspeed.initialize(model=loaded.model, config=ds.raw)
    engine.eval()
    engine.hf_ds_config = loaded.hf_ds_config
    return engine


# A replicated teacher costs its full weights on every rank but no per-layer gathers (ZeRO-3 gathers each layer in
# every forward: collectives and module hooks that make the step host-bound on a GPU, issue 9).
REPLICATE_FRACTION = 0.25


def parameter_count(path: str) -> int | None:
    """Parameters stored in a model folder's safetensors files (read from their headers, nothing loaded); None if
    the folder has none (e.g. a .bin or GGUF checkpoint)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            total += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
    return total


def teacher_placement(paths: list[str], *, sharded: str, replicated: str, world_size: int, rank_memory: int,
                      bytes_per_param: int) -> tuple[str, str]:
    """(teacher JSON, why) when the user named none: replicate the teachers if they fit, else shard them (ZeRO-3).

    One rank: always replicated (sharding over one rank saves nothing and still pays every gather). Several ranks:
    replicated when all teachers together take at most ``REPLICATE_FRACTION`` of one rank's memory.
    """
    if world_size == 1:
        return replicated, "one rank: sharding would save nothing"
    counts = [parameter_count(p) for p in paths]
    if any(c is None for c in counts):
        return sharded, "teacher size unknown (no safetensors files)"
    need, budget = sum(counts) * bytes_per_param, REPLICATE_FRACTION * rank_memory
    verdict = "fit" if need <= budget else "do not fit"
    why = f"teachers {need / 2**30:.2f} GiB {verdict} in {REPLICATE_FRACTION:.0%} of {rank_memory / 2**30:.1f} GiB per rank"
    return (replicated if need <= budget else sharded), why


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer exactly as saved (no pad token added: it is written back into checkpoints and exports, where a
    pad = eos would make standard collators mask every eos label; batching picks its own pad id, data.BatchStream)."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load the tokenizer of {path!r}: {str(exc).splitlines()[0]}; save one with tokenizer.save_pretrained") from None


# The files a Hugging Face tokenizer folder may hold (tokenization_utils_base and the slow tokenizers' vocab files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copy a model folder's tokenizer files byte for byte into ``dst``: checkpoints and exports hold the student's
    tokenizer exactly as given (a load + save_pretrained round trip rewrites tokenizer_config.json, e.g. adding
    ``is_local``, and would write back anything set on the loaded object)."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = [shutil.copy2(src / name, dst / name) for name in TOKENIZER_FILES if (src / name).is_file()]
    if (src / "additional_chat_templates").is_dir():
        shutil.copytree(src / "additional_chat_templates", dst / "additional_chat_templates", dirs_exist_ok=True)
    if not copied:
        raise UsageError(f"{src} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save one with tokenizer.save_pretrained")


def shared_vocab_size(student_path: str, student_tok, teacher_paths: list[str]) -> int:
    """The vocabulary distilled over: the tokenizer's real vocabulary, which every model must share.

    Models may pad their embedding matrices beyond the tokenizer (e.g. 49152 vs 49280 rows): those rows are ignored
    (see ``check_output_rows``). Different tokenizers cannot be distilled token by token, so they stop the run.
    """
    vocab = student_tok.get_vocab()
    for path in teacher_paths:
        other = load_tokenizer(path).get_vocab()
        if other != vocab:
            diff = sorted(set(other.items()) ^ set(vocab.items()))[:3]
            raise UsageError(
                f"teacher {path!r} and student {student_path!r} have different tokenizers "
                f"({len(other)} vs {len(vocab)} tokens; e.g. {diff}): distillation needs a shared vocabulary, "
                "so build the student with the teacher's tokenizer (python -m ds_distill.student_init)"
            )
    return len(student_tok)


def check_output_rows(vocab_size: int, engines: list, paths: list[str]) -> None:
    """Every model must score at least the tokenizer's tokens (extra padding rows are fine and ignored)."""
    for engine, path in zip(engines, paths):
        head = engine.module.head.linear
        rows = getattr(head, "out_features", None) or engine.module.config.vocab_size
        if rows < vocab_size:
            raise UsageError(f"model {path!r} has {rows} output rows but the tokenizer has {vocab_size} tokens: resize its embeddings (model.resize_token_embeddings)")
