"""The expected acceptance rate of a draft model in speculative decoding, logged beside the loss with ``--loss tvd``.

Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", ICML;
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling") lets a draft q propose
x ~ q and the target p accept it with probability min(1, p(x) / q(x)). Given the prefix, a proposal is accepted with
probability

    beta = sum_x q(x) min(1, p(x) / q(x)) = sum_x min(p(x), q(x)) = 1 - TVD(p, q),   TVD(p, q) = 1/2 sum_x |p - q|

(Leviathan et al., section 3: the acceptance rate beta = 1 - D_LK(p, q) = sum min(p, q), D_LK being the TVD;
DistillSpec, Zhou et al. 2024, ICLR, distils a draft by minimising this TVD). With ``--loss tvd`` the KD term of a
supervised token is ``T^2 TVD(p_t, p_s)`` at the KD temperature T, so the rate costs nothing: per step ``sum over
supervised tokens of (1 - kd / T^2)``, divided by the step's global supervised token count like every term, is the
mean acceptance of the student as a draft for the teacher, both sampling at temperature T (``train_acceptance``). It
is exact for one live teacher of the student's tokenizer (full distributions over the shared vocabulary;
``core.build`` wires it only then): against a sparse teacher (a cache, a server) the TVD is the buckets', a lower
bound, and against an ensemble the target would be the mixture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ds_distill import losses
from ds_distill.data.batching import Batch

NAME = "acceptance"  # the metric: Train/acceptance, train_acceptance in the log line


class AcceptanceRate:
    """A ``TeacherSource``: ``inner``'s targets and loss, plus ``extra["acceptance"]`` = sum over the supervised
    tokens of 1 - TVD(p_teacher, p_student) at the KD temperature (module docstring). Adds nothing to the loss."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def engines(self) -> list:
        return self.inner.engines

    def targets(self, batch: Batch, split: str) -> Any:
        return self.inner.targets(batch, split)

    def loss_sums(
        self, student_hidden: torch.Tensor, student_head: Callable, targets: Any, labels: torch.Tensor, **kw: Any
    ) -> losses.LossSums:
        if kw.get("loss") != "tvd":
            raise RuntimeError(f"the acceptance rate is read off the tvd loss, not {kw.get('loss')!r}")
        out = self.inner.loss_sums(student_hidden, student_head, targets, labels, **kw)
        temperature = kw.get("temperature", 1.0)
        rate = out.n_tokens.to(out.kd.device, torch.float32) - out.kd.float() / temperature**2
        return dataclasses.replace(out, extra={**out.extra, NAME: rate.detach()})


def wrap(cfg, source, *, one_live_teacher: bool):
    """``source`` with the acceptance rate logged when ``--loss tvd`` and the teacher is ``one_live_teacher`` (one
    live engine of the student's tokenizer: the rate is exact only then), else ``source`` itself."""
    if cfg.loss != "tvd" or not one_live_teacher:
        return source
    return AcceptanceRate(source)
