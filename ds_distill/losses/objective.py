"""What the student is trained to minimise: the loss's name and floats, and how an ensemble's teachers are mixed.

Per optimizer step (``losses.loss_sums`` / ``losses.chunked_loss_sums`` give the sums, the trainer divides):

    sum over supervised tokens of [alpha * CE + (1 - alpha) * T^2 * D(mixture of teachers || student)] / global tokens

``build()`` makes one ``Objective`` from the run config (``--loss``, ``--alpha``, ``--temperature``, ``--beta``,
``--skew``, ``--entropy_threshold``, ``--teacher_weights``, ``--router``) and hands it to the Trainer; nothing changes it during training. A
custom router (``ds_distill.losses.routing``) plugs in by building the objective:

    train.run(cfg, train.default_callbacks(cfg), objective=Objective.from_config(cfg, router=my_router))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ds_distill.config import RunConfig
from ds_distill.losses.divergences import ENTROPY_THRESHOLD
from ds_distill.losses.routing import Router, make_router


@dataclass(frozen=True)
class Objective:
    loss: str = "forward_kl"  # a name in losses.LOSSES
    alpha: float = 0.5  # weight of CE; 1 - alpha weighs the KD term
    temperature: float = 1.0  # of the KD term (its T^2 factor keeps gradient scales comparable)
    beta: float = 0.5  # of the beta-parameterised losses (see losses.LOSSES)
    skew: float = 0.1  # of the skewed KLs
    entropy_threshold: float = ENTROPY_THRESHOLD  # nats, of entropy_aware_kl
    # The student's real vocabulary: logits past it (padding rows) are ignored. None until build() sets it from the models.
    vocab_size: int | None = None
    # How the KD target mixes the teachers: None (uniform), a tensor [K] of weights, or a Router called per loss chunk.
    teacher_weights: torch.Tensor | Router | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, router: Router | None = None) -> "Objective":
        """The run config's objective; ``router`` (any ``routing.Router``) replaces ``--router``/``--teacher_weights``."""
        router = router if router is not None else make_router(cfg.router)
        weights = router if router is not None else (torch.tensor(cfg.teacher_weights) if cfg.teacher_weights else None)
        return cls(
            loss=cfg.loss,
            alpha=cfg.alpha,
            temperature=cfg.temperature,
            beta=cfg.beta,
            skew=cfg.skew,
            entropy_threshold=cfg.entropy_threshold,
            teacher_weights=weights,
        )

    def with_vocab(self, vocab_size: int) -> "Objective":
        return dataclasses.replace(self, vocab_size=vocab_size)

    def loss_kw(self) -> dict[str, Any]:
        """The keyword arguments of ``losses.loss_sums`` / ``chunked_loss_sums`` (and ``TeacherSource.loss_sums``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
