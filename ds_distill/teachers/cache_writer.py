"""Writing a teacher cache (``python -m ds_distill.cache_teacher``): shards dealt to the ranks, each written once and
atomically, the manifest completed by rank 0 (layout: ``ds_distill.teachers.cache_format``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ds_distill import data as data_mod
from ds_distill.common import IGNORE_INDEX, UsageError, sha256_file, write_json_atomic
from ds_distill.teachers.cache_format import (
    FORMAT_VERSION,
    KL_BINS,
    ROW_GROUP,
    ZSTD_LEVEL,
    decode_example,
    encode_example,
    frequency_rank,
    in_decoded_order,
    kl_histogram,
    kl_quantile,
    read_manifest,
    reconstruction_kl,
    shard_done,
    shard_name,
    top_k,
)
from ds_distill.teachers.live import own_token_logp, teacher_hidden

log = logging.getLogger("ds_distill")


def write_shard(
    root: Path, name: str, rows: list[dict[str, Any]], stats: dict[str, float], zstd_level: int = ZSTD_LEVEL
) -> dict[str, Any]:
    """Write one shard (temp name, then rename, then its sidecar) and return the sidecar."""
    shards = root / "shards"
    tmp, final = shards / f"{name}.parquet.tmp", shards / f"{name}.parquet"
    table = pa.table(
        {
            "row": pa.array([r["row"] for r in rows], pa.int64()),
            "tokens": pa.array([r["tokens"] for r in rows], pa.int32()),
            **{c: pa.array([r[c] for r in rows], pa.binary()) for c in ("ids", "logp", "tail")},
        }
    )
    # No column statistics: min/max of binary columns would store whole values again in the footer.
    pq.write_table(
        table, tmp, compression="zstd", compression_level=zstd_level, row_group_size=ROW_GROUP, write_statistics=False
    )
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    meta = pq.ParquetFile(tmp).metadata
    columns = {
        meta.schema.column(j).name: sum(
            meta.row_group(i).column(j).total_compressed_size for i in range(meta.num_row_groups)
        )
        for j in range(meta.num_columns)
    }
    side = {
        "name": name,
        "sha256": sha256_file(tmp),
        "bytes": tmp.stat().st_size,
        "examples": len(rows),
        "tokens": int(sum(r["tokens"] for r in rows)),
        "column_bytes": columns,
        **stats,
    }
    os.replace(tmp, final)
    write_json_atomic(shards / f"{name}.json", side)
    return side


def summarise(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Totals over every finished shard (rank 0, after all ranks finished): bytes/token, reconstruction KL, ..."""
    shards = {}
    for split, info in manifest["settings"]["splits"].items():
        n = -(-info["examples"] // manifest["settings"]["shard_examples"])
        shards[split] = [json.loads((root / "shards" / f"{shard_name(split, s)}.json").read_text()) for s in range(n)]
    every = [s for v in shards.values() for s in v]
    tokens = max(sum(s["tokens"] for s in every), 1)
    column_bytes = (
        {c: sum(s["column_bytes"][c] for s in every) / tokens for c in every[0]["column_bytes"]} if every else {}
    )
    stats = {
        "tokens": sum(s["tokens"] for s in every),
        "bytes": sum(s["bytes"] for s in every),
        "bytes_per_token": sum(s["bytes"] for s in every) / tokens,
        "column_bytes_per_token": column_bytes,
        # None: not measured (a served top-K below the vocabulary says nothing of the tail's shape)
        "kl_full_per_token": None
        if any(s["kl_full_sum"] is None for s in every)
        else sum(s["kl_full_sum"] for s in every) / tokens,
        "kl_full_p99": None
        if any(s["kl_full_sum"] is None for s in every)
        else kl_quantile([s["kl_full_hist"] for s in every], 0.99),
        "kl_buckets_per_token": sum(s["kl_buckets_sum"] for s in every) / tokens,
        "kl_buckets_p99": kl_quantile([s["kl_buckets_hist"] for s in every], 0.99),
        "tail_mass_per_token": sum(s["tail_mass_sum"] for s in every) / tokens,
        "teacher_seconds": sum(s["seconds"] for s in every),
    }
    order = root / "vocab_order.npy"
    return {
        **manifest,
        "complete": True,
        "shards": shards,
        "stats": stats,
        "vocab_order_sha256": sha256_file(order) if order.is_file() else None,
    }


def shards_of_rank(
    split_sizes: dict[str, int], shard_examples: int, world_size: int, rank: int
) -> list[tuple[str, int]]:
    """The (split, shard index) pairs that ``rank`` writes: the shards of all splits in order, dealt out in turn
    (shard i: rank i % world_size), so that a small split (eval) does not pile onto rank 0 with the first shard of
    every other split. Fewer shards than ranks leaves ranks idle: logged once, on rank 0."""
    shards = [(split, s) for split, n in split_sizes.items() for s in range(-(-n // shard_examples))]
    if len(shards) < world_size and rank == 0:
        log.warning(
            "%d shard(s) for %d ranks: %d rank(s) will have nothing to write; lower --shard_examples (now %d)",
            len(shards),
            world_size,
            world_size - len(shards),
            shard_examples,
        )
    return [shard for i, shard in enumerate(shards) if i % world_size == rank]


def write_cache(
    root: Path,
    settings: dict[str, Any],
    info: dict[str, Any],
    datasets: dict[str, Any],
    teacher,
    *,
    scorer: Callable[[list[dict[str, list]]], Iterator] | None = None,
    world_rank: int,
    world_size: int,
    device: torch.device,
    pad_token_id: int,
    zero3: bool,
    barrier: Callable[[], None],
    all_reduce_max: Callable[[int], int],
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> dict[str, Any] | None:
    """Run ``teacher`` (an engine whose forward gives final hidden states; ``teacher.module.head`` the output layer)
    over ``datasets`` (split -> tokenised Dataset) and write the shards this rank owns (shard i of all splits in order:
    rank i % world_size).

    scorer: instead of ``teacher`` (None then), a function of a shard's batches (column dicts of examples) yielding, per
    batch in order, ``((ids [n, K] ascending, log-probs [n, K], log tail [n], sum p log p [n] or None), tokens per
    example)`` for its supervised tokens (``teachers.served.cache_scorer``: a server, requests in flight together);
    ``sum p log p`` None: the full-vocabulary reconstruction error is not measured (recorded as None).
    Resumable: finished shards are skipped; the settings must equal those of the cache already in ``root``.
    zero3: the teacher is sharded, so every forward and head call is a collective: ranks with fewer batches to do
    (an uneven last shard, shards finished before a kill) make dummy calls until all made the same number.
    on_start: called with ``root`` on rank 0 once the settings are known to fit (the first write and every resume):
    files beside the shards (a ``--cross_tokenizer`` cache's teacher tokenizer).
    Returns the final manifest on rank 0 (None elsewhere).
    """
    root.mkdir(parents=True, exist_ok=True)
    existing = read_manifest(root)
    if existing is not None and existing["settings"] != settings:
        diff = sorted(k for k in {**settings, **existing["settings"]} if settings.get(k) != existing["settings"].get(k))
        raise UsageError(
            f"{root} holds a teacher cache written with other settings ({', '.join(diff)} differ): "
            "pick another --output_dir, or delete that one"
        )
    barrier()
    if world_rank == 0 and existing is None:
        (root / "shards").mkdir(exist_ok=True)
        write_json_atomic(
            root / "manifest.json",
            {"format_version": FORMAT_VERSION, "complete": False, "settings": settings, "info": info},
        )
    if world_rank == 0 and on_start is not None:
        on_start(root)
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
    head = None if teacher is None else teacher.module.head
    own_tokens = settings.get("cross_tokenizer") == "alm"  # the teacher's log-prob of its own tokens (ALM)

    @torch.no_grad()
    def forward(rows: dict[str, list]) -> tuple[list[torch.Tensor], ...]:
        b = data_mod.Batch.collate(rows, pad_token_id, epoch=0, position=rows["row"][0]).to(device)
        if own_tokens:  # on its own ids, as the live CrossTokenizerTeacher runs it: the same function of its states
            labels = b.teacher["teacher_labels"]
            hidden = teacher_hidden(teacher, b.teacher, device)
            lp = own_token_logp(hidden, head, labels, temperature, chunk, head_calls, vocab).cpu()
            ids = labels[labels != IGNORE_INDEX]
            return (ids[:, None], lp[:, None], None, None), (labels != IGNORE_INDEX).sum(1).tolist()
        labels = b.labels
        hidden = teacher(**b.inputs)
        idx = (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        hs = hidden.flatten(0, 1)[idx.to(device)]
        outs = []
        for c in range(head_calls):
            outs.append(top_k(head(hs[c * chunk : (c + 1) * chunk])[:, :vocab], k, temperature))
        return tuple(torch.cat([o[i] for o in outs]) for i in range(4)), (labels != IGNORE_INDEX).sum(1).tolist()

    import time

    for split, s in todo:
        ds, t0 = datasets[split], time.perf_counter()
        rows, stats = [], {"kl_full_sum": 0.0, "kl_buckets_sum": 0.0, "tail_mass_sum": 0.0}
        hists = {
            "kl_full_hist": np.zeros(len(KL_BINS) + 1, np.int64),
            "kl_buckets_hist": np.zeros(len(KL_BINS) + 1, np.int64),
        }
        parts = [
            ds[start : min(start + batch, len(ds), (s + 1) * size)]
            for start in range(s * size, min(len(ds), (s + 1) * size), batch)
        ]
        for part, ((ids, logp, tail, plogp), counts) in zip(parts, (scorer or _mapped(forward))(parts)):
            if tail is None:  # the teacher's own tokens (ALM): float32 as computed, nothing lost, nothing to measure
                for example_row, piece in zip(part["row"], torch.split(torch.arange(ids.shape[0]), counts)):
                    row = encode_example(ids[piece], logp[piece], logp.new_zeros(0), exact=True)
                    rows.append({"row": int(example_row), **row})
                stats["kl_full_sum"] = None
                stats["tail_mass_sum"] += (-logp.double().exp()).add(1).sum().item()  # 1 - p of its own tokens
                continue
            measured = plogp is not None
            plogp = tail if plogp is None else plogp  # a placeholder for the split below: no full KL is computed
            teacher_cpu = [t.cpu() for t in (ids, logp, tail, plogp)]
            for example_row, piece in zip(part["row"], torch.split(torch.arange(ids.shape[0]), counts)):
                rows.append(
                    {"row": int(example_row), **encode_example(ids[piece], logp[piece], tail[piece], exact, rank)}
                )
                # The error is measured on what was stored: the row decoded again.
                rec_ids, rec_logp, rec_tail = decode_example(rows[-1], k, exact, order)
                t_ids, t_logp, t_tail, t_plogp = (t[piece] for t in teacher_cpu)
                kl_full, kl_b = reconstruction_kl(
                    t_plogp, vocab, in_decoded_order(t_ids, t_logp, rec_ids), t_tail, rec_logp, rec_tail
                )
                if measured and stats["kl_full_sum"] is not None:
                    stats["kl_full_sum"] += kl_full.sum().item()
                    hists["kl_full_hist"] += kl_histogram(kl_full)
                else:
                    stats["kl_full_sum"] = None
                stats["kl_buckets_sum"] += kl_b.sum().item()
                hists["kl_buckets_hist"] += kl_histogram(kl_b)
                stats["tail_mass_sum"] += tail[piece].exp().sum().item()
        stats["seconds"] = time.perf_counter() - t0
        stats.update({name: h.tolist() for name, h in hists.items()})
        side = write_shard(root, shard_name(split, s), rows, stats, info.get("zstd_level", ZSTD_LEVEL))
        if on_shard is not None:
            on_shard(side)
    if zero3 and world_size > 1 and teacher is not None:
        first = datasets[next(iter(datasets))]
        for _ in range(all_reduce_max(n_batches) - n_batches):
            forward(first[0 : min(batch, len(first))])  # a collective the other ranks are making: results discarded
    barrier()
    if world_rank != 0:
        return None
    manifest = summarise(root, read_manifest(root))
    write_json_atomic(root / "manifest.json", manifest)
    return manifest


def _mapped(forward: Callable) -> Callable[[list], Iterator]:
    return lambda parts: map(forward, parts)
