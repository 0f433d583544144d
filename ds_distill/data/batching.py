"""Batching: collation of tokenised rows, the ``Batch`` every stream yields, and the seeded, sharded, exactly
resumable batch stream."""

from __future__ import annotations

import dataclasses

import torch

from ds_distill.common import IGNORE_INDEX, NON_MODEL_KEYS, UsageError
from ds_distill.data.alignment import collate_teacher


def collate(rows: dict[str, list], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Columns of B examples -> a right-padded batch, padded to the longest example (T).

    Returns input_ids [B, T] long, labels [B, T] long (-100 on pads), example_ids [B] int64 (``row``) and either
    attention_mask [B, T] long (1 = token, 0 = pad) or, for packed rows, position_ids [B, T] long restarting at 0 per
    document and no attention mask: transformers then builds per-document causal attention from the positions
    (masking_utils.find_packed_sequence_indices; varlen kernels with flash attention), keeping each model's own
    sliding windows and attention variants. Pads restart at 0 too, so they form one extra block of their own.
    The model must run with ``use_cache=False`` (as ``models.HiddenStatesLM`` does): with a cache, transformers
    ignores packed position_ids.
    """
    lengths = [len(x) for x in rows["input_ids"]]
    B, T = len(lengths), max(lengths)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"])):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    batch = {"input_ids": input_ids}
    if "position_ids" in rows:
        position_ids = torch.zeros((B, T), dtype=torch.long)
        for b, pos in enumerate(rows["position_ids"]):
            position_ids[b, : len(pos)] = torch.tensor(pos, dtype=torch.long)
            position_ids[b, len(pos) :] = torch.arange(T - len(pos))  # the pad block restarts at 0 too
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch["labels"] = labels
    batch["example_ids"] = torch.tensor(rows["row"], dtype=torch.int64)  # row numbers: see the module docstring
    return batch


@dataclasses.dataclass(frozen=True)
class Batch:
    """One micro-batch, as every batch stream yields it (``BatchStream``, ``Prefetcher``, ``OnPolicyStream``).

    Fields:
        inputs: the model inputs, ``model(**batch.inputs)``: input_ids ``[B, T]`` long and either attention_mask
            ``[B, T]`` long or, for packed rows, position_ids ``[B, T]`` long (see ``collate``).
        labels: ``[B, T]`` long, already shifted (``labels[:, t]`` is the target of position t), ``IGNORE_INDEX`` where
            nothing is scored. Stays on the host: the step sync and the loss find the supervised positions there.
        example_ids: ``[B]`` int64, the dataset's row numbers (``data.SourceIds`` maps them to the data's ids).
        epoch: the data epoch the examples were drawn in (0-based).
        position: the index of the batch's first example in that epoch's global order (examples of the epoch read by
            all ranks before this micro-step, plus rank * B): where the batch sits in the data, whatever wraps it.
        teacher: a teacher with another tokenizer (``--cross_tokenizer``): its ids, the chunk maps and the alignment
            report of these examples (``alignment.collate_teacher``), on the host; None otherwise.
        anchor: on-policy with ``--on_policy_anchor``: the dataset's micro-batch whose completions the student's
            samples replaced (same examples), for the anchor's CE (``on_policy.anchor``); None otherwise.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    example_ids: torch.Tensor
    epoch: int
    position: int
    teacher: dict | None = None
    anchor: "Batch | None" = None

    @classmethod
    def collate(cls, rows: dict[str, list], pad_token_id: int, *, epoch: int, position: int) -> "Batch":
        """``collate(rows, pad_token_id)`` split into model inputs, labels and example ids (``NON_MODEL_KEYS``)."""
        columns = collate(rows, pad_token_id)
        inputs = {k: v for k, v in columns.items() if k not in NON_MODEL_KEYS}
        # The teacher's pad id never matters (masked out of attention, never a label), as for the student's.
        teacher = collate_teacher(rows, 0) if "teacher_input_ids" in rows else None
        return cls(inputs, columns["labels"], columns["example_ids"], epoch, position, teacher)

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with its model inputs on ``device`` (``non_blocking``: asynchronous from pinned memory); labels
        and example ids stay on the host."""
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        return dataclasses.replace(self, inputs=inputs, anchor=None if self.anchor is None else self.anchor.to(device))

    def pin_memory(self) -> "Batch":
        """Every tensor copied into pinned (page-locked) host memory, for asynchronous host-to-device copies."""
        return dataclasses.replace(
            self,
            inputs={k: v.pin_memory() for k, v in self.inputs.items()},
            labels=self.labels.pin_memory(),
            example_ids=self.example_ids.pin_memory(),
            anchor=None if self.anchor is None else self.anchor.pin_memory(),
        )


class BatchStream:
    """Endless, seeded, resumable micro-batches of one rank, in one global order whatever the number of ranks.

    Each epoch draws a permutation of the dataset seeded with (seed, epoch). Micro-step k of the epoch covers the
    global examples perm[k*B*W : (k+1)*B*W] (B = batch_size, W = world_size) and rank r takes the r-th B of them: the
    ranks' batches are disjoint, and W ranks x B read the same examples per micro-step as 1 rank x W*B. An epoch ends
    when fewer than B*W examples are left (they are dropped). The position is the count of the epoch's examples read
    by all ranks together, so a checkpoint resumes on any number of ranks with no example skipped or read twice.
    """

    def __init__(
        self,
        dataset,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        pad_token_id: int | None,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        # Tokenizers without a pad token (Llama 3) are common; the pad id's value never matters because pads are
        # masked out of attention and carry label -100, so any valid id will do.
        self.seed, self.pad_token_id, self.shuffle = seed, 0 if pad_token_id is None else pad_token_id, shuffle
        if len(dataset) // world_size < batch_size:
            raise UsageError(
                f"the dataset has {len(dataset)} examples, which gives each of {world_size} ranks "
                f"{len(dataset) // world_size}, fewer than the micro-batch size {batch_size}: use more data or a "
                "smaller batch"
            )
        self.epoch = 0
        self.consumed = 0  # examples of this epoch read by all ranks together
        self._order: list[int] | None = None  # cached global order of `self.epoch`

    @property
    def index(self) -> int:
        """Examples of this epoch read by this rank."""
        return self.consumed // self.world_size

    def _order_of(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        # One generator seed per (seed, epoch) pair; the large odd multiplier keeps pairs apart.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _shard_of(self, epoch: int) -> list[int]:
        """This rank's positions of ``epoch``, in the order it reads them."""
        order, step = self._order_of(epoch), self.batch_size * self.world_size
        start = self.rank * self.batch_size
        return [
            i for k in range(0, len(order) - step + 1, step) for i in order[k + start : k + start + self.batch_size]
        ]

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self.consumed + self.batch_size * self.world_size > len(self.dataset):
            self.epoch, self.consumed, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._order_of(self.epoch)
        start = self.consumed + self.rank * self.batch_size
        rows = self.dataset[self._order[start : start + self.batch_size]]
        self.consumed += self.batch_size * self.world_size
        return Batch.collate(rows, self.pad_token_id, epoch=self.epoch, position=start)

    def state_dict(self) -> dict:
        """{"epoch": int, "consumed": int}: examples of the epoch already read by all ranks together."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        # "index" (per-rank examples) is the position checkpoints of earlier versions saved (same world size).
        consumed = state["consumed"] if "consumed" in state else int(state["index"]) * self.world_size
        self.epoch, self.consumed, self._order = int(state["epoch"]), int(consumed), None
