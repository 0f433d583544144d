"""Run a teacher once over the data and store its top-K distribution per supervised token, for many students:

    deepspeed --module ds_distill.cache_teacher --teacher T --data train.jsonl [--eval_data eval.jsonl] \\
        --output_dir CACHE --top_k 64 --seq_len 512 [the training run's other data flags]
    deepspeed --module ds_distill.train --teacher_cache CACHE --student S --data train.jsonl ...   # no teacher loaded
    python -m ds_distill.cache_teacher --teacher_url http://127.0.0.1:8000 --tokenizer S --data ... --output_dir CACHE
        # from a teacher served by vLLM (README: serving a teacher with vLLM): --requests in flight per rank
    python -m ds_distill.cache_teacher --teacher T --tokenizer S --cross_tokenizer alm --data ... --output_dir CACHE
        # a teacher with another tokenizer than the student S: its log-prob of each of its own scored tokens (ALM);
        # served: --teacher_url URL --teacher_tokenizer DIR (its tokenizer) in place of --teacher T

One or several ranks through the same launchers as training; the teacher is placed by fit or by
--teacher_deepspeed_config as in training. Each rank writes its own shards; a killed writer is resumed by running the
same command again. The cache's format, checks and measurements live in ``ds_distill.teachers.cache_format``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from deepspeed.accelerator import get_accelerator

from ds_distill import models
from ds_distill.common import UsageError, print_error
from ds_distill.config import RunConfig, flag, parse_args
from ds_distill.core.build import teacher_ds_config, tokenise
from ds_distill.data.loading import missing_paths
from ds_distill.extras.preemption import PREEMPTED_EXIT_CODE
from ds_distill.runtime import distributed
from ds_distill.teachers import cache_format, cache_writer, served
from ds_distill.teachers.server_client import ServerUnavailable

log = logging.getLogger("ds_distill")

# The flags shared with training, with the training run's names, defaults and help.
SHARED = (
    "teacher",
    "data",
    "eval_data",
    "output_dir",
    "teacher_deepspeed_config",
    "temperature",
    "chunk_size",
    "cross_tokenizer",
    *cache_format.TOKEN_FLAGS,
    "teacher_url",
    "teacher_tokenizer",
    "teacher_reference",
    "teacher_reference_tolerance",
    "teacher_url_timeout",
    "teacher_url_retries",
    "teacher_url_wait",
)


def _shared(name: str) -> tuple[str, Any, dataclasses.Field]:
    f = RunConfig.__dataclass_fields__[name]
    default = (
        dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
        if f.default is dataclasses.MISSING
        else dataclasses.field(default=f.default, metadata=f.metadata)
    )
    return name, f.type, default


CacheConfig = dataclasses.make_dataclass(
    "CacheConfig",
    [_shared(n) for n in SHARED]
    + [
        ("top_k", "int", flag(64, "Teacher tokens kept per supervised token (the rest is one tail bucket).")),
        (
            "exact",
            "bool",
            flag(
                False,
                "Keep the whole vocabulary as float32, no quantisation (K = vocabulary; for exactness checks, large).",
            ),
        ),
        ("batch_size", "int", flag(8, "Examples per teacher forward (with --teacher_url: per request).")),
        (
            "tokenizer",
            "str",
            flag(
                "",
                "With --teacher_url or --cross_tokenizer: the folder of the tokenizer the cache is written for (the "
                "student's).",
            ),
        ),
        ("requests", "int", flag(4, "With --teacher_url: requests in flight together on each rank.")),
        ("shard_examples", "int", flag(1024, "Examples per shard file (the unit of resume and of parallel writing).")),
        (
            "zstd_level",
            "int",
            flag(
                cache_format.ZSTD_LEVEL,
                "zstd level of the shards: 19 is 4 bytes/token smaller than 1 on the demo data but costs ~100 us of "
                "CPU per token to write (9: ~8 us, 1: ~2 us); lower it when the writer, not the teacher, is the "
                "bottleneck.",
            ),
        ),
    ],
)
CacheConfig.__doc__ = (
    "The flags of ds_distill.cache_teacher (data flags as in training: a cache fits runs with the same ones)."
)


def validate(cfg) -> None:
    problems = []
    if len(cfg.teacher) + len(cfg.teacher_url) != 1:
        problems.append(
            f"one teacher per cache: pass --teacher or --teacher_url once (got {len(cfg.teacher)} and "
            f"{len(cfg.teacher_url)})"
        )
    if cfg.teacher_url and not (Path(cfg.tokenizer) / "tokenizer_config.json").is_file():
        problems.append(
            f"--teacher_url needs --tokenizer: a folder with the student's tokenizer (got {cfg.tokenizer!r})"
        )
    if cfg.cross_tokenizer:
        problems.extend(_cross_tokenizer_problems(cfg))
    if cfg.requests < 1:
        problems.append(f"--requests {cfg.requests} must be >= 1")
    for path in cfg.teacher:
        if not (Path(path) / "config.json").is_file():
            problems.append(f"--teacher {path!r} is not a model folder with config.json")
    for name in ("data", "output_dir"):
        if not getattr(cfg, name):
            problems.append(f"--{name} is required")
    problems += missing_paths(cfg.data, cfg.eval_data)
    for name in ("top_k", "batch_size", "shard_examples", "seq_len"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} {getattr(cfg, name)} must be >= 1")
    if not 1 <= cfg.zstd_level <= 22:
        problems.append(f"--zstd_level {cfg.zstd_level} must be in [1, 22]")
    if cfg.temperature <= 0:
        problems.append(f"--temperature {cfg.temperature} must be > 0")
    if problems:
        raise UsageError("invalid cache config: " + "; ".join(problems))


def _cross_tokenizer_problems(cfg) -> list[str]:
    """A cache for a teacher with another tokenizer: ALM's targets from a local teacher (README: teacher cache)."""
    if cfg.cross_tokenizer == "vocab_map":
        return [
            "--cross_tokenizer vocab_map needs the teacher's whole distribution at every chunk start, which no cache "
            "stores: write the cache with --cross_tokenizer alm, or train vocab_map with the live --teacher"
        ]
    if cfg.cross_tokenizer != "alm":
        return [f"--cross_tokenizer {cfg.cross_tokenizer!r} is unknown: a cache stores alm's targets (alm)"]
    problems = []
    if cfg.teacher_url and not (Path(cfg.teacher_tokenizer) / "tokenizer_config.json").is_file():
        problems.append(
            f"--cross_tokenizer with --teacher_url needs --teacher_tokenizer: a folder with the served teacher's "
            f"tokenizer (got {cfg.teacher_tokenizer!r}), to align the data with"
        )
    if cfg.teacher_url and cfg.temperature != 1.0:
        problems.append(
            f"--cross_tokenizer alm with --teacher_url needs --temperature 1 (got {cfg.temperature}): the server's "
            "log-prob of a token is at temperature 1 and does not fix it at another; cache a local --teacher"
        )
    if not (Path(cfg.tokenizer) / "tokenizer_config.json").is_file():
        problems.append(
            f"--cross_tokenizer needs --tokenizer: a folder with the student's tokenizer (got {cfg.tokenizer!r}), "
            "whose tokens the teacher's are aligned with"
        )
    default_k = CacheConfig.__dataclass_fields__["top_k"].default
    if cfg.exact or cfg.top_k != default_k:
        problems.append(
            "--cross_tokenizer alm stores the teacher's float32 log-prob of each of its own tokens, no top-K: drop "
            "--top_k and --exact"
        )
    return problems


def run(cfg, on_shard: Callable[[dict], None] | None = None) -> dict | None:
    """Write (or finish) the cache; returns its manifest on rank 0."""

    validate(cfg)
    world = distributed.init_distributed()
    if world.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    teacher = cfg.teacher[0] if cfg.teacher else None
    cross = cfg.cross_tokenizer  # "alm": the student's tokens aligned with the teacher's own, as training aligns them
    tokenizer = models.load_tokenizer(cfg.tokenizer if cross else teacher or cfg.tokenizer)
    teacher_tokenizer = models.load_tokenizer(teacher or cfg.teacher_tokenizer) if cross else None
    train_set, eval_set = tokenise(cfg, tokenizer, teacher_tokenizer)  # as training: the cache holds a run's exact rows
    splits = {"data": train_set, **({"eval_data": eval_set} if eval_set is not None else {})}
    for name, ds in splits.items():
        if len(set(ds["row"])) != len(ds):
            raise UsageError(
                f"--{name} {getattr(cfg, name)}: some conversations give one example per assistant turn (they share a "
                "row "
                "number, by which a cache is read): teacher caches do not support them yet; train with --teacher"
            )
    vocab = len(teacher_tokenizer or tokenizer)  # the vocabulary the stored ids index (the teacher's)
    top = 1 if cross else vocab if cfg.exact else min(cfg.top_k, vocab)
    server = None
    if cfg.teacher_url:  # ready and checked (tokenizer, K, vocabulary, parity) before any data is scored
        if cross:  # its own tokenization checked against --teacher_tokenizer; K = 1 brings each prompt token's own
            (server,) = served.connect_run(cfg, teacher_tokenizer, vocab, 1, "--teacher_tokenizer's")
        else:
            (server,) = served.connect_run(cfg, tokenizer, vocab, k=top)
    settings = {
        "format_version": cache_format.FORMAT_VERSION,
        "top_k": top,
        "exact": cfg.exact or bool(cross),
        "temperature": cfg.temperature,
        "vocab_size": vocab,
        "tokenizer_fingerprint": cache_format.tokenizer_fingerprint(tokenizer),
        "tokenizer": cache_format.tokenizer_record(tokenizer),
        "teacher_fingerprint": served.served_fingerprint(server)
        if server
        else cache_format.teacher_fingerprint(teacher),
        "token_flags": {name: getattr(cfg, name) for name in cache_format.TOKEN_FLAGS},
        "splits": {
            name: {"examples": len(ds), "fingerprint": cache_format.dataset_fingerprint(ds)}
            for name, ds in splits.items()
        },
        "id_order": "identity" if cfg.exact or cross else "data_frequency",
        "shard_examples": cfg.shard_examples,
        "batch_size": cfg.batch_size,
        "chunk_size": cfg.chunk_size,
    }
    if cross:  # the student's tokenizer fingerprint, then the teacher's (README: teacher cache)
        settings.update(
            cross_tokenizer=cross,
            tokenizer=cache_format.tokenizer_record(teacher_tokenizer),
            teacher_tokenizer_fingerprint=cache_format.tokenizer_fingerprint(teacher_tokenizer),
        )

    info = {
        "teacher": teacher,
        **({"teacher_url": server.client.url, "served_model": server.client.model_id} if server else {}),
        "data": cfg.data,
        "eval_data": cfg.eval_data,
        "levels": cache_format.LEVELS,
        "row_group": cache_format.ROW_GROUP,
        "zstd_level": cfg.zstd_level,
    }
    device = torch.device(get_accelerator().current_device_name())
    engine, zero3, scorer = None, False, None
    if server:
        scorer = served.cache_scorer(server, tokenizer.pad_token_id, cfg.requests, own_tokens=bool(cross))
    else:
        tds = teacher_ds_config(cfg.teacher, cfg.teacher_deepspeed_config, world)
        models.check_positions(cfg.seq_len, [teacher])
        engine = models.teacher_engine(teacher, tds, packed_rows=cfg.packing and cfg.batch_size > 1)
        models.check_output_rows(vocab, [engine], [teacher])
        models.check_logits(engine, teacher, vocab, packing=cfg.packing)  # the cache stores the model's own logits
        zero3 = tds.zero_stage == 3

    def all_reduce_max(n: int) -> int:
        t = torch.tensor(n, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    manifest = cache_writer.write_cache(
        Path(cfg.output_dir),
        settings,
        info,
        splits,
        engine,
        scorer=scorer,
        world_rank=world.rank,
        world_size=world.world_size,
        device=device,
        pad_token_id=tokenizer.pad_token_id,
        zero3=zero3,
        barrier=distributed.barrier,
        all_reduce_max=all_reduce_max,
        on_shard=on_shard,
        # a run aligns its data with this copy of the teacher's tokenizer: no teacher folder needed
        on_start=(lambda root: teacher_tokenizer.save_pretrained(cache_format.teacher_tokenizer_dir(root)))
        if cross
        else None,
    )
    if manifest is not None and cross:
        s = manifest["stats"]
        cols = ", ".join(f"{c} {b:.1f}" for c, b in s["column_bytes_per_token"].items())
        print(
            f"teacher cache {cfg.output_dir} (--cross_tokenizer {cross}): {s['tokens']} teacher tokens, "
            f"{s['bytes_per_token']:.1f} bytes/token ({cols}): the teacher's float32 log-prob of each of its own "
            f"tokens (exact); mass outside them {s['tail_mass_per_token']:.3g}",
            flush=True,
        )
    elif manifest is not None:
        s = manifest["stats"]
        full = (
            "not measured (a served top-K below the vocabulary)"
            if s["kl_full_per_token"] is None
            else f"mean {s['kl_full_per_token']:.4g}, p99 {s['kl_full_p99']:.3g} nats"
        )
        cols = ", ".join(f"{c} {b:.1f}" for c, b in s["column_bytes_per_token"].items())
        print(
            f"teacher cache {cfg.output_dir}: {s['tokens']} tokens, K={settings['top_k']}, {s['bytes_per_token']:.1f} "
            "bytes/token "
            f"({cols}); KL(teacher || reconstructed) per token: {full} "
            f"(on the K+1 buckets: mean {s['kl_buckets_per_token']:.3g}, p99 {s['kl_buckets_p99']:.3g}), "
            f"tail mass {s['tail_mass_per_token']:.3g}",
            flush=True,
        )
    return manifest


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        try:
            run(parse_args(argv, CacheConfig, "ds_distill.cache_teacher"))
        except ServerUnavailable as exc:  # finished shards are kept: the same command resumes
            print_error(f"{exc}: finished shards are kept; run the same command again once the server is back")
            return PREEMPTED_EXIT_CODE
        return 0

    return distributed.entry_point(body)


if __name__ == "__main__":
    sys.exit(main())
