"""Checkpoints: DeepSpeed writes the model/optimizer/scheduler shards; we add what an exact resume needs.

Layout of ``output_dir/checkpoints/``:
    step_00000010/           one DeepSpeed tag (every rank's ZeRO shards + client state)
        rng_rank{r}.pt       each rank's RNG states (dropout and friends continue exactly)
        hf/                  the student's config and tokenizer, so the tag exports on its own
    latest                   names the newest *complete* tag; written last, atomically (write + rename)
"""
from __future__ import annotations

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

from ds_distill.config import UsageError
from ds_distill.distributed import barrier

log = logging.getLogger(__name__)
TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(ckpt_root: Path) -> str | None:
    latest = ckpt_root / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def list_tags(ckpt_root: Path) -> list[str]:
    """Tags on disk, oldest first (complete or not: only ``latest`` vouches for completeness)."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p.name for p in ckpt_root.iterdir() if p.is_dir() and TAG.match(p.name)), key=lambda t: int(TAG.match(t)[1]))


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


def save(engine, ckpt_root: Path, step: int, client_state: dict[str, Any], *, keep_last: int, hf_files: callable) -> str:
    """Save tag ``step_N``; only after every rank finished does rank 0 point ``latest`` at it and prune old tags.

    A crash (or a second signal) during the save leaves ``latest`` on the previous complete tag.
    """
    tag = tag_for(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_root / tag / f"rng_rank{rank}.pt")
    if rank == 0:
        hf_files(ckpt_root / tag / "hf")
    barrier()
    if rank == 0:
        tmp = ckpt_root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_root / "latest")
        tags = list_tags(ckpt_root)
        # Tags newer than this one are leftovers of a save that crashed before 'latest' named it.
        stale = [t for t in tags if int(TAG.match(t)[1]) > step]
        done = [t for t in tags if t not in stale]
        for old in stale + (done[:-keep_last] if keep_last else []):
            shutil.rmtree(ckpt_root / old, ignore_errors=True)
    barrier()
    return tag


def check_world_size(ckpt_root: Path, world_size: int, zero_stage: int) -> None:
    """Before any model loads: a ZeRO checkpoint's optimizer shards fit only the number of ranks that wrote them.

    The data position carries over to any number of ranks (data.BatchStream counts examples globally), and without
    ZeRO (stage 0) every rank holds the whole state; under ZeRO 1-3 DeepSpeed refuses the shards with a traceback.
    """
    tag = read_latest(ckpt_root)
    saved = len(list((ckpt_root / tag).glob("rng_rank*.pt"))) if tag else 0  # one per rank that saved
    if zero_stage > 0 and saved and saved != world_size:
        raise UsageError(f"--resume: {ckpt_root / tag} was written by {saved} ranks (ZeRO stage {zero_stage} shards) and this "
                         f"job has {world_size}: resume it on {saved} ranks (resharding ZeRO optimizer state is not supported)")


def load(engine, ckpt_root: Path) -> dict[str, Any]:
    """Load the tag named by ``latest`` into the engine; returns the client state saved with it."""
    tag = read_latest(ckpt_root)
    if tag is None:
        raise UsageError(f"--resume: no checkpoint under {ckpt_root} (no 'latest' file): drop --resume to start a new run")
    path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_module_strict=True)
    if path is None:
        raise UsageError(f"--resume: checkpoint {ckpt_root / tag} could not be loaded: check the files or delete the tag and point 'latest' at an older one")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = ckpt_root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    log.info("resumed from %s (step %d)", ckpt_root / tag, client_state["step"])
    return client_state
