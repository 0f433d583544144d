"""A training checkpoint -> a Hugging Face model folder (the library side of ``python -m ds_distill.export``).

The weights are DeepSpeed's fp32 master weights, consolidated from every rank's ZeRO shards (no GPU and no process
group needed; without ZeRO, the whole module every rank saved), saved as safetensors in the dtype the student trained
in, next to its config, its generation config (byte for byte) and tokenizer. The folder is built by
``common.atomic_folder``: it appears only complete, marked so.
A hidden-state loss's learned projections (``models.projection``) are trained weights but not the model's: they are
written beside the folder (``<folder>.hidden_projection.safetensors``), never into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill.common import UsageError, atomic_folder, read_json
from ds_distill.ds_config import DSConfig
from ds_distill.models import copy_generation_config, copy_tokenizer, lora, projection
from ds_distill.models.layer_map import copy_provenance


def resolve_tag(checkpoint: Path) -> Path:
    """A tag folder, or the checkpoints folder whose ``latest`` names one. UsageError when it is neither."""
    if not checkpoint.exists():
        raise UsageError(f"{checkpoint} does not exist: pass output_dir/checkpoints or one step_* folder in it")
    if (checkpoint / "latest").is_file():
        checkpoint = checkpoint / (checkpoint / "latest").read_text().strip()
    if not (checkpoint / "hf" / "config.json").is_file():
        raise UsageError(
            f"{checkpoint} is not a ds-distill checkpoint (no hf/config.json): pass output_dir/checkpoints or one "
            "step_* folder in it"
        )
    return checkpoint


def read_lora_record(tag_dir: Path) -> dict | None:
    """A LoRA tag's ``hf/lora.json`` (``models.lora.LoraStudent.record``), None for a full-training tag."""
    path = tag_dir / "hf" / lora.RECORD
    return read_json(path, "LoRA record", "re-save the checkpoint") if path.is_file() else None


def trained_state(tag_dir: Path, ds_config: dict) -> dict[str, torch.Tensor]:
    """A tag's trained weights by parameter name, fp32 on the CPU. ZeRO 1-3: DeepSpeed's consolidation of the shards
    (``zero_to_fp32``). Stage 0 (no ZeRO, which ``zero_to_fp32`` does not read): the module DeepSpeed saved whole in
    its model-states file; with bf16 or fp16 its fp32 master copy lives in the optimizer state, so the weights are
    the trained low-precision ones, widened."""
    if DSConfig("", ds_config).zero_stage > 0:
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    saved = torch.load(get_model_state_file(str(tag_dir), 0), map_location="cpu", weights_only=False)
    return {name: t.float() for name, t in saved["module"].items()}


def export_checkpoint(checkpoint: Path | str, out_dir: Path | str, extra_files: dict[str, str] | None = None) -> Path:
    """Export a tag (or ``latest`` of a checkpoints folder) to ``out_dir``, replacing it only once complete;
    ``extra_files``: {name: text} written into the export too (before it is marked complete)."""
    tag_dir = resolve_tag(Path(checkpoint))
    ds_config = json.loads((tag_dir / "hf" / "ds_config.json").read_text())
    dtype = (
        torch.bfloat16
        if ds_config.get("bf16", {}).get("enabled")
        else (torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)
    )
    state = trained_state(tag_dir, ds_config)
    unset_hf_deepspeed_config()  # see below
    state, projections = projection.split_state(state)
    if projections:  # written first: an export marked complete has its projections beside it
        projection.save_beside(out_dir, projections, dtype)
    else:  # a file left by an earlier export to this place is not this checkpoint's
        projection.beside(out_dir).unlink(missing_ok=True)
    if (record := read_lora_record(tag_dir)) is not None:
        with atomic_folder(out_dir) as tmp:
            lora.export_state(record, state, tmp, dtype=dtype)
            copy_tokenizer(tag_dir / "hf", tmp)
            copy_provenance(tag_dir / "hf", tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return Path(out_dir)
    config = AutoConfig.from_pretrained(tag_dir / "hf")
    # In a training process the last engine's HfDeepSpeedConfig is still registered: under ZeRO-3 from_config would
    # build an empty partitioned model. The engines no longer need it (models.load_model registers a fresh one per
    # load).
    unset_hf_deepspeed_config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is stored once (as the embedding); anything else missing means a broken checkpoint.
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UsageError(
            f"{tag_dir} does not match its config: missing {sorted(set(missing) - tied)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    with atomic_folder(out_dir) as tmp:
        model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        copy_generation_config(tag_dir / "hf", tmp)  # save_pretrained rebuilt it from config.json
        copy_tokenizer(tag_dir / "hf", tmp)
        copy_provenance(tag_dir / "hf", tmp)  # a next round's --hidden_layers auto maps the layers from it
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)
