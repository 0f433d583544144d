"""Checkpoints and exports: the whole on-disk layout of a run directory (everyone else asks this module).

DeepSpeed writes the model/optimizer/scheduler shards; we add what an exact resume needs. Layout of ``output_dir``:
    checkpoints/
        step_00000010/           one DeepSpeed tag (every rank's ZeRO shards + client state)
            rng_rank{r}.pt       each rank's RNG states (dropout and friends continue exactly)
            hf/                  the student's config and tokenizer, so the tag exports on its own
                lora.json        a LoRA student's base path and fingerprint, LoRA settings (models.lora.RECORD);
                                 its tag holds only the adapters (exclude_frozen_parameters)
        step_00000010_universal/ the tag converted for another number of ranks (universal_for_resume), pruned with it
        latest                   names the newest *complete* tag; written last, atomically (write + rename)
    final/                       the Hugging Face export of the last step (export_final); a LoRA student's is
        adapter/                 merged, with its PEFT adapter folder here (models.lora.ADAPTER_DIR)
    best/                        early stopping's best so far (export_best): the export plus export.json
        .complete                every export is built in <name>.tmp and renamed in once complete, with this mark
                                 (common.atomic_folder): a folder without it is never taken as done (is_export)
        export.json              {"step", "tag", "eval_<metric>"}
        early_stopped.json       written when early stopping ended the run: {"stopped_at", "best_step"}
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ds_distill.common import UsageError, atomic_folder, disk_full, is_complete, write_atomic, write_json_atomic
from ds_distill.core.export import export_checkpoint, read_lora_record
from ds_distill.models import lora
from ds_distill.runtime.distributed import barrier

log = logging.getLogger(__name__)
TAG = re.compile(r"^step_(\d+)$")
UNIVERSAL = "_universal"  # suffix of a tag converted for another number of ranks (universal_for_resume)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The optimizer step of a tag ``step_N`` (``tag_for``'s inverse)."""
    return int(TAG.match(tag)[1])


def ckpt_root(output_dir: Path | str) -> Path:
    return Path(output_dir) / "checkpoints"


def final_dir(output_dir: Path | str) -> Path:
    return Path(output_dir) / "final"


def best_dir(output_dir: Path | str) -> Path:
    return Path(output_dir) / "best"


def is_export(folder: Path) -> bool:
    """A complete Hugging Face export is there: its config and the completion mark, written last (a folder that a
    kill interrupted, e.g. one holding only config.json, is not one)."""
    return (folder / "config.json").is_file() and is_complete(folder)


def export_final(output_dir: Path | str, tag: str) -> Path:
    """Export ``checkpoints/<tag>`` to ``final/`` (rank 0 only: a plain file conversion, no process group)."""
    return export_checkpoint(ckpt_root(output_dir) / tag, final_dir(output_dir))


def export_final_engine(engine, output_dir: Path | str) -> Path:
    """A LoRA student's ``final/`` straight from the engine (every rank calls it): merged one module at a time under
    ZeRO-3 (``models.lora.export_engine``), with the adapter folder, the tokenizer and the provenance as trained."""
    from ds_distill.models import copy_tokenizer
    from ds_distill.models.layer_map import copy_provenance

    out = final_dir(output_dir)
    dtype = next(p.dtype for p in engine.module.parameters() if not p.requires_grad)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    # Built aside and renamed in by rank 0 once every rank's part is written (atomic_folder): never half a final/.
    with atomic_folder(out) if rank0 else contextlib.nullcontext(out.with_name(out.name + ".tmp")) as tmp:
        barrier()  # rank 0 has emptied the temporary folder
        lora.export_engine(engine.module.lora, tmp, dtype=dtype)
        if rank0:
            copy_tokenizer(engine.module.lora.record["base"], tmp)
            copy_provenance(engine.module.lora.record["base"], tmp)
        barrier()
    barrier()
    return out


def export_best(output_dir: Path | str, tag: str, record: dict[str, Any]) -> Path:
    """Export ``checkpoints/<tag>`` to ``best/`` with ``record`` as ``best/export.json`` (rank 0 only). The export is
    built aside and replaces the old ``best/`` only once complete (``atomic_folder``), so a crash keeps the previous
    best."""
    return export_checkpoint(ckpt_root(output_dir) / tag, best_dir(output_dir), {"export.json": json.dumps(record)})


def read_best(output_dir: Path | str) -> dict[str, Any] | None:
    """``best/export.json`` (the step, tag and eval metric of the best export), or None when there is none."""
    record = best_dir(output_dir) / "export.json"
    return json.loads(record.read_text()) if record.is_file() else None


def mark_early_stopped(output_dir: Path | str, info: dict[str, Any]) -> None:
    """Record in ``best/`` that early stopping ended the run (the run is finished, short of max_steps)."""
    (best_dir(output_dir) / "early_stopped.json").write_text(json.dumps(info))


def finished_export(output_dir: Path | str) -> Path | None:
    """The student a finished run hands on: its ``final/`` export, or ``best/`` if early stopping ended it; None
    while the run is unfinished."""
    if is_export(final_dir(output_dir)):
        return final_dir(output_dir)
    if (best_dir(output_dir) / "early_stopped.json").is_file() and is_export(best_dir(output_dir)):
        return best_dir(output_dir)
    return None


def exports(output_dir: Path | str) -> dict[str, dict[str, Any]]:
    """The complete exports present: {"final" / "best": {"path", and best's export.json fields}}."""
    found = {}
    for name, folder in (("final", final_dir(output_dir)), ("best", best_dir(output_dir))):
        if is_export(folder):
            found[name] = {"path": str(folder), **((read_best(output_dir) or {}) if name == "best" else {})}
    return found


def read_latest(ckpt_root: Path) -> str | None:
    latest = ckpt_root / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def list_tags(ckpt_root: Path) -> list[str]:
    """Tags on disk, oldest first (complete or not: only ``latest`` vouches for completeness)."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p.name for p in ckpt_root.iterdir() if p.is_dir() and TAG.match(p.name)), key=step_of)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine, ckpt_root: Path, step: int, client_state: dict[str, Any], *, keep_last: int, hf_files: callable
) -> str:
    """Save tag ``step_N``; only after every rank finished does rank 0 point ``latest`` at it and prune old tags.

    A crash (or a second signal) during the save leaves ``latest`` on the previous complete tag.
    """
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    student = engine.module.lora  # a LoRA student saves its adapters only, and what they were trained on
    try:
        engine.save_checkpoint(
            str(ckpt_root),
            tag=tag,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=bool(student),
        )
        torch.save(rng_state(), ckpt_root / tag / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as exc:
        if disk_full(exc):  # as an OSError naming the tag: the entry point says it in one line (exit 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(ckpt_root / tag)) from exc
        raise
    if rank == 0:
        hf_files(ckpt_root / tag / "hf")
        if student:
            write_json_atomic(ckpt_root / tag / "hf" / lora.RECORD, student.record)
    barrier()
    if rank == 0:
        write_atomic(ckpt_root / "latest", tag)
        tags = list_tags(ckpt_root)
        # Tags newer than this one are leftovers of a save that crashed before 'latest' named it.
        stale = [t for t in tags if step_of(t) > step]
        done = [t for t in tags if t not in stale]
        for old in stale + (done[:-keep_last] if keep_last else []):
            shutil.rmtree(ckpt_root / old, ignore_errors=True)
            shutil.rmtree(ckpt_root / f"{old}{UNIVERSAL}", ignore_errors=True)
    barrier()
    return tag


def saved_world_size(tag_dir: Path) -> int:
    """How many ranks wrote the tag (each saves its RNG states); 0 if it holds none."""
    return len(list(tag_dir.glob("rng_rank*.pt")))


def universal_for_resume(ckpt_root: Path, world_size: int, zero_stage: int, rank: int) -> str | None:
    """Before any model loads, for ``--resume``: the name of the folder to load the latest tag from when it was
    written by another number of ranks under ZeRO 1-3, or None when it loads as it is.

    ZeRO optimizer shards fit only the ranks that wrote them, so such a tag is converted once, on rank 0 while the
    others wait, into DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``) in
    ``checkpoints/<tag>_universal``, which any number of ranks loads with ``"checkpoint": {"load_universal": true}``.
    Without ZeRO every rank saved the whole state. The data position is a global example count (data.BatchStream).
    """
    tag = read_latest(ckpt_root)
    saved = saved_world_size(ckpt_root / tag) if tag else 0
    if zero_stage == 0 or not saved or saved == world_size:
        return None
    if read_lora_record(ckpt_root / tag) is not None:
        # The universal converter needs every parameter's state; a LoRA tag holds the adapters' only.
        raise UsageError(
            f"--resume: {ckpt_root / tag} holds LoRA adapters written by {saved} ranks and this job has {world_size}: "
            f"resume it on {saved} ranks"
        )
    target, failed = ckpt_root / f"{tag}{UNIVERSAL}", None
    if rank == 0 and not target.is_dir():
        log.info(
            "--resume: %s was written by %d ranks and this job has %d: converting it to a universal checkpoint in %s",
            ckpt_root / tag,
            saved,
            world_size,
            target,
        )
        try:
            _to_universal(ckpt_root / tag, target)
        except UsageError as exc:
            failed = exc  # raised after the barrier, so that the other ranks do not wait forever
    barrier()
    if failed is not None:
        raise failed
    if not target.is_dir():  # rank 0 failed (and said why)
        raise UsageError(
            f"--resume: {ckpt_root / tag} was written by {saved} ranks and could not be converted for {world_size}: "
            f"resume it on {saved} ranks"
        )
    return target.name


def _to_universal(tag_dir: Path, target: Path) -> None:
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    try:
        # Built aside and renamed in when complete (atomic_folder; no mark: DeepSpeed reads this folder as it is).
        with atomic_folder(target, mark=False) as tmp:
            args = argparse.Namespace(
                input_folder=str(tag_dir),
                output_folder=str(tmp),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                # ZeRO 1/2 conversion wants a description of tensor/pipeline slicing; pure data parallel has none
                inject_missing_state=True,
            )
            ds_to_universal.main(args)
    except Exception as exc:  # any failure of the converter means the same thing to the user
        raise UsageError(
            f"--resume: converting {tag_dir} to a universal checkpoint failed ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}): resume it on the number of ranks that wrote it"
        ) from None
    (tag_dir.parent / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer; ours is 'latest'


def load(engine, ckpt_root: Path, universal: str | None = None) -> dict[str, Any]:
    """Load the tag named by ``latest`` into the engine (from its ``universal`` conversion when given: the engine was
    then built with ``"checkpoint": {"load_universal": true}``); returns the client state saved with it."""
    tag = read_latest(ckpt_root)
    if tag is None:
        raise UsageError(
            f"--resume: no checkpoint under {ckpt_root} (no 'latest' file): drop --resume to start a new run"
        )
    lora.check_resume(read_lora_record(ckpt_root / tag), engine.module.lora, ckpt_root / tag)
    # A LoRA tag lacks the frozen base (loaded from --student, fingerprint checked above): a non-strict module load;
    # the adapters' names and shapes are fixed by the LoRA settings check_resume compared.
    path, client_state = engine.load_checkpoint(
        str(ckpt_root), tag=universal or tag, load_module_strict=engine.module.lora is None
    )
    if path is None:
        raise UsageError(
            f"--resume: checkpoint {ckpt_root / tag} could not be loaded: check the files or delete the tag and point "
            "'latest' at an older one"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = ckpt_root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # a rank the tag's writers did not have starts from its seeded state
        set_rng_state(torch.load(rng_file, weights_only=False))
    log.info("resumed from %s (step %d)", ckpt_root / (universal or tag), client_state["step"])
    return client_state
