"""What the student is trained to minimise: the loss's name and floats, and how an ensemble's teachers are mixed.

Per optimizer step (``losses.loss_sums`` / ``losses.chunked_loss_sums`` give the sums, the trainer divides):

    sum over supervised tokens of [alpha * CE + (1 - alpha) * T^2 * D(mixture of teachers || student)] / global tokens

``build()`` makes one ``Objective`` from the run config (``--loss``, ``--alpha``, ``--temperature``, ``--beta``,
``--skew``, ``--entropy_threshold``, ``--teacher_weights``, ``--router``) and hands it to the Trainer; nothing changes
it during training. A
custom router (``ds_distill.losses.routing``) plugs in by building the objective:

    train.run(cfg, train.default_callbacks(cfg), objective=Objective.from_config(cfg, router=my_router))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ds_distill.config import RunConfig
from ds_distill.losses.routing import Router, make_router
from ds_distill.losses.terms import LossArgs


@dataclass(frozen=True)
class Objective(LossArgs):
    """The loss options (``LossArgs``; ``vocab_size`` None until build() sets it from the models) and the mixing of
    the teachers."""

    # How the KD target mixes the teachers: None (uniform), a tensor [K] of weights, or a Router called per loss chunk.
    teacher_weights: torch.Tensor | Router | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, router: Router | None = None) -> "Objective":
        """The run config's objective; ``router`` (any ``routing.Router``) replaces
        ``--router``/``--teacher_weights``."""
        router = router if router is not None else make_router(cfg.router)
        weights = router if router is not None else (torch.tensor(cfg.teacher_weights) if cfg.teacher_weights else None)
        # Every loss option that is also a run flag, by name (vocab_size comes from the models, with_vocab).
        flags = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LossArgs) if hasattr(cfg, f.name)}
        return cls(**flags, teacher_weights=weights)

    def with_vocab(self, vocab_size: int) -> "Objective":
        return dataclasses.replace(self, vocab_size=vocab_size)

    def loss_kw(self) -> dict[str, Any]:
        """The keyword arguments of ``losses.loss_sums`` / ``chunked_loss_sums`` (and ``TeacherSource.loss_sums``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
