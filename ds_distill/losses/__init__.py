"""Distillation losses: pure functions of logits (or hidden states and heads), labels and a few floats.

Conventions (all functions):
    logits ``[B, T, V]``, labels ``[B, T]`` already aligned (position t is scored against ``labels[:, t]``; the caller
    shifts), ``ignore_index`` positions contribute nothing. Everything is computed in fp32. Labels may stay on the
    host while the logits are on a device (the supervised positions are then found without a device sync).
    Per supervised token: ``alpha * CE(student, label) + (1 - alpha) * T^2 * D(p_t, p_s)`` with
    ``p_t = softmax(teacher / T)``, ``p_s = softmax(student / T)`` and CE on the unscaled student logits.
    ``loss_sums`` / ``chunked_loss_sums`` return *sums* and the token count; the trainer divides by the global count.
Divergences ``D`` are looked up by exact name in ``LOSSES``. Teachers with another tokenizer: ``cross_tokenizer.py``
(methods ``CROSS_TOKENIZER``, over the chunks of ``ds_distill.data.alignment``).
"""

from ds_distill.losses.cross_tokenizer import (
    CROSS_TOKENIZER,
    alm_loss_sums,
    chunked_alm_loss_sums,
    chunked_vocab_map_loss_sums,
    teacher_chunk_logprobs,
    vocab_map_loss_sums,
)
from ds_distill.losses.dense import chunked_loss_sums, distillation_loss, loss_sums
from ds_distill.losses.divergences import LOSSES, check_args
from ds_distill.losses.sparse import chunked_sparse_loss_sums, sparse_loss_sums
from ds_distill.losses.terms import LossSums, OutputHead, teacher_logprobs

__all__ = [
    "CROSS_TOKENIZER",
    "LOSSES",
    "alm_loss_sums",
    "chunked_alm_loss_sums",
    "chunked_vocab_map_loss_sums",
    "teacher_chunk_logprobs",
    "vocab_map_loss_sums",
    "LossSums",
    "OutputHead",
    "check_args",
    "chunked_loss_sums",
    "chunked_sparse_loss_sums",
    "distillation_loss",
    "loss_sums",
    "sparse_loss_sums",
    "teacher_logprobs",
]
