"""Per-example tracking (``--track_examples``): CE, KD and token count of every training example, in
``output_dir/examples.csv``, for data selection.

Columns: ``step, epoch, example_id, ce, kd, tokens``; ``ce`` and ``kd`` are sums over the example's supervised tokens
(``kd`` as the loss uses it, i.e. scaled by T^2; divide by ``tokens`` for per-token values), ``step`` is the optimizer
step that trained on the example and ``epoch`` the data epoch it was drawn in. Each example appears once per epoch
(examples cut off by the drop-last of an epoch do not appear in that epoch). With ``--packing`` a row is a block of
several documents and ``example_id`` is the block's first document. ``example_id`` is the data's id as given
(integers or strings, e.g. ``conv-1007``; the row number when the data has no ``id`` column); a conversation trained as
one example per assistant turn has one row per turn, all with the conversation's id.

Cost: every step only appends references to the loss's per-sequence device tensors (no host sync). Every
``--log_steps`` steps, at each checkpoint and at the end they are concatenated, gathered from all ranks (one
``all_gather``) and rank 0 hands them to a writer thread, so the file is written off the training thread.

Recipe: train the next round on the hardest examples::

    python -m ds_distill.train ... --output_dir runs/r1 --track_examples
    python -c "from ds_distill.extras.tracking import hardest_examples, write_subset; \\
               write_subset('train.jsonl', hardest_examples('runs/r1/examples.csv', 0.3), 'hard.jsonl')"
    python -m ds_distill.train ... --student runs/r1/final --data hard.jsonl --output_dir runs/r2

``write_subset`` keeps the original ids (as an ``id`` column), so round 2's ``examples.csv`` uses round 1's ids. In
Python the same selection is ``data.get_dataset(path, tok, seq_len=..., example_filter=lambda row: row["id"] in hard)``
(the filter sees each raw row with its ``id``, before tokenising). ``hardest_examples`` returns integer ids when every
id in the file is an integer, else strings; ``write_subset`` compares ids as text, so either works with it.
"""

from __future__ import annotations

import csv
import logging
import math
import queue
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ds_distill.runtime.callbacks import Callback

log = logging.getLogger(__name__)
COLUMNS = ("step", "epoch", "example_id", "ce", "kd", "tokens")


class ExampleTracker(Callback):
    def __init__(self, filename: str = "examples.csv"):
        self.filename = filename
        # Per micro-batch: (step, epoch, example_ids [B], ce [B], kd [B], tokens [B]), device tensors not yet gathered.
        self.pending: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def on_train_start(self, trainer) -> None:
        self.pending = []
        if trainer.rank != 0:
            return
        path = trainer.output_dir / self.filename
        # A resumed run repeats the steps after its checkpoint: drop the rows an earlier attempt wrote for them.
        keep = []
        if trainer.cfg.resume and path.is_file():
            with open(path, newline="") as fh:
                keep = [row for row in csv.DictReader(fh) if int(row["step"]) <= trainer.step]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, COLUMNS)
            writer.writeheader()
            writer.writerows(keep)
        self.thread = threading.Thread(
            target=self._write, args=(path, trainer.source_ids), name="example-tracker", daemon=True
        )
        self.thread.start()

    def on_step_end(self, trainer, step_sums: dict[str, Any]) -> None:
        # One record per micro-batch, with the epoch its Batch was drawn in (a step may cross an epoch boundary).
        for epoch, ids, ce, kd, tokens in step_sums["per_example"]:
            self.pending.append((trainer.step, epoch, ids, ce, kd, tokens))
        if trainer.cfg.is_log_step(trainer.step):
            self.flush(trainer)

    def on_save(self, trainer, tag: str) -> None:
        self.flush(trainer)

    def on_train_end(self, trainer) -> None:
        self.flush(trainer)
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise RuntimeError(f"writing {trainer.output_dir / self.filename} failed") from self.error

    def flush(self, trainer) -> None:
        """Gather the pending records of all ranks; rank 0 queues them for the writer. A collective: every rank
        calls it at the same steps (all ranks run the same number of micro-batches of the same size)."""
        if not self.pending:
            return
        rows = torch.cat(
            [
                torch.stack(
                    [
                        torch.full_like(ce, step, dtype=torch.float64),
                        torch.full_like(ce, epoch, dtype=torch.float64),
                        ids.to(torch.float64),
                        ce.to(torch.float64),
                        kd.to(torch.float64),
                        tokens.to(torch.float64),
                    ],
                    dim=1,
                )
                for step, epoch, ids, ce, kd, tokens in self.pending
            ]
        )  # [N, 6]; float64 holds row numbers and counts exactly
        self.pending = []
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, rows)
            rows = torch.cat(parts)
        if trainer.rank == 0:
            self.queue.put(rows.cpu())

    def _write(self, path: Path, source_ids) -> None:
        """Writer thread: ``source_ids`` maps the batches' row numbers to the data's ids (data.SourceIds)."""
        try:
            with open(path, "a", newline="") as fh:
                writer = csv.writer(fh)
                while (rows := self.queue.get()) is not None:
                    rows = rows.tolist()
                    ids = source_ids([int(r[2]) for r in rows])
                    for (step, epoch, _, ce, kd, tokens), ex in zip(rows, ids):
                        writer.writerow([int(step), int(epoch), ex, f"{ce:.6g}", f"{kd:.6g}", int(tokens)])
                    fh.flush()
        except BaseException as exc:  # reported on the training thread at the end; the thread must not die silently
            self.error = exc
            log.error("example tracker: writing %s failed: %s", path, exc)
            while self.queue.get() is not None:  # keep draining so that the trainer never blocks on a full queue
                pass


def read_examples(csv_path: str | Path) -> list[dict[str, Any]]:
    """The rows of examples.csv: numbers as floats, ``example_id`` as written (text)."""
    with open(csv_path, newline="") as fh:
        return [{k: v if k == "example_id" else float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit() and str(int(text)) == text


def hardest_examples(csv_path: str | Path, fraction: float, key: str = "ce") -> set[int] | set[str]:
    """Ids of the ``fraction`` of examples with the highest per-token ``key`` (``ce`` or ``kd``) at their latest record.

    ``fraction`` in (0, 1]; at least one id is returned. Ties are broken by the smaller id. Ids are ints when every id
    in the file is an integer, else the strings as written. Per-turn examples of one conversation share its id: the
    conversation's latest record counts.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    if key not in ("ce", "kd"):
        raise ValueError(f"key {key!r} must be 'ce' or 'kd'")
    rows = read_examples(csv_path)
    as_int = all(_is_int(row["example_id"]) for row in rows)
    latest: dict[Any, dict[str, Any]] = {}
    for row in rows:  # rows are in step order: later records replace earlier ones
        latest[int(row["example_id"]) if as_int else row["example_id"]] = row
    scores = sorted(latest, key=lambda i: (-latest[i][key] / max(latest[i]["tokens"], 1.0), i))
    return set(scores[: max(1, math.ceil(fraction * len(scores)))])


def write_subset(data_path: str, ids: set[int] | set[str], out_path: str, split: str = "train") -> int:
    """Write the raw rows of ``data_path`` whose example id is in ``ids`` to a JSON-lines file with an ``id`` column.

    Ids follow ``data.get_dataset``: the data's ``id`` column as given, else the row number; they are compared as
    text (``hardest_examples`` may return ints for string ids that look like numbers). Returns the rows written.
    """
    from ds_distill import data

    raw, files = data.load_raw(data_path, split)
    raw = data.with_ids(raw, data_path, files).remove_columns("row")
    wanted = {str(i) for i in ids}
    subset = raw.filter(lambda row: str(row["id"]) in wanted)
    subset.to_json(out_path, lines=True)
    return len(subset)
