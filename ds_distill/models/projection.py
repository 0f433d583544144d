"""Learned projections of the student's hidden states onto the teacher's width, for hidden-state losses between
models whose hidden sizes differ: one ``nn.Linear(student_hidden -> teacher_hidden, bias=False)`` per mapped layer
pair, TinyBERT's ``W_h`` (Jiao et al., arXiv 1909.10351, eq. 7: ``MSE(H^S W_h, H^T)``) as DistillKit builds it
(``distillkit/hsd_mapping.py``: one bias-free linear per pair, Xavier-uniform initialised).

They live in the student's module under ``NAME`` (attached before ``deepspeed.initialize``), so the student's engine
owns them like its own weights: its optimizer trains them, ZeRO-3 partitions them, its checkpoints save and resume
them. Unlike DistillKit's they never reach the exported Hugging Face folder: ``split_state`` takes them out of a
checkpoint's state and ``save_beside`` writes them next to the export (``<export>.hidden_projection.safetensors``).

State-dict keys: ``hidden_projection.s{s}_t{t}.weight``, ``[teacher_hidden, student_hidden]`` (student layer s,
teacher layer t), so the file names its own pairs; ``hidden_projection.shared.weight`` for one projection shared by
all pairs (``--hidden_projection shared``: ModelOpt's single shared projection; its gradient is the sum over the
pairs, and it is called once per pair).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ds_distill.common import write_atomic

NAME = "hidden_projection"  # the student module's child; its state-dict keys start with NAME + "."
SHARED = "shared"  # the key of the one projection of --hidden_projection shared
SUFFIX = ".hidden_projection.safetensors"  # the file beside an export: final -> final.hidden_projection.safetensors


def pair_key(s: int, t: int) -> str:
    return f"s{s}_t{t}"


class HiddenProjection(nn.ModuleDict):
    """One bias-free ``nn.Linear(student_hidden, teacher_hidden)`` per (student layer, teacher layer) pair.

    ``[n, student_hidden] -> [n, teacher_hidden]``, called through ``for_pairs``. Initialised Xavier-uniform from a
    generator seeded with ``seed`` (the same weights on every rank and every run of one seed, whatever else drew from
    the global generator before).
    """

    def __init__(
        self, pairs: list[tuple[int, int]], student_hidden: int, teacher_hidden: int, seed: int, shared: bool = False
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for key in [SHARED] if shared else [pair_key(s, t) for s, t in pairs]:
            linear = nn.Linear(student_hidden, teacher_hidden, bias=False)
            with torch.no_grad():
                nn.init.xavier_uniform_(linear.weight, generator=gen)
            self[key] = linear
        self.student_hidden, self.teacher_hidden, self.pairs = student_hidden, teacher_hidden, list(pairs)

    def for_pairs(self, pairs: list[tuple[int, int]]) -> list[nn.Linear]:
        """The linears of ``pairs``, in that order: the shared one for each, or each pair's own (a pair built for no
        projection raises KeyError)."""
        if SHARED in self:
            if set(pairs) - set(self.pairs):
                raise KeyError(f"pairs {sorted(set(pairs) - set(self.pairs))} were not built into the projection")
            return [self[SHARED]] * len(pairs)
        return [self[pair_key(s, t)] for s, t in pairs]


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's consolidated state -> (the model's tensors, the projections' under their own keys ``s{s}_t{t}
    .weight``, the ``NAME.`` prefix dropped). The projections' part is empty for a run without them."""
    prefix = NAME + "."
    model = {k: v for k, v in state.items() if not k.startswith(prefix)}
    projections = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return model, projections


def beside(export_dir: Path | str) -> Path:
    """Where the projections of the export ``export_dir`` are saved: a file next to it, never inside it."""
    export_dir = Path(export_dir)
    return export_dir.with_name(export_dir.name + SUFFIX)


def save_beside(export_dir: Path | str, projections: dict[str, torch.Tensor], dtype: torch.dtype) -> Path:
    """Write ``projections`` (``split_state``'s second part) in ``dtype`` to ``beside(export_dir)``, atomically, with
    the pairs and widths in the safetensors metadata; return the path. A later run may load them with
    ``safetensors.torch.load_file``."""
    from safetensors.torch import save

    tensors = {k: v.detach().to(dtype).contiguous() for k, v in sorted(projections.items())}
    shape = next(iter(tensors.values())).shape
    shared = list(tensors) == [f"{SHARED}.weight"]
    meta = {
        # A shared projection serves every pair of the run: its file names none.
        "pairs": "shared"
        if shared
        else json.dumps([[int(p[1:]) for p in k.split(".")[0].split("_")] for k in tensors]),
        "student_hidden": str(shape[1]),
        "teacher_hidden": str(shape[0]),
    }
    path = beside(export_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(tensors, metadata=meta))
    return path
