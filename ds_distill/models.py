"""Load the student and the teacher(s) as DeepSpeed engines, each under its own ZeRO config, and check vocabularies.

Both models are wrapped in ``HiddenStatesLM``: the same child modules under the same names (so checkpoints and
exports keep the Hugging Face parameter names), but ``forward`` returns the final hidden states ``[B, T, H]``. The
loss then calls ``head`` (an ``OutputHead``: the lm_head module plus whatever the model's own forward applies after it),
chunk by chunk, so full ``[tokens, vocab]`` logits never exist (ZeRO-3's module hooks gather the partitioned lm_head
weight on each call). ``check_logits`` proves at start-up that this gives the model's own logits.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import set_z3_leaf_modules
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from transformers.modeling_outputs import BaseModelOutputWithPast

from ds_distill.config import DSConfig, UsageError
from ds_distill.losses import OutputHead

log = logging.getLogger(__name__)


class HiddenStatesLM(nn.Module):
    """A causal LM whose forward stops before the lm_head.

    Args:
        lm: a Hugging Face ``*ForCausalLM`` whose children are its decoder (``lm.base_model_prefix``) and its head.
    forward(**model_inputs) -> final hidden states ``[B, T, H]`` (after the final norm).
    head -> ``losses.OutputHead``: the projection plus whatever ``lm.forward`` does to its output (see
    ``LogitTransform``), so ``head(forward(x))`` are the model's own logits.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        for name, child in lm.named_children():
            self.add_module(name, child)
        self.decoder_name = lm.base_model_prefix
        # Not a submodule: the children above already hold every parameter once.
        object.__setattr__(self, "lm", lm)
        self.transform = LogitTransform.of(lm)

    @property
    def head(self) -> OutputHead:
        """The output layer ``[n, H] -> [n, V_model]``; its projection is called (never .weight read) so ZeRO-3 gathers it."""
        return OutputHead(self.lm.get_output_embeddings(), self.transform)

    @property
    def config(self) -> Any:
        return self.lm.config

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.decoder_name)(**inputs, use_cache=False).last_hidden_state


class _Output(BaseModelOutputWithPast):
    """A decoder output holding only ``last_hidden_state``; any other field a head reads (router_logits,
    cross_attentions, ...) is None."""

    def __getattr__(self, name: str) -> None:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _Returns(nn.Module):
    """Stands in for a decoder: returns the given tensor as its last hidden state, whatever the inputs."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = z

    def forward(self, *args: Any, **kwargs: Any) -> _Output:
        return _Output(last_hidden_state=self.z)


class LogitTransform:
    """What a model's own ``forward`` does after its output projection (Gemma 2 softcapping, Granite's
    ``logits / logits_scaling``, Cohere's ``logit_scale``, ...), taken from the model itself, not from a list of config
    keys: ``lm.forward`` runs with its decoder replaced by a stub that returns ``z`` and its projection replaced by
    the identity, so whatever comes out as ``.logits`` is ``transform(z)``. ``[n, V] -> [n, V]``, differentiable.
    """

    def __init__(self, lm: nn.Module):
        self.lm = lm
        head = lm.get_output_embeddings()
        names = [n for n, m in lm.named_children() if m is head]
        if head is None or not names or not hasattr(lm, lm.base_model_prefix):
            raise UsageError(f"{type(lm).__name__} is not laid out as decoder + output projection (children {[n for n, _ in lm.named_children()]}): "
                             "ds-distill needs a *ForCausalLM whose logits come from its get_output_embeddings() module")
        self.head_name = names[0]
        params = inspect.signature(lm.forward).parameters
        # MoE heads add a router loss when asked for router logits; the stub has none to give.
        self.kwargs = {"output_router_logits": False} if "output_router_logits" in params else {}

    @classmethod
    def of(cls, lm: nn.Module) -> "LogitTransform | None":
        """The model's transform, or None where it leaves the projection's output unchanged (checked on values
        up to +-100, bit for bit: the chunked loss then calls the projection alone)."""
        transform = cls(lm)
        z = torch.linspace(-100.0, 100.0, 64).reshape(2, 32)
        return None if torch.equal(transform(z).to(z.dtype), z) else transform

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        lm, prefix = self.lm, self.lm.base_model_prefix
        decoder, head = lm._modules[prefix], lm._modules[self.head_name]
        lm._modules[prefix], lm._modules[self.head_name] = _Returns(z[None]), nn.Identity()
        try:
            ids = torch.zeros(1, z.shape[0], dtype=torch.long, device=z.device)
            logits = lm(input_ids=ids, use_cache=False, **self.kwargs).logits[0]
        finally:
            lm._modules[prefix], lm._modules[self.head_name] = decoder, head
        return logits


@dataclass
class LoadedModel:
    model: HiddenStatesLM
    # Keeps the HfDeepSpeedConfig alive while the model is loaded: transformers holds it by weak reference only.
    hf_ds_config: Any


def attn_implementation(path: str, requested: str, *, has_gpu: bool, dtype: torch.dtype, packed_rows: bool = False) -> str:
    """The attention kernel a model runs with: ``requested``, or for "auto" the best the model and machine support:
    flash_attention_2 (installed, GPU, half precision), else sdpa, else eager. Reads config.json only.

    packed_rows: several packed rows per micro-batch. transformers' flash attention separates packed documents only
    in a batch of one row (``_is_packed_sequence``), so "auto" then skips it; asked for explicitly, the start-up probe
    (``check_logits``) refuses it.
    """
    if requested != "auto":
        return requested
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import is_flash_attn_2_available

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config(path)), None)
    if has_gpu and dtype != torch.float32 and not packed_rows and is_flash_attn_2_available() and getattr(cls, "_supports_flash_attn", False):
        return "flash_attention_2"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def model_config(path: str):
    """A model folder's config (config.json only, no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not read the config of model {path!r}: {str(exc).splitlines()[0]}") from None


def check_positions(seq_len: int, paths: list[str]) -> None:
    """Refuse a ``seq_len`` beyond any model's position limit (its ``max_position_embeddings``, which transformers
    maps from ``n_positions`` etc.): learned position tables would index out of range, rotary ones extrapolate."""
    for path in paths:
        limit = getattr(model_config(path).get_text_config(), "max_position_embeddings", None)
        if isinstance(limit, int) and seq_len > limit:
            raise UsageError(f"--seq_len {seq_len} is longer than model {path!r} supports ({limit} positions, "
                             f"max_position_embeddings in its config.json): use --seq_len {limit} or less")


def moe_leaf_modules(model: nn.Module) -> list[type]:
    """Classes of the mixture-of-experts blocks (modules with an ``experts`` child): under ZeRO-3 each is gathered as
    one leaf, so ranks whose tokens pick different experts still make the same collective calls."""
    return sorted({type(m) for m in model.modules() if "experts" in m._modules}, key=lambda c: c.__name__)


def load_model(path: str, ds: DSConfig, *, trainable: bool, attn: str = "auto", packed_rows: bool = False) -> LoadedModel:
    """Load a model directory; under ZeRO-3 it is partitioned while loading (zero.Init), never whole on one rank.

    attn, packed_rows: as ``attn_implementation`` takes them; the choice is logged.
    """
    unset_hf_deepspeed_config()  # the last HfDeepSpeedConfig is global: drop the previous model's
    keep = HfDeepSpeedConfig(ds.raw) if ds.zero_stage == 3 else None
    dtype = torch.bfloat16 if ds.bf16 else (torch.float16 if ds.raw.get("fp16", {}).get("enabled") else torch.float32)
    attn = attn_implementation(path, attn, has_gpu=get_accelerator().device_name() != "cpu", dtype=dtype,
                               packed_rows=packed_rows)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"could not load model {path!r} with attn_implementation={attn}: {str(exc).splitlines()[0]}") from None
    log.info("model %s: %s, attn_implementation=%s", path, type(lm).__name__, attn)
    if ds.zero_stage == 3 and (leaves := moe_leaf_modules(lm)):
        set_z3_leaf_modules(lm, leaves)
        log.info("model %s: ZeRO-3 leaf modules %s", path, [c.__name__ for c in leaves])
    if not trainable:
        lm.requires_grad_(False)
        lm.eval()
    return LoadedModel(HiddenStatesLM(lm), keep)


def student_engine(path: str, ds: DSConfig, attn: str = "auto", packed_rows: bool = False):
    """The student: DeepSpeed engine with the optimizer and scheduler of its JSON."""
    loaded = load_model(path, ds, trainable=True, attn=attn, packed_rows=packed_rows)
    engine, *_ = deepspeed.initialize(
        model=loaded.model, model_parameters=[p for p in loaded.model.parameters() if p.requires_grad], config=ds.raw
    )
    engine.hf_ds_config = loaded.hf_ds_config
    return engine


def teacher_engine(path: str, ds: DSConfig, attn: str = "auto", packed_rows: bool = False):
    """A frozen teacher: DeepSpeed inference engine (no optimizer), ZeRO-3 sharded or replicated (stage 0)."""
    loaded = load_model(path, ds, trainable=False, attn=attn, packed_rows=packed_rows)
    engine, *_ = deepspeed.initialize(model=loaded.model, config=ds.raw)
    engine.eval()
    engine.hf_ds_config = loaded.hf_ds_config
    return engine


# A replicated teacher costs its full weights on every rank but no per-layer gathers (ZeRO-3 gathers each layer in
# every forward: collectives and module hooks that make the step host-bound on a GPU, issue 9).
REPLICATE_FRACTION = 0.25


def parameter_count(path: str) -> int | None:
    """Parameters of the model a folder's config.json describes, counted on an empty-weights instantiation
    (``accelerate.init_empty_weights`` + ``AutoModelForCausalLM.from_config``: meta tensors, no weight file read), so
    .bin, sharded and single-file safetensors checkpoints are sized alike; shared (tied) parameters count once.
    None if the folder has no config transformers can read (e.g. a bare GGUF file)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    # A live ZeRO-3 config (an engine already built) would make from_config partition under zero.Init: count plainly.
    live = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        with init_empty_weights():
            lm = AutoModelForCausalLM.from_config(config)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = live
    # init_empty_weights re-registers every parameter as a new meta tensor, which unties tied embeddings; tie them
    # again outside the context (inside it, tying would be undone the same way).
    lm.tie_weights()
    return sum(p.numel() for p in lm.parameters())


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
        return sharded, "teacher size unknown (no config.json transformers can read)"
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


# Largest |head logits - own logits| accepted, relative to max(1, max |own logits|): the two paths run the same ops
# on differently shaped matmuls, so they differ by rounding only (~1e-6 in fp32, a few bf16 ulps).
_PROBE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@torch.no_grad()
def check_logits(engine, path: str, vocab_size: int, *, packing: bool, doc_len: int = 8) -> None:
    """Start-up probe: the logits the loss uses equal the model's own forward, on two rows of random tokens.

    1. ``head(engine(ids))`` against ``lm(ids).logits`` (the model's own forward, projection and post-processing).
    2. With packing: each row as two packed documents (``position_ids`` restarting at 0, no attention mask) against
       each document alone, through the model's own forward.
    Every rank must call this (under ZeRO-3 each module call is a collective gather); all use the same tokens.
    Raises UsageError naming the model and the largest difference.
    """
    module = engine.module
    was_training = module.training
    engine.eval()
    try:
        # Two rows of two documents: flash attention, for one, finds packed documents only in a single row.
        ids = torch.randint(0, vocab_size, (2, 2 * doc_len), generator=torch.Generator().manual_seed(0)).to(engine.device)
        dtype = next(module.parameters()).dtype
        own = module.lm(input_ids=ids, use_cache=False).logits.float()
        ours = module.head(engine(input_ids=ids)).float()
        _compare(ours, own, dtype, f"model {path!r}: the chunked loss's head does not give the model's own logits",
                 "this model's output layer is not supported; please report it")
        if packing:
            position_ids = torch.arange(doc_len, device=ids.device).repeat(2, 2)
            packed = module.head(engine(input_ids=ids, position_ids=position_ids)).float()
            alone = module.lm(input_ids=ids.reshape(4, doc_len), use_cache=False).logits.float()
            attn = getattr(module.config, "_attn_implementation", "?")
            _compare(packed.reshape(alone.shape), alone, dtype,
                     f"model {path!r} with attn_implementation={attn}: a packed document's logits differ from the document alone",
                     "drop --packing or pick another --attn_implementation")
    finally:
        engine.train(was_training)


def _compare(ours: torch.Tensor, own: torch.Tensor, dtype: torch.dtype, what: str, fix: str) -> None:
    v = min(ours.shape[-1], own.shape[-1])
    diff = (ours[:, :v] - own[:, :v]).abs().max().item()
    tol = _PROBE_RTOL.get(dtype, 1e-2) * max(1.0, own.abs().max().item())
    if not diff <= tol:  # also catches NaN
        raise UsageError(f"{what} (max abs difference {diff:.3g}, tolerance {tol:.3g}): {fix}")
