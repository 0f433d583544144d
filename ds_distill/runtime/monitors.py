"""DeepSpeed's monitors (csv, tensorboard, wandb, comet) as the trainer uses them: checked and placed before any
model loads.

The trainer logs its metrics through the student engine's ``monitor.write_events``; DeepSpeed builds one writer per
enabled block of the student JSON when the engine starts, i.e. after the models loaded. This module runs before that:
it stops on a block whose package is missing (DeepSpeed would raise an ImportError traceback only after both models
loaded) and points the writers at the run directory unless the JSON names a place.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from ds_distill.common import UsageError

log = logging.getLogger(__name__)

# JSON block -> (module DeepSpeed imports for it, what to install). deepspeed/monitor/utils.py: check_*_availability.
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'ds-distill[tensorboard]' (or: pip install tensorboard)"),
    "wandb": ("wandb", "pip install 'ds-distill[wandb]' (or: pip install wandb)"),
    "comet": ("comet_ml", "pip install 'comet_ml>=3.41.0'"),
}


def enabled_blocks(raw: dict[str, Any]) -> list[str]:
    """The monitor blocks of a DeepSpeed JSON that are switched on, in the order DeepSpeed builds them."""
    return [
        b
        for b in ("tensorboard", "wandb", "csv_monitor", "comet")
        if isinstance(raw.get(b), dict) and raw[b].get("enabled")
    ]


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_packages(raw: dict[str, Any], flag: str = "--deepspeed_config") -> None:
    """Raise one UsageError per run (naming every missing package) if an enabled monitor cannot be imported."""
    missing = [
        (block, *PACKAGES[block])
        for block in enabled_blocks(raw)
        if block in PACKAGES and not module_available(PACKAGES[block][0])
    ]
    if missing:
        raise UsageError(
            f"{flag} enables "
            + "; ".join(f'the "{b}" monitor but the {m!r} package is not installed: {fix}' for b, m, fix in missing)
            + ' (or set "enabled": false)'
        )


def place(raw: dict[str, Any], out: Path, rank: int) -> None:
    """Fill where each enabled writer puts its files (a merge into ``raw``, which the caller logs and saves).

    csv_monitor and tensorboard without an output_path: ``out/monitor/<job_name>`` (job_name defaults to "train").
    wandb: DeepSpeed's ``wandb.init`` names no directory, so wandb writes under ``$WANDB_DIR`` (else the current
    directory); when WANDB_DIR is unset, rank 0 sets it to ``out/monitor`` so the run folder lies with the run.
    """
    for block in ("csv_monitor", "tensorboard"):
        conf = raw.get(block)
        if isinstance(conf, dict) and conf.get("enabled") and not conf.get("output_path"):
            conf["output_path"] = str(out / "monitor")
            conf.setdefault("job_name", "train")
    if "wandb" in enabled_blocks(raw) and rank == 0 and not os.environ.get("WANDB_DIR"):
        (out / "monitor").mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = str(out / "monitor")
        log.info("wandb: WANDB_DIR unset, writing the wandb run folder under %s", out / "monitor" / "wandb")


class WandbRows:
    """Stands in for DeepSpeed's wandb writer so that the trainer's events and DeepSpeed's own share one wandb run.

    DeepSpeed logs each event with ``wandb.log({name: value}, step=step)``, and wandb's step must only grow; but the
    engine writes its own ``Train/Samples/*`` events against the sample count (8, 16, ...) and the trainer writes
    its ``Train/*`` and ``Eval/*`` events against the optimizer step (1, 2, ...), so wandb dropped every trainer
    event ("ignoring partial history record"). Here each write_events call is one row holding its events and its
    x-axis as a column, ``step`` (optimizer steps) or ``samples`` (``Train/Samples/*``); each metric is declared
    against that column (``wandb.define_metric``), which wandb plots as the metric's x-axis.
    """

    enabled = True

    def __init__(self):
        self.declared: set[str] = set()

    def write_events(self, event_list: list[tuple[str, float, int]]) -> None:
        import wandb

        row: dict[str, float] = {}
        for name, value, step in event_list:
            axis = "samples" if name.startswith("Train/Samples/") else "step"
            if name not in self.declared:
                wandb.define_metric(axis, hidden=True)
                wandb.define_metric(name, step_metric=axis)
                self.declared.add(name)
            row[name], row[axis] = float(value), step
        if row and wandb.run is not None:
            wandb.log(row)


def attach(engine) -> None:
    """Route the engine's wandb events (if it has a wandb writer, i.e. rank 0 with wandb enabled) through WandbRows."""
    master = getattr(engine, "monitor", None)
    if getattr(master, "wandb_monitor", None) is not None:
        master.wandb_monitor = WandbRows()
