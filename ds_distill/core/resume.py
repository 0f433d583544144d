"""What ``--resume`` accepts: the settings that give a run its meaning may not change between its attempts.

Each attempt that starts records its settings in ``output_dir/settings.json`` (``settings``): the run config, the
student DeepSpeed JSON's training arithmetic (the global batch, optimizer, scheduler, clipping, precision)
and the content fingerprints of its local inputs (``data``, ``eval_data``, ``chat_template``: a file edited in place
keeps its path). ``check`` compares a resumed attempt with that record before any model loads:

- a change in ``FREE`` (the schedule's length, logging, eval, save and export places, implementation choices that do
  not change what is learnt) is allowed and logged; the number of ranks is not a setting (DeepSpeed's universal
  checkpoint and the global data position handle it) as long as the global batch is kept;
- any other change (data, teachers, student, tokenisation, objective, batch arithmetic, optimizer, scheduler) is
  refused in one line naming each setting with its old and new value, unless ``--resume_allow_changes`` names it
  (a DeepSpeed entry by its dotted path or any prefix of it, e.g. ``optimizer``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ds_distill.common import UsageError, file_fingerprint, write_json_atomic
from ds_distill.config import RunConfig
from ds_distill.core import checkpoint
from ds_distill.core.export import read_lora_record
from ds_distill.ds_config import DSConfig

log = logging.getLogger("ds_distill")
RECORD = "settings.json"
# Run-config fields a resumed attempt may change: when and how much is run, logged, evaluated, saved and exported,
# where, and implementation choices that compute the same thing (loss chunking, attention kernel, prefetching,
# on-policy gathering). The DeepSpeed JSON's path is free; its contents are compared (``deepspeed.*``).
FREE = frozenset(
    {
        "max_steps",
        "eval_steps",
        "eval_batches",
        "log_steps",
        "save_steps",
        "keep_last",
        "resume",
        "resume_allow_changes",
        "output_dir",
        "export",
        "track_examples",
        "early_stopping_patience",
        "early_stopping_min_delta",
        "deepspeed_config",
        "teacher_deepspeed_config",
        "prefetch_batches",
        "chunk_size",
        "attn_implementation",
        "generation_gather",
        "collapse_distinct2_floor",  # when the on-policy monitors warn, not what is learnt
        "collapse_self_nll_fraction",
        "teacher_url_timeout",  # how patiently a served teacher is waited for, not which one
        "teacher_url_retries",
        "teacher_url_wait",
        "rounds",
        "round_overrides",
    }
)
CONTENT = ("data", "eval_data", "chat_template")  # run-config paths whose file contents are part of the settings


def settings(cfg: RunConfig, sds: DSConfig, world_size: int) -> dict[str, Any]:
    """This attempt's settings, flat: {run-config field, ``deepspeed.<dotted key>``, ``<path field>_content``: value}.
    The batch is compared as examples per optimizer step (micro-batch x accumulation x ranks): the loss is normalised
    by the global token count and the data position counts examples of all ranks, so a resume on other ranks with the
    accumulation or micro-batch that keeps it continues the same run (README, resume on another number of ranks)."""
    raw = sds.raw
    ds = {
        "global_batch": sds.micro_batch * sds.grad_accum * world_size,
        "gradient_clipping": raw.get("gradient_clipping"),
        "precision": "bf16" if _enabled(raw, "bf16") else "fp16" if _enabled(raw, "fp16") else "fp32",
        "optimizer": raw.get("optimizer"),
        "scheduler": raw.get("scheduler"),
    }
    content = {f"{name}_content": _content(getattr(cfg, name)) for name in CONTENT}
    return {**cfg.to_dict(), **_flat(ds, "deepspeed"), **content}


def check(cfg: RunConfig, now: dict[str, Any], output_dir: Path, rank: int) -> None:
    """Refuse (one UsageError) the changes since the recorded attempt that are neither ``FREE`` nor named by
    ``--resume_allow_changes``; log the others (rank 0). No record (a run of an older version): nothing to compare."""
    before = read(output_dir)
    if before is None:
        return
    allowed = [n.strip() for n in cfg.resume_allow_changes.split(",") if n.strip()]
    unknown = [n for n in allowed if not any(_names(key, n) for key in now)]
    if unknown:
        raise UsageError(
            f"--resume_allow_changes names unknown settings {unknown}: use run-config fields (e.g. alpha), "
            "deepspeed.<key> (e.g. deepspeed.optimizer) or data_content"
        )
    defaults = RunConfig().to_dict()  # a field added since the record was written had its default then
    changes = [
        (key, before.get(key, defaults.get(key)), value)
        for key, value in now.items()
        if before.get(key, defaults.get(key)) != value
    ]
    # A local input found at another path with the same content (a moved folder) is the same input.
    moved = {
        k for k in CONTENT if now[f"{k}_content"] is not None and now[f"{k}_content"] == before.get(f"{k}_content")
    }
    # LoRA's own check (models.lora.check_resume, at load) owns its flags and, for a LoRA tag, the base (by content).
    tag = checkpoint.read_latest(checkpoint.ckpt_root(output_dir))
    lora_tag = tag is not None and read_lora_record(checkpoint.ckpt_root(output_dir) / tag) is not None
    owned = {k for k in now if k.startswith("lora_")} | ({"student"} if lora_tag else set())
    refused = [c for c in changes if c[0] not in FREE | moved | owned and not any(_names(c[0], n) for n in allowed)]
    if refused:
        names = ",".join(dict.fromkeys(key.removeprefix("deepspeed.").split(".")[0] for key, _, _ in refused))
        raise UsageError(
            f"--resume: {output_dir} was trained with other settings: {_describe(refused)}: resume with the recorded "
            f"settings, start another --output_dir, or pass --resume_allow_changes {names} to continue anyway"
        )
    told = [c for c in changes if c[0] not in ("resume", "resume_allow_changes")]  # the resume's own flags: no news
    if told and rank == 0:
        log.info("--resume: allowed changes since the last attempt: %s", _describe(told))


def record(now: dict[str, Any], output_dir: Path) -> None:
    """Write this attempt's settings as the run's record (rank 0, once its checks passed)."""
    write_json_atomic(Path(output_dir) / RECORD, now)


def read(output_dir: Path) -> dict[str, Any] | None:
    path = Path(output_dir) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UsageError(
            f"--resume: {path} is not valid JSON (cut short?): delete it to resume without comparing settings"
        ) from None


def _names(key: str, name: str) -> bool:
    """``name`` (of --resume_allow_changes) covers the setting ``key``: itself, a dotted prefix, or a DeepSpeed
    entry without its ``deepspeed.`` prefix (``optimizer`` covers ``deepspeed.optimizer.params.lr``)."""
    return any(key == n or key.startswith(f"{n}.") for n in (name, f"deepspeed.{name}"))


def _describe(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in changes)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _flat(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def _enabled(raw: dict[str, Any], key: str) -> bool:
    return bool(raw.get(key, {}).get("enabled"))


def _content(path: str) -> Any:
    """What identifies a local file's or folder's contents (sha256, or sizes by name), None for no path; a hub name
    is identified by itself (the run config holds it)."""
    if not path:
        return None
    fp = file_fingerprint(path)
    if fp is None:
        return None
    if "files" in fp:  # a folder: names and sizes (mtimes change with every copy)
        return {name: f["bytes"] for name, f in fp["files"].items()}
    return fp.get("sha256") or fp["bytes"]
