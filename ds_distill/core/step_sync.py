"""The optimizer step's one collective: every rank's host values that decide the step, agreed in one all-gather.

Before a step's work starts, each rank packs its host values into one small int64 tensor

    [supervised tokens of micro-batch 1 .. A, stop vote of callback 1 .. K]

(token counts from the labels, which stay on the host; votes: the callbacks' ``should_stop`` answers, host booleans).
One ``all_gather_into_tensor`` and one read-back, the step's only host sync, give every rank the same ``StepPlan``:

- ``n_global``: the SUM of all counts, the loss's denominator (every supervised token of the step weighs the same);
- ``num_chunks`` per micro-batch: ceil(MAX over ranks of the count / chunk_size). Under ZeRO-3 each lm_head call is a
  collective gather, so every rank must make the same number of calls (None without --chunk_size);
- ``votes`` per callback: True when some rank voted to stop.

With one rank nothing is gathered and nothing leaves the host: no collective, no host sync.

**When a stop vote takes effect.** Votes are asked at a step boundary, after step N's eval and checkpoint. They travel
in step N+1's collective, which comes after its micro-batches are drawn (their counts are in it) and before any of its
work. If some rank voted, every rank stops *at step N*: the trainer saves step N once (with the data position from
before the draw, so a resumed run reads those micro-batches again) and skips that save when step N is already saved.
A vote cast after the last step is not asked: the run is complete anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ds_distill.common import IGNORE_INDEX


@dataclass
class StepPlan:
    n_global: int  # supervised tokens of the step: all micro-batches, all ranks
    num_chunks: list[int | None]  # loss chunks per micro-batch, the same on every rank
    votes: list[bool]  # per callback, in order: some rank voted to stop

    @property
    def stop(self) -> bool:
        return any(self.votes)


class StepSync:
    """Makes a ``StepPlan`` from this rank's labels and votes: one collective with several ranks, none with one."""

    def __init__(self, world_size: int, chunk_size: int, device: torch.device):
        self.world_size, self.chunk_size, self.device = world_size, chunk_size, device

    def plan(self, labels: Sequence[torch.Tensor], votes: Sequence[bool] = ()) -> StepPlan:
        """labels: each micro-batch's ``[B, T]`` labels, on the host (-100 = not supervised); votes: this rank's stop
        votes, one per callback. Every rank must call this with the same number of micro-batches and votes."""
        local = [int((lab != IGNORE_INDEX).sum()) for lab in labels] + [int(bool(v)) for v in votes]
        rows = [local]
        if self.world_size > 1:
            mine = torch.tensor(local, dtype=torch.int64, device=self.device)
            gathered = torch.empty(self.world_size * len(local), dtype=torch.int64, device=self.device)
            dist.all_gather_into_tensor(gathered, mine)  # flat [world * fields]: the layout gloo and nccl both take
            flat = gathered.tolist()  # the step's one host sync
            rows = [flat[r * len(local) : (r + 1) * len(local)] for r in range(self.world_size)]
        a = len(labels)
        counts = [[row[i] for row in rows] for i in range(a)]
        chunks = [math.ceil(max(c) / self.chunk_size) if self.chunk_size else None for c in counts]
        return StepPlan(
            n_global=sum(map(sum, counts)),
            num_chunks=chunks,
            votes=[any(row[a + k] for row in rows) for k in range(len(votes))],
        )
