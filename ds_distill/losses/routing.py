"""Teacher routing: per token, how much each teacher of an ensemble supervises the student.

A router is any callable

    router(teacher_logprobs: list[Tensor[n, V]], labels: Tensor[n]) -> Tensor[n, K]

given, for the n tokens of one loss chunk, each of the K teachers' log-probabilities **at temperature 1** (the
distribution that scores the label, whatever ``--temperature`` the KD term uses) and the target ids (-100 where not
supervised). It returns mixture weights, rows >= 0 summing to 1; the KD target of token i is then
``sum_k w[i, k] * p_k(T)`` (the teachers' distributions at the loss's temperature T). The router runs under
``torch.no_grad``: routing is a choice, not something trained. Weights of unsupervised tokens do not matter.

Pass one as ``teacher_weights`` to ``losses.loss_sums`` / ``losses.chunked_loss_sums``; from the command line,
``--router fixed`` (the default: ``--teacher_weights``, or uniform) or ``--router lowest_ce``. The router is part of
the run's objective (``ds_distill.losses.objective.Objective``); a custom one plugs in by building the objective:

    from ds_distill.losses.objective import Objective
    train.run(cfg, train.default_callbacks(cfg), objective=Objective.from_config(cfg, router=my_router))
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ds_distill.common import IGNORE_INDEX

Router = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]
ROUTERS = ("fixed", "lowest_ce")


class FixedWeights:
    """The same mixture for every token: ``weights`` (one per teacher, >= 0, normalised here)."""

    def __init__(self, weights: Sequence[float]):
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.ndim != 1 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {list(weights)} must be one value >= 0 per teacher with a positive sum")
        self.weights = w / w.sum()

    def __call__(self, teacher_logprobs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if len(teacher_logprobs) != len(self.weights):
            raise ValueError(f"{len(self.weights)} weights for {len(teacher_logprobs)} teachers")
        lp = teacher_logprobs[0]
        return self.weights.to(lp.device, lp.dtype).expand(labels.shape[0], -1)


class LowestTeacherCE:
    """Per token, all weight on the teacher that gives the label the highest probability (lowest CE); ties go to the
    first such teacher. Unsupervised tokens (label -100) get uniform weights."""

    def __call__(self, teacher_logprobs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        index = labels.clamp(min=0)[:, None]
        ce = torch.stack([-lp.gather(-1, index)[:, 0] for lp in teacher_logprobs], dim=1)  # [n, K]
        k = len(teacher_logprobs)
        weights = torch.nn.functional.one_hot(ce.argmin(dim=1), k).to(ce.dtype)
        return torch.where(valid[:, None], weights, torch.full_like(weights, 1.0 / k))


def make_router(name: str, teacher_weights: Sequence[float], n_teachers: int) -> Router:
    if name == "fixed":
        return FixedWeights(teacher_weights or [1.0] * n_teachers)
    if name == "lowest_ce":
        return LowestTeacherCE()
    raise ValueError(f"unknown router {name!r}: use one of {', '.join(ROUTERS)}")
