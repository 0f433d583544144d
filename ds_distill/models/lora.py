"""A LoRA student (``--lora_r``): PEFT adapters on the student's decoder, wrapped before its DeepSpeed engine is built.

Only the adapters train; the base stays frozen in its own dtype. PEFT injects its layers into the Hugging Face model
in place, so ``HiddenStatesLM`` keeps the model's children and parameter names (``...q_proj.base_layer.weight``,
``...q_proj.lora_A.default.weight``) and the chunked loss calls the untouched ``lm_head`` as before.

Known traps (from TRL/PEFT/DeepSpeed trackers) and how this module avoids them:
    dtype          adapters in the base's dtype by default (``autocast_adapter_dtype=False``); ``--lora_fp32`` keeps
                   them in fp32 (DeepSpeed >= 0.19.3 gathers mixed-dtype ZeRO-3 modules, DeepSpeed #8072).
    checkpointing  reentrant activation checkpointing drops the adapters' gradients when no block input requires
                   grad (the embeddings are frozen): ``enable_input_require_grads`` makes the embedding output do so.
    empty adapter  an adapter saved under ZeRO-3 from the partitioned module is empty (trl #4416): ``save_adapter``
                   gathers the adapters and hands PEFT the gathered state dict.
    merge          PEFT cannot merge under ZeRO-3 and TRL gathers the whole model: ``save_merged`` gathers one adapted
                   module at a time, merges it with PEFT's own formula, writes it to the current shard, releases it.
    resume         checkpoints hold only what trains (``exclude_frozen_parameters``) plus ``LoraStudent.record``: the
    base
                   model's fingerprint, checked on ``--resume`` (core/checkpoint.py) and on export.

Export layout (``final/``, ``best/``, ``python -m ds_distill.export``): the merged Hugging Face model at the top (so
every consumer of an export sees a plain model) and the PEFT adapter folder in ``ADAPTER_DIR`` (``adapter/``), which
``PeftModel.from_pretrained(base, folder / "adapter")`` loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_distill.common import UsageError

ADAPTER_DIR = "adapter"  # the PEFT adapter folder inside an export
RECORD = "lora.json"  # LoraStudent.record as a checkpoint's hf/ folder holds it
ADAPTER = "default"  # PEFT's adapter name
_SAMPLE = 1 << 20  # bytes read from each end and the middle of every weight file for the fingerprint


@dataclass(frozen=True)
class LoraSpec:
    """What ``--lora_*`` asks for. ``target_modules`` empty = every linear layer of the decoder (``decoder_linears``);
    ``alpha`` 0 = ``2 * r``; ``fp32``: adapters in fp32 on a half-precision base (default: the base's dtype)."""

    r: int
    alpha: float = 0.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    dora: bool = False
    fp32: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "LoraSpec | None":
        """The spec of a ``RunConfig`` (None when ``--lora_r`` is 0: full training)."""
        if not cfg.lora_r:
            return None
        return cls(
            cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_target_modules), cfg.lora_dora, cfg.lora_fp32
        )


@dataclass
class LoraStudent:
    """What a LoRA-wrapped ``HiddenStatesLM`` carries (as ``.lora``): the PEFT model around its ``lm``, the spec, and
    the record (base path and fingerprint, PEFT config) written with every checkpoint."""

    peft_model: Any  # peft.PeftModel whose base_model.model is the HiddenStatesLM's lm
    spec: LoraSpec
    record: dict[str, Any] = field(default_factory=dict)


def decoder_linears(lm: nn.Module) -> list[str]:
    """Names (last component, e.g. ``q_proj``) of every ``nn.Linear`` in the decoder (``lm.base_model_prefix``): the
    default targets. The output layer is outside the decoder, so it is never one of them."""
    decoder = getattr(lm, lm.base_model_prefix)
    return sorted({name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, nn.Linear)})


def check_targets(lm: nn.Module, targets: tuple[str, ...], path: str) -> list[str]:
    """The target names to adapt, or UsageError naming the bad one: each must be a linear layer of the decoder (the
    output layer and the embeddings are the chunked loss's and tied: not adaptable here)."""
    linears = decoder_linears(lm)
    for name in targets:
        if name not in linears:
            raise UsageError(
                f"--lora_target_modules {name!r} is not a linear layer of the decoder of {path!r}: use some of "
                f"{' '.join(linears)} (the output layer and embeddings cannot take adapters here)"
            )
    return list(targets) or linears


def check_base(config: Any, path: str, *, has_gpu: bool) -> None:
    """Refuse what PEFT or DeepSpeed cannot do with this base, before it loads."""
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not has_gpu:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise UsageError(
            f"--lora_r: student {path!r} is quantised ({method}), and quantised bases need a GPU kernel: "
            "train on a GPU, or pass an unquantised (bf16/fp32) copy of the model as --student"
        )


def base_fingerprint(path: str | Path) -> str:
    """sha256 over a model folder's config.json and, per weight file (``*.safetensors``, ``*.bin``), its name, size
    and the bytes of its first, middle and last MiB: any other checkpoint (fine-tuned weights change every block)
    differs, at the cost of reading 3 MiB per file, not the whole model."""
    p = Path(path)
    h = hashlib.sha256((p / "config.json").read_bytes())
    weights = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))
    if not weights:
        raise UsageError(f"--lora_r: student {str(p)!r} has no *.safetensors or *.bin weights to adapt")
    for f in weights:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for start in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
                fh.seek(start)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def wrap(lm: nn.Module, spec: LoraSpec, path: str) -> LoraStudent:
    """Inject PEFT adapters into ``lm`` (in place; under ZeRO-3 the base stays partitioned, the new adapters are
    partitioned by ``deepspeed.initialize``) and freeze everything else. Returns the ``LoraStudent`` record."""
    from peft import LoraConfig, get_peft_model
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    targets = check_targets(lm, spec.target_modules, path)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha or 2 * spec.r,
        lora_dropout=spec.dropout,
        target_modules=targets,
        use_dora=spec.dora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(path),
    )
    # autocast_adapter_dtype=True is PEFT's fp32-adapters-on-a-half-base; False leaves them in the base's dtype.
    peft_model = get_peft_model(lm, config, autocast_adapter_dtype=spec.fp32)
    if spec.dora and is_deepspeed_zero3_enabled():
        # PEFT's DoRA forward reads the base weight and lora_A's shape outside their modules' forwards, where ZeRO-3
        # has them partitioned: gather each adapted layer whole (a ZeRO-3 leaf), as for mixture-of-experts blocks.
        from deepspeed.utils import set_z3_leaf_modules
        from peft.tuners.lora import Linear

        set_z3_leaf_modules(lm, [Linear])
    # Reentrant activation checkpointing (transformers' default) computes no parameter gradients inside a block
    # whose inputs do not require grad; with frozen embeddings they would not: the adapters would get none.
    lm.enable_input_require_grads()
    record = {
        "base": str(Path(path).resolve()),
        "base_fingerprint": base_fingerprint(path),
        "lora": {**asdict(spec), "target_modules": list(spec.target_modules)},  # as JSON reads it back
        "target_modules": targets,
    }
    return LoraStudent(peft_model, spec, record)


def check_dtypes(model: nn.Module) -> None:
    """After ``deepspeed.initialize``: the adapters are in fp32 with ``--lora_fp32``, else in the base's dtype, and
    the base is frozen (RuntimeError otherwise: something cast them behind our back)."""
    student: LoraStudent = model.lora
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    want = {torch.float32} if student.spec.fp32 else frozen
    if len(frozen) != 1 or trained != want:
        raise RuntimeError(f"LoRA dtypes: base {frozen}, adapters {trained}, expected adapters in {want}")


def check_resume(record: dict[str, Any] | None, student: LoraStudent | None, where: Path) -> None:
    """``--resume``: the checkpoint at ``where`` (its ``hf/lora.json`` as ``record``, None for a full checkpoint) must
    be of this base and these adapters; UsageError otherwise (nothing is loaded)."""
    if record is None and student is None:
        return
    if student is None:
        raise UsageError(
            f"--resume: {where} holds LoRA adapters (r={record['lora']['r']}) on {record['base']!r}: pass the same "
            "--lora_* flags"
        )
    if record is None:
        raise UsageError(f"--resume: {where} is a full-training checkpoint: drop --lora_r to resume it")
    mine = student.record
    if record["base_fingerprint"] != mine["base_fingerprint"]:
        raise UsageError(
            f"--resume: {where} trained adapters on another base ({record['base']!r}, fingerprint "
            f"{record['base_fingerprint'][:12]}) than --student {mine['base']!r} ({mine['base_fingerprint'][:12]}): "
            "pass the base it was trained on, or a new --output_dir"
        )
    if (record["lora"], record["target_modules"]) != (mine["lora"], mine["target_modules"]):
        raise UsageError(
            f"--resume: {where} was trained with LoRA {record['lora']} on {record['target_modules']}, this run asks "
            "for "
            f"{mine['lora']} on {mine['target_modules']}: pass the same --lora_* flags"
        )


# ------------------------------------------------------------------------------------------------ exports
def _gather(params: list[nn.Parameter]):
    """DeepSpeed's gather (a no-op for parameters that are not ZeRO-3 partitioned); every rank must call it."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def save_adapter(student: LoraStudent, out: Path | str) -> Path:
    """Write the PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) to ``out`` (a collective
    under ZeRO-3: every rank gathers the adapters, which are small; rank 0 writes)."""
    lm = student.peft_model.base_model.model
    trainable = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
    with _gather([p for _, p in trainable]):
        # PeftModel names its state base_model.model.<lm name>; the gathered copies, not the empty partitions.
        state = {f"base_model.model.{n}": p.detach().to("cpu", copy=True) for n, p in trainable}
    if _is_rank0():
        student.peft_model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        _check_adapter_file(Path(out), state)
    return Path(out)


def _check_adapter_file(out: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        n = sum(f.get_slice(k).get_shape()[0] > 0 for k in f.keys())
    if n != len(state):
        raise RuntimeError(f"{out}: {n} non-empty adapter tensors written for {len(state)} trained ones")


def merge_units(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules ``save_merged`` gathers one at a time: each adapted layer (base weight and adapters together) and
    each other module that holds parameters of its own; modules inside an adapted layer are part of it."""
    from peft.tuners.lora import LoraLayer

    units, inside = [], ()
    for name, module in lm.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, LoraLayer):
            units.append((name, module))
            inside = name + "."
        elif any(True for _ in module.parameters(recurse=False)) or any(
            n not in module._non_persistent_buffers_set for n, _ in module.named_buffers(recurse=False)
        ):
            units.append((name, module))
    return units


def _merged_tensors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of one gathered unit: an adapted layer's merged ``weight`` (PEFT's own merge formula:
    ``W + scale * B @ A``, DoRA's through its variant) and bias; a plain module's own parameters."""
    from peft.tuners.lora import LoraLayer

    prefix = f"{name}." if name else ""
    if not isinstance(module, LoraLayer):
        own = {prefix + n: p.detach() for n, p in module.named_parameters(recurse=False)}
        skip = module._non_persistent_buffers_set
        return own | {prefix + n: b for n, b in module.named_buffers(recurse=False) if n not in skip}
    base = module.get_base_layer()
    weight = base.weight.data.clone()
    if ADAPTER in module.lora_variant:
        weight = module.lora_variant[ADAPTER].merge_safe(module, ADAPTER, weight)
        module._cache_pop(f"{ADAPTER}-weight_norm")  # merge_safe caches it for an unmerge that never comes
    else:
        weight += module.get_delta_weight(ADAPTER).to(weight.dtype)
    out = {prefix + "weight": weight}
    if getattr(base, "bias", None) is not None:
        out[prefix + "bias"] = base.bias.detach()
    return out


def save_merged(student: LoraStudent, out: Path | str, *, dtype: torch.dtype, max_shard_bytes: int = 1 << 30) -> Path:
    """Write the merged Hugging Face model (config, generation config, safetensors shards + index) to ``out``.

    A collective under ZeRO-3: every rank gathers one unit of ``merge_units`` at a time (at most one adapted layer is
    whole at any moment), rank 0 merges it into its current shard and the gather is released; a shard is written once
    it reaches ``max_shard_bytes``, so host memory holds at most one shard plus one layer. Tied weights are written
    once (the config ties them again). Tokenizer files are the caller's.
    """
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    lm = student.peft_model.base_model.model
    rank0, out = _is_rank0(), Path(out)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        nonlocal shard
        if shard:
            fname = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shards.append({})
            shard = {}

    for name, module in merge_units(lm):
        params = list(module.parameters(recurse=isinstance(module, LoraLayer)))
        if params and all(id(p) in seen for p in params):  # a tied output layer: written with the embeddings
            continue
        seen.update(id(p) for p in params)
        with _gather(params):
            tensors = _merged_tensors(name, module) if rank0 else {}
            tensors = {k: v.to("cpu", dtype, copy=True) for k, v in tensors.items()}
        if rank0:
            shard.update(tensors)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            if sum(t.numel() * t.element_size() for t in shard.values()) >= max_shard_bytes:
                flush()
    if rank0:
        flush()
        if len(shards) == 1:
            (out / "model-00001.safetensors").rename(out / "model.safetensors")
        else:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = lm.config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(out)
    return out


def export_engine(student: LoraStudent, out: Path | str, *, dtype: torch.dtype) -> Path:
    """A live LoRA engine -> ``out`` (merged model) + ``out/adapter`` (PEFT folder). Every rank calls it."""
    out = Path(out)
    save_merged(student, out, dtype=dtype)
    save_adapter(student, out / ADAPTER_DIR)
    return out


def export_state(
    record: dict[str, Any], state: dict[str, torch.Tensor], out: Path | str, *, dtype: torch.dtype
) -> Path:
    """A LoRA checkpoint's trained tensors (``state``: HF/PEFT names, as DeepSpeed consolidated them) -> ``out``
    (merged model) + ``out/adapter``, on one process without DeepSpeed: the base is read from ``record['base']``
    (refused if its fingerprint changed), wrapped the same way, loaded with ``state`` and merged by PEFT."""
    from transformers import AutoModelForCausalLM

    base = record["base"]
    if not Path(base).is_dir() or base_fingerprint(base) != record["base_fingerprint"]:
        raise UsageError(
            f"the LoRA checkpoint's base {base!r} is gone or changed since training (fingerprint "
            f"{record['base_fingerprint'][:12]}): restore that model folder to export the adapters"
        )
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    spec = LoraSpec(**{**record["lora"], "target_modules": tuple(record["lora"]["target_modules"])})
    student = wrap(lm, spec, base)
    missing = sorted({n for n, p in lm.named_parameters() if p.requires_grad} - set(state))
    unexpected = sorted(set(state) - {n for n, _ in lm.named_parameters()})
    if missing or unexpected:
        raise UsageError(
            f"the LoRA checkpoint does not match its record: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    lm.load_state_dict(state, strict=False)
    return export_engine(student, out, dtype=dtype)
