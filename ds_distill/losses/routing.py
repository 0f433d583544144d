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

from typing import Callable

import torch

from ds_distill.common import IGNORE_INDEX

Router = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


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


# The routers ``--router`` names: name -> (the router's class, None for the objective's fixed ``[K]`` weights; what it
# does, for ``--help``, which is built from this table).
ROUTERS: dict[str, tuple[type | None, str]] = {
    "fixed": (None, "the same mixture for every token: --teacher_weights, or uniform"),
    "lowest_ce": (LowestTeacherCE, "per token, the teacher with the lowest CE on the label"),
}


def make_router(name: str) -> Router | None:
    """The router of ``--router name``; None for ``fixed``, whose mixture is the objective's ``[K]`` weights."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}: use one of {', '.join(ROUTERS)}")
    cls = ROUTERS[name][0]
    return cls() if cls is not None else None
