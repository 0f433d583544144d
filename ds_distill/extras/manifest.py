"""The run manifest: ``output_dir/manifest.json`` says what ran, on what, and what came out.

It holds the resolved run config, both DeepSpeed JSONs as run, package versions, the project's git commit, data
fingerprints, every checkpoint (tag, step, the metrics logged by then), the exports and the final results. Rank 0
rewrites the whole file on every change, atomically (write ``manifest.json.tmp``, then rename), so a crash at any
moment leaves either the previous complete manifest or the new one, never half of one. On ``--resume`` the
checkpoints recorded by earlier attempts are kept, and each earlier attempt's settings, versions, data fingerprints
and results are appended to ``previous_attempts`` (oldest first): the top level describes the latest attempt.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ds_distill.common import file_fingerprint, write_json_atomic
from ds_distill.core import checkpoint
from ds_distill.runtime.callbacks import Callback

log = logging.getLogger(__name__)
# What one attempt (a start or a --resume) records about itself; earlier attempts keep theirs in previous_attempts.
ATTEMPT = ("run_config", "deepspeed", "versions", "git", "data", "started", "resumed_at_step", "results")
PACKAGES = ("torch", "deepspeed", "transformers", "datasets", "accelerate", "sentencepiece", "ds_distill")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["ds_distill"] is None:  # run from a checkout without `pip install -e .`
        import ds_distill

        versions["ds_distill"] = ds_distill.__version__
    return versions


def git_commit() -> dict[str, Any] | None:
    """HEAD of the repository holding this package (and whether the tree has local changes); None outside git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


class Manifest(Callback):
    """Keeps ``output_dir/manifest.json`` up to date (rank 0 only). Put it last so that it sees the others' work."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.path: Path | None = None

    def on_train_start(self, trainer) -> None:
        if trainer.rank != 0:
            return
        out, cfg = trainer.output_dir, trainer.cfg
        self.path = out / "manifest.json"
        previous = json.loads(self.path.read_text()) if cfg.resume and self.path.is_file() else {}
        # Every earlier attempt's record, oldest first: a resume appends to the run's history, never rewrites it.
        earlier = previous.get("previous_attempts", []) + ([{k: previous.get(k) for k in ATTEMPT}] if previous else [])
        self.data = {
            "run_config": cfg.to_dict(),
            "deepspeed": {who: _read_json(out / f"ds_config_{who}.json") for who in ("student", "teacher")},
            "versions": package_versions(),
            "git": git_commit(),
            "data": {
                "train_fingerprint": getattr(trainer.train.dataset, "_fingerprint", None),
                "train_examples": len(trainer.train.dataset),
                "eval_fingerprint": getattr(trainer.eval_set, "_fingerprint", None),
                "train_file": file_fingerprint(cfg.data),
                "eval_file": file_fingerprint(cfg.eval_data) if cfg.eval_data else None,
            },
            # A LoRA student: the base its adapters train on (path, fingerprint) and the LoRA settings.
            "lora": trainer.student.module.lora.record if trainer.student.module.lora else None,
            "started": _now(),
            "resumed_at_step": trainer.step if cfg.resume else None,
            "attempts": previous.get("attempts", 0) + 1,
            "previous_attempts": earlier,
            "checkpoints": [c for c in previous.get("checkpoints", []) if c["step"] <= trainer.step],
            "exports": previous.get("exports", {}),
            "results": None,
        }
        self.write()

    def on_save(self, trainer, tag: str) -> None:
        if trainer.rank != 0:
            return
        self.data["checkpoints"] = [c for c in self.data["checkpoints"] if c["tag"] != tag]
        self.data["checkpoints"].append(
            {"tag": tag, "step": trainer.step, "time": _now(), "metrics": latest_metrics(trainer.history)}
        )
        self._record_exports(
            trainer, ("best",)
        )  # early stopping (earlier in the callback list) may just have exported a new best
        self.write()

    def on_train_end(self, trainer) -> None:
        if trainer.rank != 0:
            return
        self._record_exports(trainer, ("final", "best"))
        self.data["results"] = {
            "step": trainer.step,
            "exit_code": trainer.exit_code,
            "finished": _now(),
            "metrics": latest_metrics(trainer.history),
        }
        self.write()

    def _record_exports(self, trainer, names: tuple[str, ...]) -> None:
        """Note the exports present on disk (``best/export.json`` names its step; ``final/`` is this step's)."""
        found = checkpoint.exports(trainer.output_dir)
        for name in names:
            if name in found:
                self.data["exports"][name] = {"step": trainer.step if name == "final" else None, **found[name]}

    def write(self) -> None:
        write_json_atomic(self.path, self.data)


def latest_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """The newest value of every logged metric (``Train/loss``, ``Eval/ppl``...) with the step it was logged at."""
    out: dict[str, float] = {}
    for row in history:
        out.update({k: v for k, v in row.items() if k != "step"})
        out.update({f"{k.split('/')[0]}/step": row["step"] for k in row if k != "step"})
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
