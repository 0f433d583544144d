"""Reading a teacher cache in training (``--teacher_cache``): checked against the run, read by example id, mixed
over an ensemble (``CachedTeacher``: the teacher source of cached runs), or ALM's targets for a teacher with another
tokenizer (``CachedCrossTokenizerTeacher``)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from ds_distill import losses
from ds_distill.common import IGNORE_INDEX, UsageError, sha256_file
from ds_distill.data.batching import Batch
from ds_distill.models.tokenizers import check_teacher_tokenizer, load_tokenizer, tokenizer_facts
from ds_distill.teachers import ensemble
from ds_distill.teachers.cache_format import (
    FORMAT_VERSION,
    ROW_GROUP,
    TOKEN_FLAGS,
    dataset_fingerprint,
    decode_example,
    read_manifest,
    teacher_tokenizer_dir,
    tokenizer_fingerprint,
    vocab_fingerprint,
)
from ds_distill.teachers.live import CrossTokenizerTeacher

log = logging.getLogger("ds_distill")


class TeacherCache:
    """A complete cache directory, read by example id (row groups decoded on demand, the newest kept in memory)."""

    def __init__(self, path: str, cached_row_groups: int = 256):
        self.root = Path(path)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise UsageError(
                f"--teacher_cache {path!r} holds no manifest.json: write a cache there with python -m "
                "ds_distill.cache_teacher"
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise UsageError(
                f"--teacher_cache {path!r} has format version {manifest.get('format_version')}, this ds-distill reads "
                f"{FORMAT_VERSION}: rewrite the cache with this version's ds_distill.cache_teacher"
            )
        if not manifest.get("complete"):
            raise UsageError(
                f"--teacher_cache {path!r} is incomplete (its writer stopped): rerun the same "
                "python -m ds_distill.cache_teacher command to finish it"
            )
        self.manifest, self.settings = manifest, manifest["settings"]
        self.k, self.exact = self.settings["top_k"], self.settings["exact"]
        self.order = None
        if self.settings["id_order"] == "data_frequency":
            path = self.root / "vocab_order.npy"
            if not path.is_file() or sha256_file(path) != manifest["vocab_order_sha256"]:
                raise UsageError(f"--teacher_cache {path}: missing or corrupt (checksum): rewrite the cache")
            self.order = np.load(path)
        self._check_shards()
        self._index: dict[str, dict[int, tuple[int, int]]] = {}
        self._files: dict[tuple[str, int], pq.ParquetFile] = {}
        self._groups: OrderedDict = OrderedDict()
        self._capacity = cached_row_groups

    # ---- checks against a run
    def check_run(self, cfg, tokenizer, chat_template: str | None = None) -> None:
        """One UsageError for the first setting of the run (``RunConfig``) that the cache does not fit. The cache's
        teacher must agree with the student on the special tokens and, for chat data (``chat_template``: the Jinja
        text the run renders it with, None for other data), on the chat format: the check of a live teacher
        (``models.check_teacher_tokenizer``), on what the cache recorded of its teacher's tokenizer."""
        where = f"--teacher_cache {self.root}"
        method_problem(self.settings, cfg.cross_tokenizer, where)
        flags = self.settings["token_flags"]
        for name in TOKEN_FLAGS:
            if flags[name] != getattr(cfg, name):
                raise UsageError(
                    f"{where} was written with --{name} {flags[name]} but this run has --{name} {getattr(cfg, name)}: "
                    f"pass --{name} {flags[name]}, or write a cache with the run's data flags"
                )
        recorded = self.settings.get("tokenizer")  # caches written before it was recorded: the fingerprint alone
        if recorded is not None and recorded["vocab_sha256"] == vocab_fingerprint(tokenizer):
            student = tokenizer_facts(tokenizer, chat_template)
            check_teacher_tokenizer(f"{where} (its teacher's tokenizer)", recorded, cfg.student, student)
        if self.settings.get("cross_tokenizer") and self.settings["tokenizer_fingerprint"] != tokenizer_fingerprint(
            tokenizer
        ):
            raise UsageError(
                f"{where} was written for another student tokenizer than --student {cfg.student}'s ({len(tokenizer)} "
                "tokens): its teacher's tokens were aligned with that one; write the cache with --tokenizer "
                f"{cfg.student}"
            )
        if self.settings["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise UsageError(
                f"{where} was written with another tokenizer than the student's ({len(tokenizer)} tokens; cache: "
                f"{self.settings['vocab_size']}): write the cache with a teacher that shares the student's tokenizer"
            )
        if self.settings["temperature"] != cfg.temperature:
            raise UsageError(
                f"{where} holds log-probs at temperature {self.settings['temperature']} but this run has --temperature "
                f"{cfg.temperature}: pass --temperature {self.settings['temperature']}, or write a cache at "
                f"{cfg.temperature}"
            )

    def check_data(self, split: str, dataset, flag: str) -> None:
        where = f"--teacher_cache {self.root}"
        split_info = self.settings["splits"].get(split)
        if split_info is None:
            raise UsageError(
                f"{where} holds no {split} split but this run reads {flag}: write the cache with --{split} {flag}"
            )
        if split_info["fingerprint"] != dataset_fingerprint(dataset):
            aligned = "; with --cross_tokenizer, the alignment too" if self.settings.get("cross_tokenizer") else ""
            raise UsageError(
                f"{where} was written from other --{split} tokens than this run's {flag} (data fingerprint differs"
                f"{aligned}): write the cache from this data with the same data flags"
            )

    def _check_shards(self) -> None:
        """Every shard of every split is there with its recorded size and sha256, checked when the cache opens (before
        any model loads): a bad eval shard would otherwise surface at the first evaluation, with the defaults after
        all of training. Hashing reads each shard once (~1 GB/s)."""
        for split, shards in self.manifest["shards"].items():
            for side in shards:
                path = self.root / "shards" / f"{side['name']}.parquet"
                problem = (
                    "is missing"
                    if not path.is_file()
                    else f"has {path.stat().st_size} bytes, not {side['bytes']}"
                    if path.stat().st_size != side["bytes"]
                    else "is corrupt (sha256 differs)"
                    if sha256_file(path) != side["sha256"]
                    else None
                )
                if problem:
                    raise UsageError(
                        f"--teacher_cache {self.root}: {split} shard {path.name} {problem}: delete it and its .json, "
                        "then rerun the python -m ds_distill.cache_teacher command to rewrite it"
                    )

    # ---- reading
    def _file(self, split: str, s: int) -> pq.ParquetFile:
        key = (split, s)
        if key not in self._files:  # checked when the cache opened (_check_shards)
            self._files[key] = pq.ParquetFile(
                self.root / "shards" / f"{self.manifest['shards'][split][s]['name']}.parquet"
            )
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
        """The examples of ``example_ids`` (row numbers), concatenated in that order: (ids ``[n, K]``, log-probs ``[n,
        K]``, log tails
        ``[n]``, supervised tokens per example)."""
        where = self._where(split)
        parts = []
        for example_id in example_ids:
            if example_id not in where:
                raise UsageError(
                    f"--teacher_cache {self.root} has no example id {example_id} in its {split} split: "
                    "write the cache from the run's data"
                )
            parts.append(decode_example(self._row(split, *where[example_id]), self.k, self.exact, self.order))
        return (*(torch.cat([p[i] for p in parts]) for i in range(3)), [p[0].shape[0] for p in parts])


def method_problem(settings: dict[str, Any], method: str, where: str) -> None:
    """One UsageError when a cache's targets are not those of the run's ``--cross_tokenizer`` (``method``, "" for a
    teacher with the student's tokenizer): a top-K of the student's vocabulary and ALM's log-probs of the teacher's
    own tokens are different things."""
    cached = settings.get("cross_tokenizer", "")
    if cached == method:
        return
    if cached:
        raise UsageError(
            f"{where} holds --cross_tokenizer {cached} targets (a teacher with another tokenizer) but this run has "
            f"--cross_tokenizer {method or '(none)'}: pass --cross_tokenizer {cached}"
        )
    raise UsageError(
        f"{where} holds the top-K of a teacher with the student's tokenizer, not --cross_tokenizer {method} targets: "
        f"write one with python -m ds_distill.cache_teacher --cross_tokenizer {method} --tokenizer STUDENT, or drop "
        "--cross_tokenizer"
    )


def cross_teacher_tokenizer(path: str, method: str):
    """The teacher's tokenizer a ``--cross_tokenizer`` cache was written with (its copy, ``cache_format.
    teacher_tokenizer_dir``), for the run to align its data with before the cache is checked against it; one
    UsageError when the cache is of another method or its copy is missing or changed."""
    root, where = Path(path), f"--teacher_cache {path}"
    manifest = read_manifest(root)
    if manifest is None:
        TeacherCache(path)  # its own one line: no cache there
    method_problem(manifest["settings"], method, where)
    folder = teacher_tokenizer_dir(root)
    tok = load_tokenizer(str(folder)) if (folder / "tokenizer_config.json").is_file() else None
    if tok is None or tokenizer_fingerprint(tok) != manifest["settings"]["teacher_tokenizer_fingerprint"]:
        raise UsageError(
            f"{where}: its teacher tokenizer ({folder}) is missing or changed: rerun the python -m "
            "ds_distill.cache_teacher command that wrote the cache (it writes the copy again)"
        )
    return tok


class CachedTeacher:
    """A ``teachers.TeacherSource`` reading one or several ``TeacherCache``s: no teacher model; the loss runs on the
    top-K support plus one tail bucket (``losses.sparse_loss_sums``), for an ensemble on the union of the caches'
    supports plus one bucket (``ensemble.mix``). splits: "train"/"eval" -> the cache split it reads."""

    def __init__(self, caches: list[TeacherCache], splits: dict[str, str]):
        self.caches, self.splits = list(caches), splits
        self.temperature = self.caches[0].settings["temperature"] if self.caches else 1.0  # of the targets

    def targets(self, batch: Batch, split: str):
        """The cached top-K of the batch's examples (read by ``batch.example_ids``), checked against its labels."""
        expected, parts = (batch.labels != IGNORE_INDEX).sum(1).tolist(), []
        rows = batch.example_ids.tolist()
        for cache in self.caches:
            ids, logp, tail, counts = cache.read(self.splits[split], rows)
            if counts != expected:
                raise UsageError(
                    f"--teacher_cache {cache.root} holds {counts} supervised tokens for examples {rows} "
                    f"but the batch has {expected}: the data changed since the cache was written; rewrite the cache"
                )
            parts.append((ids, logp, tail))
        return parts

    def loss_sums(
        self,
        student_hidden: torch.Tensor,
        student_head: Callable,
        targets,
        labels: torch.Tensor,
        *,
        chunk_size: int,
        num_chunks: int | None,
        **loss_kw: Any,
    ) -> losses.LossSums:
        weights = loss_kw.pop("teacher_weights", None)
        target = targets[0] if len(targets) == 1 else self._mix(targets, weights, labels, loss_kw["vocab_size"])
        if chunk_size:
            return losses.chunked_sparse_loss_sums(
                student_hidden, student_head, *target, labels, chunk_size=chunk_size, num_chunks=num_chunks, **loss_kw
            )
        return losses.sparse_loss_sums(student_head(student_hidden), *target, labels, **loss_kw)

    def _mix(self, parts, weights, labels: torch.Tensor, vocab: int):
        """Mixture weights ``[n, M]`` from --teacher_weights (None: uniform) or a router (each cache's reconstructed
        distribution at temperature 1, ``ensemble.full_logp``), then ``ensemble.mix``."""
        lab = labels[labels != IGNORE_INDEX]
        w = ensemble.mixture_weights(
            weights,
            parts[0][0].shape[0],
            len(parts),
            lambda rows: [ensemble.full_logp(p, vocab, rows) for p in parts],
            lab,
            self.temperature,
        )
        return ensemble.mix(parts, w, vocab)


def open_for_run(cfg, tokenizer, train_set, eval_set, chat_template: str | None = None) -> list[TeacherCache]:
    """The run's ``--teacher_cache``s, each checked against its flags, tokenizer and tokens (one UsageError on a
    mismatch); ``chat_template``: as ``check_run``."""
    caches = []
    for path in cfg.teacher_cache:
        cache = TeacherCache(path)
        cache.check_run(cfg, tokenizer, chat_template)
        cache.check_data("data", train_set, f"--data {cfg.data}")
        if eval_set is not None:
            cache.check_data("eval_data", eval_set, f"--eval_data {cfg.eval_data}")
        caches.append(cache)
    return caches


class CachedCrossTokenizerTeacher(CrossTokenizerTeacher):
    """ALM (``--cross_tokenizer alm``) from a cache of the teacher's log-probs of its own tokens, no teacher model:
    the batches carry the teacher's ids and chunks as in a live run (the data pipeline aligned them with the cache's
    copy of the teacher's tokenizer); ``targets`` reads the examples' stored log-probs and checks they are of the
    batch's scored teacher tokens; the chunk likelihoods are their sums (``CrossTokenizerTeacher.chunk_logp``), as
    the live teacher's. The alignment report and the loss are the live class's. splits: "train"/"eval" -> the cache
    split it reads."""

    def __init__(self, cache: TeacherCache, splits: dict[str, str]):
        super().__init__(None, "alm")
        self.cache, self.splits = cache, splits

    def targets(self, batch: Batch, split: str) -> dict[str, Any]:
        cross = self.columns(batch, split)
        t_labels = cross["teacher_labels"]
        rows = batch.example_ids.tolist()
        ids, logp, _, counts = self.cache.read(self.splits[split], rows)
        scored = t_labels[t_labels != IGNORE_INDEX]
        if counts != (t_labels != IGNORE_INDEX).sum(1).tolist() or not torch.equal(ids[:, 0], scored):
            raise UsageError(
                f"--teacher_cache {self.cache.root} holds other teacher tokens for examples {rows} than the batch "
                "scores: the data or its alignment changed since the cache was written; rewrite the cache"
            )
        return {**cross, "teacher_logp": logp[:, 0]}  # at the cache's temperature, the run's (check_run)
