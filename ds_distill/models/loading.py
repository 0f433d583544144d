"""Loading the student and the teacher(s) as DeepSpeed engines, each under its own ZeRO config; the teachers'
placement by fit; attention kernels and position limits read from config.json."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import set_z3_leaf_modules
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

import ds_distill.models.lora as lora_mod
import ds_distill.models.projection as projection_mod
from ds_distill.common import UsageError
from ds_distill.ds_config import DSConfig
from ds_distill.models.head import HiddenStatesLM, sparse_tied_embedding

log = logging.getLogger("ds_distill.models")


@dataclass
class LoadedModel:
    model: HiddenStatesLM
    # Keeps the HfDeepSpeedConfig alive while the model is loaded: transformers holds it by weak reference only.
    hf_ds_config: Any


def attn_implementation(
    path: str, requested: str, *, has_gpu: bool, dtype: torch.dtype, packed_rows: bool = False
) -> str:
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
    if (
        has_gpu
        and dtype != torch.float32
        and not packed_rows
        and is_flash_attn_2_available()
        and getattr(cls, "_supports_flash_attn", False)
    ):
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
            raise UsageError(
                f"--seq_len {seq_len} is longer than model {path!r} supports ({limit} positions, "
                f"max_position_embeddings in its config.json): use --seq_len {limit} or less"
            )


def moe_leaf_modules(model: nn.Module) -> list[type]:
    """Classes of the mixture-of-experts blocks (modules with an ``experts`` child): under ZeRO-3 each is gathered as
    one leaf, so ranks whose tokens pick different experts still make the same collective calls."""
    return sorted({type(m) for m in model.modules() if "experts" in m._modules}, key=lambda c: c.__name__)


def load_model(
    path: str,
    ds: DSConfig,
    *,
    trainable: bool,
    attn: str = "auto",
    packed_rows: bool = False,
    lora: lora_mod.LoraSpec | None = None,
    gradient_checkpointing: bool = False,
) -> LoadedModel:
    """Load a model directory; under ZeRO-3 it is partitioned while loading (zero.Init), never whole on one rank.

    attn, packed_rows: as ``attn_implementation`` takes them; the choice is logged.
    lora: inject PEFT adapters (``models.lora.wrap``): only they train.
    gradient_checkpointing: the model's own ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable``
    (non-reentrant ``torch.utils.checkpoint``: each decoder layer's activations are recomputed in the backward; works
    with ZeRO-3's gathers, which the recompute repeats).
    """
    unset_hf_deepspeed_config()  # the last HfDeepSpeedConfig is global: drop the previous model's
    keep = HfDeepSpeedConfig(ds.raw) if ds.zero_stage == 3 else None
    dtype = torch.bfloat16 if ds.bf16 else (torch.float16 if ds.raw.get("fp16", {}).get("enabled") else torch.float32)
    has_gpu = get_accelerator().device_name() != "cpu"
    attn = attn_implementation(path, attn, has_gpu=has_gpu, dtype=dtype, packed_rows=packed_rows)
    if lora is not None:
        lora_mod.check_base(model_config(path), path, has_gpu=has_gpu)
        if lora.fp32 and dtype != torch.float32 and ds.zero_stage < 3:
            raise UsageError(
                f"--lora_fp32 with {dtype} under ZeRO-{ds.zero_stage}: DeepSpeed casts every parameter to {dtype} "
                "below ZeRO-3: use a ZeRO-3 --deepspeed_config or drop --lora_fp32"
            )
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(
            f"could not load model {path!r} with attn_implementation={attn}: {str(exc).splitlines()[0]}"
        ) from None
    log.info("model %s: %s, attn_implementation=%s", path, type(lm).__name__, attn)
    if ds.zero_stage == 3 and (leaves := moe_leaf_modules(lm)):
        set_z3_leaf_modules(lm, leaves)
        log.info("model %s: ZeRO-3 leaf modules %s", path, [c.__name__ for c in leaves])
    if gradient_checkpointing:
        if not lm.supports_gradient_checkpointing:
            raise UsageError(
                f"--gradient_checkpointing: model {path!r} ({type(lm).__name__}) does not support gradient "
                "checkpointing in transformers: drop the flag"
            )
        # transformers 5 renamed it activation_checkpointing_enable (the old name warns); both take torch's kwargs.
        enable = getattr(lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if trainable:  # from_pretrained returns eval mode; the loop trains (dropout, checkpointing) and eval() toggles
        lm.train()
    else:
        lm.requires_grad_(False)
        lm.eval()
    student = lora_mod.wrap(lm, lora, path) if lora is not None else None
    if student is not None:
        log.info("model %s: LoRA %s on %s", path, lora, student.record["target_modules"])
    return LoadedModel(HiddenStatesLM(lm, student), keep)


def student_engine(path: str, ds: DSConfig, *, projection: nn.Module | None = None, **load_kw: Any):
    """The student: DeepSpeed engine with the optimizer and scheduler of its JSON (over the adapters only with
    ``lora``). load_kw: ``load_model``'s options (attn, packed_rows, lora, gradient_checkpointing). ``projection``:
    modules trained beside the model (hidden-state losses' ``models.projection.HiddenProjection``), attached as its
    child ``projection.NAME`` before the engine is built, so the engine's optimizer, ZeRO partitioning and
    checkpoints hold them too; in the model's dtype."""
    loaded = load_model(path, ds, trainable=True, **load_kw)
    lora = load_kw.get("lora")
    if projection is not None:
        loaded.model.add_module(projection_mod.NAME, projection.to(next(loaded.model.parameters()).dtype))
    sparse_tied_embedding(loaded.model, ds.zero_stage, get_accelerator().device_name())  # before DeepSpeed's hooks
    engine, *_ = deepspeed.initialize(
        model=loaded.model, model_parameters=[p for p in loaded.model.parameters() if p.requires_grad], config=ds.raw
    )
    engine.hf_ds_config = loaded.hf_ds_config
    if plain_optimizer(engine) and engine.dp_world_size == 1:
        # One rank and no ZeRO optimizer: DeepSpeed's backward would still flatten every gradient into one bucket,
        # all-reduce it over the one rank (x 1/1) and copy it back: +0.24 GiB and ~0.3 s CPU per step on the demo's
        # CPU student (issue 28), for the same gradients. enable_backward_allreduce is DeepSpeed's own switch for it
        # (off in its engines that reduce elsewhere); ZeRO 1-3 keep it, their optimizers take the gradients there.
        engine.enable_backward_allreduce = False
    if lora is not None:
        lora_mod.check_dtypes(engine.module)
    return engine


def plain_optimizer(engine) -> bool:
    """Whether DeepSpeed steps the JSON's torch optimizer with no wrapper of its own (ZeRO 1-3, bf16 and fp16 wrap
    it): stage 0 in fp32. DeepSpeed's own test before clipping with ``clip_fp32_gradients``
    (``DeepSpeedEngine._take_model_step``)."""
    return not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())


def teacher_engine(path: str, ds: DSConfig, attn: str = "auto", packed_rows: bool = False):
    """A frozen teacher: DeepSpeed inference engine (no optimizer), ZeRO-3 sharded or replicated (stage 0)."""
    loaded = load_model(path, ds, trainable=False, attn=attn, packed_rows=packed_rows)
    engine, *_ = deepspeed.initialize(model=loaded.model, config=ds.raw)
    engine.eval()
    engine.hf_ds_config = loaded.hf_ds_config
    return engine


# A student's training state per parameter: weights + gradients + Adam's two moments, fp32 on CPU (4 + 4 + 8); bf16
# weights and gradients + fp32 master weights and moments on GPU (2 + 2 + 4 + 8). Activations come on top, hence the
# fraction.
STUDENT_STATE_BYTES = 16
STUDENT_FIT_FRACTION = 0.5


def student_placement(
    count: int | None, *, zero3: str, one_rank: str, world_size: int, rank_memory: int
) -> tuple[str, str]:
    """(student JSON, why) when the user named none. One rank whose memory holds the student's training state
    (``count`` parameters x ``STUDENT_STATE_BYTES``) within ``STUDENT_FIT_FRACTION``: ``one_rank``
    (``ds_config.default_one_rank_config``: no partitioning), since ZeRO-3 over one rank partitions nothing and still
    pays its per-layer gathers and hooks (issue 28: 12% of the step on CPU). Several ranks, or a student that does not
    fit or whose size is unknown (``count`` None): ZeRO-3, which saves memory."""
    if world_size > 1:
        return zero3, f"{world_size} ranks: ZeRO-3 partitions the student's state over them"
    if count is None:
        return zero3, "student size unknown (no config.json transformers can read)"
    need, budget = count * STUDENT_STATE_BYTES, STUDENT_FIT_FRACTION * rank_memory
    if need <= budget:
        return one_rank, (
            f"one rank: the student's weights, gradients and Adam state ({need / 2**30:.2f} GiB) fit in "
            f"{STUDENT_FIT_FRACTION:.0%} of {rank_memory / 2**30:.1f} GiB, and ZeRO-3 would partition nothing"
        )
    return (
        zero3,
        f"one rank: the student's training state ({need / 2**30:.2f} GiB) does not fit in {STUDENT_FIT_FRACTION:.0%} "
        f"of {rank_memory / 2**30:.1f} GiB",
    )


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


def teacher_placement(
    paths: list[str], *, sharded: str, replicated: str, world_size: int, rank_memory: int, bytes_per_param: int
) -> tuple[str, str]:
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
    why = (
        f"teachers {need / 2**30:.2f} GiB {verdict} in {REPLICATE_FRACTION:.0%} of {rank_memory / 2**30:.1f} GiB "
        "per rank"
    )
    return (replicated if need <= budget else sharded), why
