"""The teacher cache: a teacher's top-K distribution for every supervised token of a dataset, written once by
``python -m ds_distill.cache_teacher`` and read by ``python -m ds_distill.train --teacher_cache CACHE``. This module
is the only one that knows the cache directory's layout.

Layout of ``CACHE/``:
    vocab_order.npy                token ids by descending count in the data (int32): the order ids are coded in
    manifest.json                  rank 0 writes it before the first shard ("complete": false, the settings) and after
                                   the last one ("complete": true, every shard with its sha256, the measurements)
    shards/<split>-<s>.parquet     examples ``[s * S, (s + 1) * S)`` of the split's dataset order (S: shard_examples)
    shards/<split>-<s>.json        the shard's sidecar (sha256, bytes, examples, tokens, reconstruction error sums and
                                   histograms)
A shard is written to ``<name>.parquet.tmp``, renamed when complete, then its sidecar is written (atomically): a
shard exists only when its sidecar does and the sizes agree, so a killed writer resumes without rewriting a finished
shard and a half-written one is never read. Splits: ``data`` (from --data) and ``eval_data`` (from --eval_data).

One Parquet row per example (zstd at --zstd_level, row groups of ``ROW_GROUP`` examples for random access by
example id):
    row     int64   the example's row number (``data.get_dataset``'s ``row``, the batches' ``example_ids``)
    tokens  int32   n, its supervised positions (labels != IGNORE_INDEX), in position order
    ids     binary  n x K token ids as their ranks in vocab_order (token ids themselves in exact caches), each
                    token's sorted ascending and delta-coded (the first, then gaps - 1) as LEB128 varints (1 byte
                    below 128, 2 below 16384, 3 below 2**21)
    logp    binary  n x K uint8 codes ``q = max(round(LEVELS * sqrt(p / p_top)), 1)`` in the ids' order (LEVELS = 63,
                    p_top the token's largest top-K probability), or float32 log-probs (exact caches)
    tail    binary  n uint8 codes ``c = round(255 sqrt(tail mass))`` clipped to [1, 254] of the mass outside the top K
                    (so a tail in [1.5e-5, 0.992]), or float32 logs (exact caches)
Log-probs are of ``softmax(teacher_logits / T)`` over the tokenizer's vocabulary, T the cache's temperature.
Decoding: ``tail = 2 log(c / 255)``, ``logp = 2 log(q / LEVELS) + b`` with b such that ``sum exp(logp) = 1 -
exp(tail)``:
the codes fix the shape of the top-K part and the tail its total mass. An exact cache (``--exact``: K = V, float32, no
quantisation) holds the teacher's full log-softmax, and training from it gives the live teacher's loss.
Format versions: 1 (float16 tail, zstd default level, row groups of 8) is refused; rewrite such a cache.

A cache for a teacher with another tokenizer (``--cross_tokenizer alm``; settings ``cross_tokenizer``) stores what
ALM needs and nothing else: per example, the teacher's log-prob of each of its own next tokens where the alignment
scores one (``teacher_labels`` != -100 of ``data.alignment.collate_teacher``, in position order), at temperature T:
    tokens  int32   n, the teacher's scored positions
    ids     binary  n x 1 varints: the teacher's own next token ids (identity order; read back as a check)
    logp    binary  n float32 log-probs (unquantised: the live teacher's values)
    tail    binary  empty (ALM derives 1 - p itself)
and in ``teacher_tokenizer/`` the teacher's tokenizer (a run aligns its data with it; no teacher model is needed).
The settings' ``tokenizer_fingerprint`` is then the student's, ``teacher_tokenizer_fingerprint`` the teacher's, and
the splits' data fingerprints cover the alignment columns, so a run with another student tokenizer, alignment or
method stops in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ds_distill.common import UsageError, file_fingerprint
from ds_distill.models.tokenizers import tokenizer_facts

FORMAT_VERSION = 2
LEVELS = 63  # codes of sqrt(p / p_top): 1..63 (6 bits in a uint8), 63 = the token's top probability
TAIL_LEVELS = 255  # codes of sqrt(tail mass): 1..254
TAIL_FLOOR = (
    -50.0
)  # nats: a tail mass below exp(-50) is taken as exp(-50) (exact caches; reverse divergences stay finite)
ROW_GROUP = (
    32  # examples per Parquet row group: the unit of random access (8 cost 0.6 byte/token more on the demo data)
)
ZSTD_LEVEL = (
    19  # the default of --zstd_level: 4 bytes/token fewer than zstd's level 1 on the demo data (docs/performance.md)
)
KL_BINS = np.linspace(-8.0, 2.0, 501)  # log10 nats: the histogram of per-token reconstruction KL (its p99)
SPLITS = ("data", "eval_data")
TEACHER_TOKENIZER = "teacher_tokenizer"  # the folder of a --cross_tokenizer cache's teacher tokenizer
# Logit rows per step of ``top_k``: its [rows, V] fp32 temporaries (12.6 MB at V = 49152) are reused from the heap and
# stay in the CPU's caches; temporaries of a whole head chunk (1024 rows: 200 MB, above glibc's 32 MB mmap threshold)
# are fresh pages on every op, and those page faults made top-K and the error measurement ~3x slower
# (docs/performance.md).
TOP_K_ROWS = 64
# Run-config fields that change which tokens a dataset holds; a cache only fits a run with the same values.
TOKEN_FLAGS = (
    "seq_len",
    "data_format",
    "data_split",
    "max_samples",
    "packing",
    "train_on_prompt",
    "drop_long",
    "chat_template",
)


# ------------------------------------------------------------------------------------------------- fingerprints
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special tokens."""
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(text.encode()).hexdigest()


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary alone (token -> id, added tokens included)."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def tokenizer_record(tokenizer) -> dict:
    """What a cache records of its teacher's tokenizer for the run's check (``models.check_teacher_tokenizer``): the
    vocabulary's fingerprint, the special tokens and the teacher's own chat template's rendering of a sample
    conversation (``models.tokenizer_facts``)."""
    return {"vocab_sha256": vocab_fingerprint(tokenizer), **tokenizer_facts(tokenizer, own=True)}


# The columns a dataset's fingerprint covers: the student's tokens and, with --cross_tokenizer, the teacher's tokens
# and the alignment (``data.alignment.cross_columns``); columns a dataset lacks are skipped.
FINGERPRINT_COLUMNS = (
    "row",
    "input_ids",
    "labels",
    "position_ids",
    "teacher_input_ids",
    "teacher_position_ids",
    "chunk_ids",
    "teacher_chunk_ids",
)


def dataset_fingerprint(dataset) -> str:
    """sha256 of the tokenised rows as a run reads them (``FINGERPRINT_COLUMNS``), in dataset order: the real tokens
    (and alignment), whatever file, path or `datasets` cache they came from."""
    h = hashlib.sha256()
    columns = [c for c in FINGERPRINT_COLUMNS if c in dataset.column_names]
    for table in dataset.with_format("arrow").iter(batch_size=4096):
        for c in columns:
            col = table[c].combine_chunks()
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                h.update(np.asarray(col.value_lengths(), dtype=np.int64).tobytes())
                col = col.flatten()
            h.update(np.asarray(col, dtype=np.int64).tobytes())
    return h.hexdigest()


def teacher_fingerprint(path: str) -> str:
    """sha256 of the teacher folder's config.json and weight files (each by its own sha256, or its size above 1 GiB)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            fp = file_fingerprint(str(f)) or {}
            h.update(f"{f.name}:{fp.get('sha256') or fp.get('bytes')}".encode())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------------- coding
def top_k(
    logits: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n, V]`` teacher logits -> (ids ``[n, K]`` sorted ascending, their log-probs ``[n, K]``, log tail mass ``[n]``,
    ``sum_v p log p`` over the whole vocabulary ``[n]`` (minus the entropy, nats: what ``reconstruction_kl`` needs of
    the tokens outside the ids)), all at ``temperature``, in fp32. The tail is the logsumexp of the log-probs outside
    the ids (not log(1 - sum), which cancels when the top K hold nearly all the mass).

    Computed ``TOP_K_ROWS`` rows at a time: every step is per row, so the values are those of one call on all rows,
    bit for bit, but no ``[n, V]`` temporary exists beside the logits (see ``TOP_K_ROWS``)."""
    outs = []
    for x in logits.split(TOP_K_ROWS) or (logits,):
        full = F.log_softmax(x.float() / temperature, dim=-1)
        ids = full.topk(k, dim=-1).indices.sort(dim=-1).values
        logp = full.gather(-1, ids)
        plogp = full.exp().mul_(full).sum(-1)
        if k < full.shape[-1]:  # in place: the rows' log-probs are not needed after this
            tail = torch.logsumexp(full.scatter_(-1, ids, -math.inf), dim=-1).clamp(min=TAIL_FLOOR)
        else:
            tail = full.new_full(full.shape[:1], -math.inf)
        outs.append((ids, logp, tail, plogp))
    return tuple(torch.cat(o) for o in zip(*outs))


def quantise(logp: torch.Tensor, tail: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes ``[n, K]`` = round(LEVELS * sqrt(p / p_top)) >= 1, uint8 tail codes ``[n]`` =
    round(TAIL_LEVELS * sqrt(tail mass)) in [1, TAIL_LEVELS - 1]).

    Why sqrt: an error dp in a probability p costs about dp^2 / (2 p) of KL, so uniform steps in sqrt(p) spend the
    same KL on every entry; the many small probabilities of a top-K get small codes, which zstd packs tightly. For the
    tail that is at most 2 / TAIL_LEVELS^2 = 3e-5 nats per token, whatever its size (the floor of code 1: 1.5e-5 nats).
    """
    u = torch.exp(0.5 * (logp - logp.max(dim=-1, keepdim=True).values))
    codes = torch.round(u * LEVELS).clamp(min=1).to(torch.uint8)
    tail_codes = torch.round(torch.exp(0.5 * tail.double()) * TAIL_LEVELS).clamp(1, TAIL_LEVELS - 1).to(torch.uint8)
    return codes.cpu().numpy(), tail_codes.cpu().numpy()


def dequantise(codes: torch.Tensor, tail_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``quantise``: (log-probs ``[n, K]``, log tails ``[n]``), fp32, together a distribution."""
    rel = 2.0 * torch.log(codes.float() / LEVELS)
    tail = 2.0 * torch.log(tail_codes.float() / TAIL_LEVELS)
    return rel + (torch.log1p(-tail.exp()) - torch.logsumexp(rel, dim=-1))[:, None], tail


def varint_encode(values: np.ndarray) -> bytes:
    """Non-negative integers < 2**21 -> LEB128 bytes (7 bits per byte, high bit = more bytes follow)."""
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= 1 << 21):
        raise ValueError(f"varint values must be in [0, 2**21), got [{v.min()}, {v.max()}]")
    nbytes = 1 + (v >= 1 << 7) + (v >= 1 << 14)
    owner = np.repeat(np.arange(v.size), nbytes)
    pos = np.arange(owner.size) - np.repeat(np.cumsum(nbytes) - nbytes, nbytes)  # byte index within its value
    out = (v[owner] >> (7 * pos)) & 0x7F
    more = pos < nbytes[owner] - 1
    return (out | (more << 7)).astype(np.uint8).tobytes()


def varint_decode(buf: bytes) -> np.ndarray:
    b = np.frombuffer(buf, dtype=np.uint8).astype(np.int64)
    ends = (b & 0x80) == 0
    starts = np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1]) if b.size else np.zeros(0, dtype=np.int64)
    pos = np.arange(b.size) - np.repeat(starts, np.diff(np.append(starts, b.size)))
    return np.add.reduceat((b & 0x7F) << (7 * pos), starts) if b.size else np.zeros(0, dtype=np.int64)


def encode_ids(ids: np.ndarray) -> bytes:
    """``[n, K]`` ids sorted ascending per row -> varint bytes of (first id, gaps - 1)."""
    gaps = np.diff(ids, axis=1, prepend=-1) - 1
    return varint_encode(gaps)


def decode_ids(buf: bytes, k: int) -> np.ndarray:
    return np.cumsum(varint_decode(buf).reshape(-1, k) + 1, axis=1) - 1


def frequency_rank(datasets: list, vocab_size: int) -> np.ndarray:
    """rank[token id] for the cache's id coding: tokens by descending count in the data's input_ids (ties: by id).
    Frequent tokens fill most top-K lists, and small gaps between their ranks take one varint byte."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ds in datasets:
        for table in ds.with_format("arrow").iter(batch_size=4096):
            ids = np.asarray(table["input_ids"].combine_chunks().flatten(), dtype=np.int64)
            counts += np.bincount(ids[ids < vocab_size], minlength=vocab_size)
    rank = np.empty(vocab_size, dtype=np.int32)
    rank[np.lexsort((np.arange(vocab_size), -counts))] = np.arange(vocab_size, dtype=np.int32)
    return rank


def encode_example(
    ids: torch.Tensor, logp: torch.Tensor, tail: torch.Tensor, exact: bool, rank: np.ndarray | None = None
) -> dict[str, Any]:
    """One example's n supervised tokens -> the Parquet row's binary columns (see the module docstring).
    rank: the id coding's order (``frequency_rank``); None = token ids as they are (exact caches)."""
    ids_np, logp = ids.cpu().numpy(), logp.cpu()
    if rank is not None:  # code ranks, sorted; the log-probs follow the same permutation
        ranks = rank[ids_np]
        perm = np.argsort(ranks, axis=1, kind="stable")
        ids_np, logp = np.take_along_axis(ranks, perm, 1), logp.gather(1, torch.from_numpy(perm))
    row = {"tokens": ids.shape[0], "ids": encode_ids(ids_np)}
    if exact:
        row.update(
            logp=logp.cpu().numpy().astype(np.float32).tobytes(), tail=tail.cpu().numpy().astype(np.float32).tobytes()
        )
    else:
        codes, tail_codes = quantise(logp, tail)
        row.update(logp=codes.tobytes(), tail=tail_codes.tobytes())
    return row


def decode_example(
    row: dict[str, Any], k: int, exact: bool, order: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Parquet row -> (ids ``[n, K]`` int64, log-probs ``[n, K]`` fp32, log tails ``[n]`` fp32).
    order: the inverse of ``encode_example``'s rank (order[rank] = token id); the ids then come in rank order."""
    ids = decode_ids(row["ids"], k)
    ids = torch.from_numpy(ids if order is None else order[ids].astype(np.int64))
    if exact:
        logp = torch.from_numpy(np.frombuffer(row["logp"], dtype=np.float32).reshape(-1, k).copy())
        return ids, logp, torch.from_numpy(np.frombuffer(row["tail"], dtype=np.float32).copy())
    codes = torch.from_numpy(np.frombuffer(row["logp"], dtype=np.uint8).reshape(-1, k).copy())
    logp, tail = dequantise(codes, torch.from_numpy(np.frombuffer(row["tail"], dtype=np.uint8).copy()))
    return ids, logp, tail


def reconstruction_kl(
    plogp: torch.Tensor,
    vocab: int,
    logp: torch.Tensor,
    tail: torch.Tensor,
    rec_logp: torch.Tensor,
    rec_tail: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (KL(full || reconstructed), KL on the K + 1 buckets), nats ``[n]``.

    plogp ``[n]``: ``sum_v p log p`` of the teacher over the whole vocabulary (``top_k``'s fourth output); logp ``[n,
    K]``
    and tail ``[n]``: the teacher's log-probs at the stored ids and its log tail mass; rec_logp, rec_tail: what the
    cache
    stores for them (the same ids, the same order). The reconstructed full distribution puts ``exp(rec_logp)`` on the
    ids and spreads ``exp(rec_tail)`` uniformly over the other V - K tokens (what a cache can say about them): this KL
    counts both the truncation to K and the quantisation. The bucket KL compares ``[logp, tail]`` with ``[rec_logp,
    rec_tail]``: the quantisation error alone, which is what the loss on the K + 1 buckets sees.
    """
    k = logp.shape[-1]
    p_top = logp.exp()
    top = (p_top * (logp - rec_logp)).sum(-1)
    if k == vocab:
        return top, top
    plogp_tail = plogp - (p_top * logp).sum(-1)  # sum over the tail tokens of p log p
    kl_full = top + plogp_tail - tail.exp() * (rec_tail - math.log(vocab - k))
    kl_buckets = top + tail.exp() * (tail - rec_tail)
    return kl_full, kl_buckets


def in_decoded_order(ids: torch.Tensor, logp: torch.Tensor, rec_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probs ``logp`` ``[n, K]`` at ``ids`` (``top_k``'s, ascending) rearranged to ``rec_ids``, the
    ids a row decodes to (the same ids per token, in the cache's coding order). RuntimeError when the decoded ids are
    not the teacher's (a broken id coding: the stored row says nothing about these log-probs then)."""
    if not torch.equal(rec_ids.sort(dim=1).values, ids):
        raise RuntimeError("a cache row decodes to other token ids than the teacher's top-K: the id coding is broken")
    return logp.gather(1, torch.searchsorted(ids, rec_ids))


def kl_histogram(kl: torch.Tensor) -> np.ndarray:
    """Per-token KLs ``[n]`` -> counts per ``KL_BINS`` bin of log10(KL) (bin 0: below 1e-8 nats, incl. 0)."""
    return np.bincount(
        np.searchsorted(KL_BINS, np.log10(kl.double().clamp(min=1e-300).numpy())), minlength=len(KL_BINS) + 1
    )


def kl_quantile(hists: list, q: float) -> float:
    """The q-quantile of the per-token KL from summed ``kl_histogram`` counts: the upper edge of its bin (<= 5% high;
    0 below 1e-8 nats)."""
    counts = np.sum(np.asarray(hists, dtype=np.int64), axis=0) if hists else np.zeros(len(KL_BINS) + 1, np.int64)
    if counts.sum() == 0:
        return 0.0
    b = int(np.searchsorted(np.cumsum(counts), q * counts.sum()))
    return 0.0 if b == 0 else float(10 ** KL_BINS[min(b, len(KL_BINS) - 1)])


# ------------------------------------------------------------------------------------------------------- layout
def shard_name(split: str, s: int) -> str:
    return f"{split}-{s:05d}"


def shard_done(root: Path, name: str) -> bool:
    """A finished shard: its sidecar exists and the Parquet file has the recorded size."""
    side, file = root / "shards" / f"{name}.json", root / "shards" / f"{name}.parquet"
    if not side.is_file() or not file.is_file():
        return False
    return json.loads(side.read_text())["bytes"] == file.stat().st_size


def teacher_tokenizer_dir(root: Path) -> Path:
    """Where a ``--cross_tokenizer`` cache keeps its teacher's tokenizer (``save_pretrained``)."""
    return root / TEACHER_TOKENIZER


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The cache's manifest.json, None when there is none; one UsageError when it is not valid JSON (truncated)."""
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"teacher cache {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}; cut short?): "
            "delete it and rerun the python -m ds_distill.cache_teacher command (finished shards are kept)"
        ) from None
