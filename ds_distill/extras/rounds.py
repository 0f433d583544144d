"""Several distillation rounds in one job: ``--rounds K [--round_overrides overrides.json]``.

Round k (1..K) trains into ``output_dir/round_{k}`` (its own checkpoints, manifest and export) starting from the
student exported by round k-1 (``output_dir/round_{k-1}/final``; round 1 starts from ``--student``). The overrides
file is a JSON list of K objects of run-config fields applied to round k only, e.g.
``[{}, {"temperature": 2.0, "data": "hard.jsonl"}]``.

With ``--resume`` a restarted job skips the rounds that are complete (a ``final/`` export marked complete:
``checkpoint.finished_export``; a round killed mid-export is resumed and exports again) and resumes the
interrupted one from its own checkpoints. A round that ends early (preemption) ends the job with its exit code; a
round stopped by early stopping hands its ``best/`` export to the next round.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from ds_distill.common import UsageError, read_json
from ds_distill.config import RunConfig
from ds_distill.core import checkpoint
from ds_distill.core.build import run
from ds_distill.runtime.callbacks import Callback

log = logging.getLogger(__name__)
# Fields a round may not change: they define the sequence of rounds itself.
FIXED_FIELDS = ("output_dir", "rounds", "round_overrides", "resume", "student")


def load_overrides(cfg: RunConfig) -> list[dict[str, Any]]:
    """The per-round overrides (K dicts), checked: a JSON list of K objects of known, changeable fields."""
    if not cfg.round_overrides:
        return [{} for _ in range(cfg.rounds)]
    where = f"--round_overrides {cfg.round_overrides!r}"
    overrides = read_json(
        cfg.round_overrides, "--round_overrides", f"pass a JSON file holding a list of {cfg.rounds} objects"
    )
    if (
        not isinstance(overrides, list)
        or len(overrides) != cfg.rounds
        or not all(isinstance(o, dict) for o in overrides)
    ):
        raise UsageError(f"{where} must hold a JSON list of {cfg.rounds} objects (one per round, {{}} for none)")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    problems = [
        f"round {k}: {name!r} is not a run-config field"
        for k, o in enumerate(overrides, 1)
        for name in o
        if name not in known
    ]
    problems += [
        f"round {k}: {name!r} cannot change between rounds"
        for k, o in enumerate(overrides, 1)
        for name in o
        if name in FIXED_FIELDS
    ]
    if problems:
        raise UsageError(f"{where}: " + "; ".join(problems))
    return overrides


def round_config(cfg: RunConfig, k: int, student: str, overrides: dict[str, Any]) -> RunConfig:
    values = {
        **cfg.to_dict(),
        **overrides,
        "student": student,
        "output_dir": str(Path(cfg.output_dir) / f"round_{k}"),
        "rounds": 1,
        "round_overrides": "",
        "export": True,
    }
    for name in ("teacher", "teacher_weights"):  # a single value in the overrides file means a list of one
        if isinstance(values[name], (str, int, float)):
            values[name] = [values[name]]
    return RunConfig(**values)


def run_rounds(cfg: RunConfig, callbacks_factory: Callable[[RunConfig], list[Callback]]):
    """Run (or resume) the K rounds; returns the Trainers of the rounds run by this call (the last one's exit_code
    is the job's; an empty list when every round was already complete)."""

    cfg.validate()
    overrides = load_overrides(cfg)
    root, student, trainers = Path(cfg.output_dir), cfg.student, []
    for k in range(1, cfg.rounds + 1):
        rdir = root / f"round_{k}"
        done = checkpoint.finished_export(rdir)  # final/, or best/ when early stopping ended the round
        if cfg.resume and done is not None:
            log.info("round %d of %d is complete (%s): skipped", k, cfg.rounds, done)
            student = str(done)
            continue
        rcfg = round_config(cfg, k, student, overrides[k - 1])
        log.info("round %d of %d: %s -> %s", k, cfg.rounds, student, rdir)
        trainer = run(rcfg, callbacks_factory(rcfg))
        trainers.append(trainer)
        done = checkpoint.finished_export(rdir)  # final/, or best/ when early stopping ended the round
        if trainer.exit_code != 0 or done is None:  # preempted or stopped: resume later with --resume
            log.info(
                "round %d stopped at step %d (exit code %d): rerun with --resume to continue",
                k,
                trainer.step,
                trainer.exit_code,
            )
            return trainers
        student = str(done)
        trainer.release()  # free this round's engines before the next round builds its own
    return trainers
