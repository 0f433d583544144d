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
    tokens  int32   n, its supervised positions (labels != -100), in position order
    ids     binary  n x K token ids as their ranks in vocab_order (token ids themselves in exact caches), each
                    token's sorted ascending and delta-coded (the first, then gaps - 1) as LEB128 varints (1 byte
                    below 128, 2 below 16384, 3 below 2**21)
    logp    binary  n x K uint8 codes ``q = max(round(LEVELS * sqrt(p / p_top)), 1)`` in the ids' order (LEVELS = 63,
                    p_top the token's largest top-K probability), or float32 log-probs (exact caches)
    tail    binary  n uint8 codes ``c = round(255 sqrt(tail mass))`` clipped to [1, 254] of the mass outside the top K
                    (so a tail in [1.5e-5, 0.992]), or float32 logs (exact caches)
Log-probs are of ``softmax(teacher_logits / T)`` over the tokenizer's vocabulary, T the cache's temperature.
Decoding: ``tail = 2 log(c / 255)``, ``logp = 2 log(q / LEVELS) + b`` with b such that ``sum exp(logp) = 1 - exp(tail)``:
the codes fix the shape of the top-K part and the tail its total mass. An exact cache (``--exact``: K = V, float32, no
quantisation) holds the teacher's full log-softmax, and training from it gives the live teacher's loss.
Format versions: 1 (float16 tail, zstd default level, row groups of 8) is refused; rewrite such a cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ds_distill import data as data_mod
from ds_distill import losses
from ds_distill.config import UsageError

log = logging.getLogger("ds_distill")

FORMAT_VERSION = 2
LEVELS = 63  # codes of sqrt(p / p_top): 1..63 (6 bits in a uint8), 63 = the token's top probability
TAIL_LEVELS = 255  # codes of sqrt(tail mass): 1..254
TAIL_FLOOR = -50.0  # nats: a tail mass below exp(-50) is taken as exp(-50) (exact caches; reverse divergences stay finite)
ROW_GROUP = 32  # examples per Parquet row group: the unit of random access (8 cost 0.6 byte/token more on the demo data)
ZSTD_LEVEL = 19  # the default of --zstd_level: 4 bytes/token fewer than zstd's level 1 on the demo data (docs/performance.md)
KL_BINS = np.linspace(-8.0, 2.0, 501)  # log10 nats: the histogram of per-token reconstruction KL (its p99)
SPLITS = ("data", "eval_data")
# Logit rows per step of ``top_k``: its [rows, V] fp32 temporaries (12.6 MB at V = 49152) are reused from the heap and
# stay in the CPU's caches; temporaries of a whole head chunk (1024 rows: 200 MB, above glibc's 32 MB mmap threshold)
# are fresh pages on every op, and those page faults made top-K and the error measurement ~3x slower (docs/performance.md).
TOP_K_ROWS = 64
# Run-config fields that change which tokens a dataset holds; a cache only fits a run with the same values.
TOKEN_FLAGS = ("seq_len", "data_format", "data_split", "max_samples", "packing", "train_on_prompt", "drop_long", "chat_template")


# ------------------------------------------------------------------------------------------------- fingerprints
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included) and the special tokens."""
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(text.encode()).hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 of the tokenised rows as a run reads them (row, input_ids, labels, position_ids), in dataset order: the
    real tokens, whatever file, path or `datasets` cache they came from."""
    h = hashlib.sha256()
    columns = [c for c in ("row", "input_ids", "labels", "position_ids") if c in dataset.column_names]
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
    from ds_distill.manifest import file_fingerprint

    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            fp = file_fingerprint(str(f)) or {}
            h.update(f"{f.name}:{fp.get('sha256') or fp.get('bytes')}".encode())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------------- coding
def top_k(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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


def encode_example(ids: torch.Tensor, logp: torch.Tensor, tail: torch.Tensor, exact: bool, rank: np.ndarray | None = None) -> dict[str, Any]:
    """One example's n supervised tokens -> the Parquet row's binary columns (see the module docstring).
    rank: the id coding's order (``frequency_rank``); None = token ids as they are (exact caches)."""
    ids_np, logp = ids.cpu().numpy(), logp.cpu()
    if rank is not None:  # code ranks, sorted; the log-probs follow the same permutation
        ranks = rank[ids_np]
        perm = np.argsort(ranks, axis=1, kind="stable")
        ids_np, logp = np.take_along_axis(ranks, perm, 1), logp.gather(1, torch.from_numpy(perm))
    row = {"tokens": ids.shape[0], "ids": encode_ids(ids_np)}
    if exact:
        row.update(logp=logp.cpu().numpy().astype(np.float32).tobytes(), tail=tail.cpu().numpy().astype(np.float32).tobytes())
    else:
        codes, tail_codes = quantise(logp, tail)
        row.update(logp=codes.tobytes(), tail=tail_codes.tobytes())
    return row


def decode_example(row: dict[str, Any], k: int, exact: bool, order: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def reconstruction_kl(plogp: torch.Tensor, vocab: int, logp: torch.Tensor, tail: torch.Tensor,
                      rec_logp: torch.Tensor, rec_tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (KL(full || reconstructed), KL on the K + 1 buckets), nats ``[n]``.

    plogp ``[n]``: ``sum_v p log p`` of the teacher over the whole vocabulary (``top_k``'s fourth output); logp ``[n, K]``
    and tail ``[n]``: the teacher's log-probs at the stored ids and its log tail mass; rec_logp, rec_tail: what the cache
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
    return np.bincount(np.searchsorted(KL_BINS, np.log10(kl.double().clamp(min=1e-300).numpy())), minlength=len(KL_BINS) + 1)


def kl_quantile(hists: list, q: float) -> float:
    """The q-quantile of the per-token KL from summed ``kl_histogram`` counts: the upper edge of its bin (<= 5% high;
    0 below 1e-8 nats)."""
    counts = np.sum(np.asarray(hists, dtype=np.int64), axis=0) if hists else np.zeros(len(KL_BINS) + 1, np.int64)
    if counts.sum() == 0:
        return 0.0
    b = int(np.searchsorted(np.cumsum(counts), q * counts.sum()))
    return 0.0 if b == 0 else float(10 ** KL_BINS[min(b, len(KL_BINS) - 1)])


# ------------------------------------------------------------------------------------------------------- writing
def shard_name(split: str, s: int) -> str:
    return f"{split}-{s:05d}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    from ds_distill.manifest import write_atomic

    write_atomic(path, obj)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def shard_done(root: Path, name: str) -> bool:
    """A finished shard: its sidecar exists and the Parquet file has the recorded size."""
    side, file = root / "shards" / f"{name}.json", root / "shards" / f"{name}.parquet"
    if not side.is_file() or not file.is_file():
        return False
    return json.loads(side.read_text())["bytes"] == file.stat().st_size


def write_shard(root: Path, name: str, rows: list[dict[str, Any]], stats: dict[str, float], zstd_level: int = ZSTD_LEVEL) -> dict[str, Any]:
    """Write one shard (temp name, then rename, then its sidecar) and return the sidecar."""
    shards = root / "shards"
    tmp, final = shards / f"{name}.parquet.tmp", shards / f"{name}.parquet"
    table = pa.table({"row": pa.array([r["row"] for r in rows], pa.int64()), "tokens": pa.array([r["tokens"] for r in rows], pa.int32()),
                      **{c: pa.array([r[c] for r in rows], pa.binary()) for c in ("ids", "logp", "tail")}})
    # No column statistics: min/max of binary columns would store whole values again in the footer.
    pq.write_table(table, tmp, compression="zstd", compression_level=zstd_level, row_group_size=ROW_GROUP, write_statistics=False)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    meta = pq.ParquetFile(tmp).metadata
    columns = {meta.schema.column(j).name: sum(meta.row_group(i).column(j).total_compressed_size for i in range(meta.num_row_groups))
               for j in range(meta.num_columns)}
    side = {"name": name, "sha256": _sha256(tmp), "bytes": tmp.stat().st_size, "examples": len(rows),
            "tokens": int(sum(r["tokens"] for r in rows)), "column_bytes": columns, **stats}
    os.replace(tmp, final)
    _write_json_atomic(shards / f"{name}.json", side)
    return side


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Totals over every finished shard (rank 0, after all ranks finished): bytes/token, reconstruction KL, ..."""
    shards = {}
    for split, info in manifest["settings"]["splits"].items():
        n = -(-info["examples"] // manifest["settings"]["shard_examples"])
        shards[split] = [json.loads((root / "shards" / f"{shard_name(split, s)}.json").read_text()) for s in range(n)]
    every = [s for v in shards.values() for s in v]
    tokens = max(sum(s["tokens"] for s in every), 1)
    column_bytes = {c: sum(s["column_bytes"][c] for s in every) / tokens for c in every[0]["column_bytes"]} if every else {}
    stats = {"tokens": sum(s["tokens"] for s in every), "bytes": sum(s["bytes"] for s in every),
             "bytes_per_token": sum(s["bytes"] for s in every) / tokens, "column_bytes_per_token": column_bytes,
             "kl_full_per_token": sum(s["kl_full_sum"] for s in every) / tokens,
             "kl_full_p99": kl_quantile([s["kl_full_hist"] for s in every], 0.99),
             "kl_buckets_per_token": sum(s["kl_buckets_sum"] for s in every) / tokens,
             "kl_buckets_p99": kl_quantile([s["kl_buckets_hist"] for s in every], 0.99),
             "tail_mass_per_token": sum(s["tail_mass_sum"] for s in every) / tokens,
             "teacher_seconds": sum(s["seconds"] for s in every)}
    order = root / "vocab_order.npy"
    return {**manifest, "complete": True, "shards": shards, "stats": stats, "vocab_order_sha256": _sha256(order) if order.is_file() else None}


def shards_of_rank(split_sizes: dict[str, int], shard_examples: int, world_size: int, rank: int) -> list[tuple[str, int]]:
    """The (split, shard index) pairs that ``rank`` writes: the shards of all splits in order, dealt out in turn
    (shard i: rank i % world_size), so that a small split (eval) does not pile onto rank 0 with the first shard of
    every other split. Fewer shards than ranks leaves ranks idle: logged once, on rank 0."""
    shards = [(split, s) for split, n in split_sizes.items() for s in range(-(-n // shard_examples))]
    if len(shards) < world_size and rank == 0:
        log.warning("%d shard(s) for %d ranks: %d rank(s) will have nothing to write; lower --shard_examples (now %d)",
                    len(shards), world_size, world_size - len(shards), shard_examples)
    return [shard for i, shard in enumerate(shards) if i % world_size == rank]


def write_cache(root: Path, settings: dict[str, Any], info: dict[str, Any], datasets: dict[str, Any], teacher, *,
                world_rank: int, world_size: int, device: torch.device, pad_token_id: int, zero3: bool,
                barrier: Callable[[], None], all_reduce_max: Callable[[int], int],
                on_shard: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Run ``teacher`` (an engine whose forward gives final hidden states; ``teacher.module.head`` the output layer)
    over ``datasets`` (split -> tokenised Dataset) and write the shards this rank owns (shard i of all splits in order: rank i % world_size).

    Resumable: finished shards are skipped; the settings must equal those of the cache already in ``root``.
    zero3: the teacher is sharded, so every forward and head call is a collective: ranks with fewer batches to do
    (an uneven last shard, shards finished before a kill) make dummy calls until all made the same number.
    Returns the final manifest on rank 0 (None elsewhere).
    """
    root.mkdir(parents=True, exist_ok=True)
    existing = read_manifest(root)
    if existing is not None and existing["settings"] != settings:
        diff = sorted(k for k in {**settings, **existing["settings"]} if settings.get(k) != existing["settings"].get(k))
        raise UsageError(f"{root} holds a teacher cache written with other settings ({', '.join(diff)} differ): "
                         "pick another --output_dir, or delete that one")
    barrier()
    if world_rank == 0 and existing is None:
        (root / "shards").mkdir(exist_ok=True)
        _write_json_atomic(root / "manifest.json", {"format_version": FORMAT_VERSION, "complete": False, "settings": settings, "info": info})
    barrier()

    k, vocab, temperature, exact = settings["top_k"], settings["vocab_size"], settings["temperature"], settings["exact"]
    rank = frequency_rank(list(datasets.values()), vocab) if settings["id_order"] == "data_frequency" else None
    order = None if rank is None else np.argsort(rank).astype(np.int32)
    if rank is not None and world_rank == 0:
        np.save(root / "vocab_order.npy", order)  # the same on every rank and every resume: a function of the data
    size, batch = settings["shard_examples"], settings["batch_size"]
    shards = shards_of_rank({split: len(ds) for split, ds in datasets.items()}, size, world_size, world_rank)
    todo = [(split, s) for split, s in shards if not shard_done(root, shard_name(split, s))]
    n_batches = sum(-(-(min(len(datasets[sp]), (s + 1) * size) - s * size) // batch) for sp, s in todo)
    # Fixed head calls per batch (from its largest possible token count), so every rank and batch makes the same.
    chunk = max(settings["chunk_size"], 1)
    head_calls = -(-batch * settings["token_flags"]["seq_len"] // chunk)
    head = teacher.module.head

    @torch.no_grad()
    def forward(rows: dict[str, list]) -> tuple[list[torch.Tensor], ...]:
        b = data_mod.collate(rows, pad_token_id)
        labels = b.pop("labels")
        b.pop("example_ids")
        hidden = teacher(**{key: v.to(device) for key, v in b.items()})
        idx = (labels != -100).flatten().nonzero().squeeze(1)
        hs = hidden.flatten(0, 1)[idx.to(device)]
        outs = []
        for c in range(head_calls):
            outs.append(top_k(head(hs[c * chunk:(c + 1) * chunk])[:, :vocab], k, temperature))
        return tuple(torch.cat([o[i] for o in outs]) for i in range(4)), (labels != -100).sum(1).tolist()

    import time

    for split, s in todo:
        ds, t0 = datasets[split], time.perf_counter()
        rows, stats = [], {"kl_full_sum": 0.0, "kl_buckets_sum": 0.0, "tail_mass_sum": 0.0}
        hists = {"kl_full_hist": np.zeros(len(KL_BINS) + 1, np.int64), "kl_buckets_hist": np.zeros(len(KL_BINS) + 1, np.int64)}
        for start in range(s * size, min(len(ds), (s + 1) * size), batch):
            part = ds[start: min(start + batch, len(ds), (s + 1) * size)]
            (ids, logp, tail, plogp), counts = forward(part)
            teacher_cpu = [t.cpu() for t in (ids, logp, tail, plogp)]
            for example_row, piece in zip(part["row"], torch.split(torch.arange(ids.shape[0]), counts)):
                rows.append({"row": int(example_row), **encode_example(ids[piece], logp[piece], tail[piece], exact, rank)})
                # The error is measured on what was stored: the row decoded again.
                rec_ids, rec_logp, rec_tail = decode_example(rows[-1], k, exact, order)
                t_ids, t_logp, t_tail, t_plogp = (t[piece] for t in teacher_cpu)
                kl_full, kl_b = reconstruction_kl(t_plogp, vocab, in_decoded_order(t_ids, t_logp, rec_ids), t_tail, rec_logp, rec_tail)
                stats["kl_full_sum"] += kl_full.sum().item()
                stats["kl_buckets_sum"] += kl_b.sum().item()
                for name, kl in (("kl_full_hist", kl_full), ("kl_buckets_hist", kl_b)):
                    hists[name] += kl_histogram(kl)
                stats["tail_mass_sum"] += tail[piece].exp().sum().item()
        stats["seconds"] = time.perf_counter() - t0
        stats.update({name: h.tolist() for name, h in hists.items()})
        side = write_shard(root, shard_name(split, s), rows, stats, info.get("zstd_level", ZSTD_LEVEL))
        if on_shard is not None:
            on_shard(side)
    if zero3 and world_size > 1:
        first = datasets[next(iter(datasets))]
        for _ in range(all_reduce_max(n_batches) - n_batches):
            forward(first[0:min(batch, len(first))])  # a collective the other ranks are making: results discarded
    barrier()
    if world_rank != 0:
        return None
    manifest = summarise(root, read_manifest(root))
    _write_json_atomic(root / "manifest.json", manifest)
    return manifest


# ------------------------------------------------------------------------------------------------------- reading
class TeacherCache:
    """A complete cache directory, read by example id (row groups decoded on demand, the newest kept in memory)."""

    def __init__(self, path: str, cached_row_groups: int = 256):
        self.root = Path(path)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise UsageError(f"--teacher_cache {path!r} holds no manifest.json: write a cache there with python -m ds_distill.cache_teacher")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UsageError(f"--teacher_cache {path!r} has format version {manifest.get('format_version')}, this ds-distill reads "
                             f"{FORMAT_VERSION}: rewrite the cache with this version's ds_distill.cache_teacher")
        if not manifest.get("complete"):
            raise UsageError(f"--teacher_cache {path!r} is incomplete (its writer stopped): rerun the same "
                             "python -m ds_distill.cache_teacher command to finish it")
        self.manifest, self.settings = manifest, manifest["settings"]
        self.k, self.exact = self.settings["top_k"], self.settings["exact"]
        self.order = None
        if self.settings["id_order"] == "data_frequency":
            path = self.root / "vocab_order.npy"
            if not path.is_file() or _sha256(path) != manifest["vocab_order_sha256"]:
                raise UsageError(f"--teacher_cache {path}: missing or corrupt (checksum): rewrite the cache")
            self.order = np.load(path)
        self._index: dict[str, dict[int, tuple[int, int]]] = {}
        self._files: dict[tuple[str, int], pq.ParquetFile] = {}
        self._groups: OrderedDict = OrderedDict()
        self._capacity = cached_row_groups

    # ---- checks against a run
    def check_run(self, cfg, tokenizer) -> None:
        """One UsageError for the first setting of the run (``RunConfig``) that the cache does not fit."""
        where = f"--teacher_cache {self.root}"
        flags = self.settings["token_flags"]
        for name in TOKEN_FLAGS:
            if flags[name] != getattr(cfg, name):
                raise UsageError(f"{where} was written with --{name} {flags[name]} but this run has --{name} {getattr(cfg, name)}: "
                                 f"pass --{name} {flags[name]}, or write a cache with the run's data flags")
        if self.settings["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise UsageError(f"{where} was written with another tokenizer than the student's ({len(tokenizer)} tokens; cache: "
                             f"{self.settings['vocab_size']}): write the cache with a teacher that shares the student's tokenizer")
        if self.settings["temperature"] != cfg.temperature:
            raise UsageError(f"{where} holds log-probs at temperature {self.settings['temperature']} but this run has --temperature "
                             f"{cfg.temperature}: pass --temperature {self.settings['temperature']}, or write a cache at {cfg.temperature}")

    def check_data(self, split: str, dataset, flag: str) -> None:
        where = f"--teacher_cache {self.root}"
        split_info = self.settings["splits"].get(split)
        if split_info is None:
            raise UsageError(f"{where} holds no {split} split but this run reads {flag}: write the cache with --{split} {flag}")
        if split_info["fingerprint"] != dataset_fingerprint(dataset):
            raise UsageError(f"{where} was written from other --{split} tokens than this run's {flag} (data fingerprint differs): "
                             f"write the cache from this data with the same data flags")

    # ---- reading
    def _file(self, split: str, s: int) -> pq.ParquetFile:
        key = (split, s)
        if key not in self._files:
            side = self.manifest["shards"][split][s]
            path = self.root / "shards" / f"{side['name']}.parquet"
            if not path.is_file() or _sha256(path) != side["sha256"]:
                raise UsageError(f"--teacher_cache {self.root}: shard {path.name} is missing or corrupt (checksum): delete it and "
                                 "its .json, then rerun the python -m ds_distill.cache_teacher command to rewrite it")
            self._files[key] = pq.ParquetFile(path)
        return self._files[key]

    def _where(self, split: str) -> dict[int, tuple[int, int]]:
        if split not in self._index:
            index = {}
            for s in range(len(self.manifest["shards"][split])):
                for i, example_row in enumerate(self._file(split, s).read(columns=["row"])["row"].to_pylist()):
                    index[example_row] = (s, i)
            self._index[split] = index
        return self._index[split]

    def _row(self, split: str, s: int, row: int) -> dict[str, Any]:
        key = (split, s, row // ROW_GROUP)
        if key not in self._groups:
            self._groups[key] = self._file(split, s).read_row_group(row // ROW_GROUP).to_pylist()
            if len(self._groups) > self._capacity:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key][row % ROW_GROUP]

    def read(self, split: str, example_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The examples of ``example_ids`` (row numbers), concatenated in that order: (ids ``[n, K]``, log-probs ``[n, K]``, log tails
        ``[n]``, supervised tokens per example)."""
        where = self._where(split)
        parts = []
        for example_id in example_ids:
            if example_id not in where:
                raise UsageError(f"--teacher_cache {self.root} has no example id {example_id} in its {split} split: "
                                 "write the cache from the run's data")
            parts.append(decode_example(self._row(split, *where[example_id]), self.k, self.exact, self.order))
        return (*(torch.cat([p[i] for p in parts]) for i in range(3)), [p[0].shape[0] for p in parts])


def mix(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], weights: torch.Tensor, vocab: int
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ensemble of caches as one sparse teacher: ``M x (ids [n, K_m], log-probs [n, K_m], log tails [n])`` and
    mixture weights ``[n, M]`` (rows >= 0 summing to 1) -> (ids ``[n, W]``, log-probs ``[n, W]``, log tail ``[n]``).

    What is computed: each cache stands for its reconstructed distribution (its top-K probabilities, its tail mass
    spread uniformly over the vocab's other V - K_m ids: ``p_m(v) = exp(tail_m) / (V - K_m)`` there, the same
    reconstruction as ``reconstruction_kl``), and the target is their mixture ``sum_m w_m p_m`` over the buckets the
    loss compares: every id in the union U of the caches' top-K lists, then one bucket for the V - |U| other ids
    (mass ``sum_m w_m exp(tail_m) (V - |U|) / (V - K_m)``). W = the largest |U| in the batch; shorter rows are padded
    with id -1 and log-prob -inf (no bucket, see ``losses.sparse_loss_sums``). Exact caches (K = V) give the live
    ensemble's mixture; one cache with weight 1 gives its own K + 1 buckets. Computed in float64, without grad.
    """
    every = torch.cat([p[0] for p in parts], dim=1)
    ids, _ = every.sort(dim=1)
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    mass = torch.zeros(ids.shape, dtype=torch.float64)
    tail = torch.zeros(ids.shape[0], dtype=torch.float64)
    size = (~dup).sum(1)  # |U| per token
    for (m_ids, m_logp, m_tail), w in zip(parts, weights.double().T):
        k = m_ids.shape[1]
        m_ids, order = m_ids.sort(dim=1)
        pos = torch.searchsorted(m_ids, ids).clamp(max=k - 1)
        inside = m_ids.gather(1, pos) == ids
        spread = m_tail.double().exp() / (vocab - k) if k < vocab else torch.zeros_like(tail)
        p = torch.where(inside, m_logp.gather(1, order).double().exp().gather(1, pos), spread[:, None])
        mass += w[:, None] * p
        tail += w * spread * (vocab - size)
    # unique ids first (stable), then cut to the widest row
    keep = torch.sort(dup.to(torch.int8), dim=1, stable=True).indices[:, : int(size.max())]
    pad = dup.gather(1, keep)
    if keep.shape[1] == vocab and pad.any():  # the loss reads a V-wide row as "no tail bucket"
        raise ValueError(f"the caches' top-K lists cover all {vocab} ids for some tokens but not others: write them with --exact")
    ids = ids.gather(1, keep).masked_fill(pad, -1)
    logp = mass.gather(1, keep).log().masked_fill(pad, -math.inf)
    return ids, logp.float(), tail.log().float()


class CachedTeacher:
    """A ``teachers.TeacherSource`` reading one or several ``TeacherCache``s: no teacher model; the loss runs on the
    top-K support plus one tail bucket (``losses.sparse_loss_sums``), for an ensemble on the union of the caches'
    supports plus one bucket (``mix``). splits: "train"/"eval" -> the cache split it reads."""

    def __init__(self, caches: list[TeacherCache], splits: dict[str, str]):
        self.caches, self.splits = list(caches), splits

    def targets(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor, split: str):
        expected, parts = (labels != -100).sum(1).tolist(), []
        for cache in self.caches:
            ids, logp, tail, counts = cache.read(self.splits[split], example_ids.tolist())
            if counts != expected:
                raise UsageError(f"--teacher_cache {cache.root} holds {counts} supervised tokens for examples {example_ids.tolist()} "
                                 f"but the batch has {expected}: the data changed since the cache was written; rewrite the cache")
            parts.append((ids, logp, tail))
        return parts

    def loss_sums(self, student_hidden: torch.Tensor, student_head: Callable, targets, labels: torch.Tensor, *,
                  chunk_size: int, num_chunks: int | None, **loss_kw: Any) -> losses.LossSums:
        weights = loss_kw.pop("teacher_weights", None)
        target = targets[0] if len(targets) == 1 else self._mix(targets, weights, labels, loss_kw["vocab_size"])
        if chunk_size:
            return losses.chunked_sparse_loss_sums(student_hidden, student_head, *target, labels, chunk_size=chunk_size,
                                                   num_chunks=num_chunks, **loss_kw)
        return losses.sparse_loss_sums(student_head(student_hidden), *target, labels, **loss_kw)

    def _mix(self, parts, weights, labels: torch.Tensor, vocab: int):
        """Mixture weights ``[n, M]`` from --teacher_weights (None: uniform) or a router, then ``mix``."""
        n, m = parts[0][0].shape[0], len(parts)
        if callable(weights):  # a router scores the label with each cache's reconstructed distribution at temperature 1
            if self.caches[0].settings["temperature"] != 1.0:
                raise ValueError(f"a router scores labels at temperature 1 but the caches hold log-probs at temperature "
                                 f"{self.caches[0].settings['temperature']}: write the caches at --temperature 1")
            lab = labels[labels != -100]
            w = torch.cat([weights([_full_logp(*p, vocab, rows) for p in parts], lab[rows]) for rows in torch.arange(n).split(1024)])
        else:
            w = torch.full((m,), 1.0 / m) if weights is None else torch.as_tensor(weights, dtype=torch.float64).cpu()
            if w.shape != (m,):
                raise ValueError(f"teacher_weights {tuple(w.shape)} must be one weight per cache ({m})")
            w = (w / w.sum()).expand(n, m)
        return mix(parts, w, vocab)


def _full_logp(ids: torch.Tensor, logp: torch.Tensor, tail: torch.Tensor, vocab: int, rows: torch.Tensor) -> torch.Tensor:
    """A cache's reconstructed log-probs over the whole vocabulary ``[len(rows), V]`` (the tail spread uniformly)."""
    k = ids.shape[1]
    fill = tail[rows] - math.log(vocab - k) if k < vocab else torch.full((len(rows),), -math.inf)
    return fill[:, None].expand(-1, vocab).scatter(1, ids[rows], logp[rows])


def open_for_run(cfg, tokenizer, train_set, eval_set) -> list[TeacherCache]:
    """The run's ``--teacher_cache``s, each checked against its flags, tokenizer and tokens (one UsageError on a mismatch)."""
    caches = []
    for path in cfg.teacher_cache:
        cache = TeacherCache(path)
        cache.check_run(cfg, tokenizer)
        cache.check_data("data", train_set, f"--data {cfg.data}")
        if eval_set is not None:
            cache.check_data("eval_data", eval_set, f"--eval_data {cfg.eval_data}")
        caches.append(cache)
    return caches
