"""Wiring a run: check everything that can be checked before any model loads, then build engines, data and stream."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from ds_distill import data, models, on_policy
from ds_distill.common import UsageError
from ds_distill.config import RunConfig
from ds_distill.core import checkpoint
from ds_distill.core.trainer import Trainer
from ds_distill.ds_config import DSConfig, default_ds_configs, load_ds_config
from ds_distill.losses.objective import Objective
from ds_distill.runtime import distributed, monitors
from ds_distill.runtime.callbacks import Callback
from ds_distill.teachers import cache_reader
from ds_distill.teachers.live import LiveTeachers

log = logging.getLogger("ds_distill")


def build(cfg: RunConfig, callbacks: list[Callback] = (), objective: Objective | None = None) -> Trainer:
    """Check everything that can be checked before any model loads, then build the engines and the data.
    ``objective``: what to train for (default: ``Objective.from_config(cfg)``); build() sets its vocabulary."""
    cfg.validate()
    world = distributed.init_distributed()
    if world.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # console logging on rank 0 only
    has_gpu = get_accelerator().device_name() != "cpu"
    default_student = default_ds_configs(has_gpu)[0]
    sds = load_ds_config(
        cfg.deepspeed_config or default_student,
        world_size=world.world_size,
        flag="deepspeed_config",
        needs_optimizer=True,
    )
    monitors.check_packages(sds.raw)
    if world.rank == 0 and not cfg.deepspeed_config:
        log.info("no --deepspeed_config given: using %s (%s present)", sds.path, "a GPU is" if has_gpu else "no GPU is")
    per_rank = get_accelerator().total_memory() // (1 if has_gpu else world.local_world_size)
    tds = teacher_ds_config(cfg.teacher, cfg.teacher_deepspeed_config, world, quiet=cfg.alpha == 1.0 or not cfg.teacher)
    # alpha = 1 is plain fine-tuning: no teacher forward at all (the tokenizers are still checked below).
    teacher_paths = cfg.teacher if cfg.alpha < 1.0 else []
    models.check_positions(cfg.seq_len, [cfg.student, *teacher_paths])
    universal = (
        checkpoint.universal_for_resume(
            checkpoint.ckpt_root(cfg.output_dir), world.world_size, sds.zero_stage, world.rank
        )
        if cfg.resume
        else None
    )
    if universal:  # a merge into the student's JSON, logged with it below
        sds.raw["checkpoint"] = {**sds.raw.get("checkpoint", {}), "load_universal": True}
    _prepare_output_dir(cfg, sds, tds, world.rank)

    tokenizer = models.load_tokenizer(cfg.student)
    chat_template = Path(cfg.chat_template).read_text() if cfg.chat_template else None
    data_kw = dict(
        seq_len=cfg.seq_len,
        data_format=cfg.data_format,
        packing=cfg.packing,
        train_on_prompt=cfg.train_on_prompt,
        drop_long=cfg.drop_long,
        chat_template=chat_template,
    )
    train_set = data.get_dataset(
        cfg.data, tokenizer, split=cfg.data_split, max_samples=cfg.max_samples or None, **data_kw
    )
    eval_set = data.get_dataset(cfg.eval_data, tokenizer, **data_kw) if cfg.eval_data else None
    # A teacher cache must hold exactly these tokens (checked before any model loads); its eval rows come either from
    # --eval_data or, split off below, from --data.
    caches = cache_reader.open_for_run(cfg, tokenizer, train_set, eval_set) if cfg.teacher_cache else None
    if eval_set is None and cfg.eval_fraction:
        train_set, eval_set = data.split_eval(
            train_set, cfg.eval_fraction, cfg.seed, min_eval=sds.micro_batch * world.world_size
        )
        if eval_set is None and cfg.early_stopping_patience:
            raise UsageError(
                f"--early_stopping_patience needs an eval set but {len(train_set)} examples are too few to hold "
                f"out one micro-batch per rank: pass --eval_data or use more data"
            )
    if eval_set is not None and len(eval_set) < sds.micro_batch * world.world_size:
        raise UsageError(
            f"the eval set has {len(eval_set)} examples, fewer than one micro-batch per rank "
            f"({sds.micro_batch} x {world.world_size}): raise --eval_fraction, pass a larger --eval_data, or set --eval_fraction 0"
        )
    vocab = models.shared_vocab_size(cfg.student, tokenizer, cfg.teacher)
    if cfg.on_policy_fraction:
        on_policy.check_prompts(train_set, repr(cfg.data))

    _seed_everything(cfg.seed)
    packed_rows = cfg.packing and sds.micro_batch > 1
    student = models.student_engine(cfg.student, sds, cfg.attn_implementation, packed_rows)
    monitors.attach(student)
    engines = [models.teacher_engine(path, tds, cfg.attn_implementation, packed_rows) for path in teacher_paths]
    models.check_output_rows(vocab, [student, *engines], [cfg.student, *teacher_paths])
    for engine, path in zip([student, *engines], [cfg.student, *teacher_paths]):
        models.check_logits(engine, path, vocab, packing=cfg.packing)
    teachers = (
        cache_reader.CachedTeacher(caches, {"train": "data", "eval": "eval_data" if cfg.eval_data else "data"})
        if caches
        else LiveTeachers(engines)
    )
    stream = data.BatchStream(
        train_set,
        batch_size=sds.micro_batch,
        rank=world.rank,
        world_size=world.world_size,
        seed=cfg.seed,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.prefetch_batches:
        from ds_distill.data.prefetch import ClosePrefetcher, Prefetcher

        stream = Prefetcher(stream, cfg.prefetch_batches, pin=has_gpu)
        callbacks = [ClosePrefetcher(stream), *callbacks]
    # After the prefetcher (data only, on its thread): generation's collectives stay on the main thread.
    if cfg.on_policy_fraction:  # the student writes a seeded fraction of the completions
        stream = on_policy.wrap(cfg, stream, student, tokenizer, world=world, rank_memory=per_rank)
        callbacks = [*callbacks, on_policy.GenerationRate(stream)]
    objective = (objective or Objective.from_config(cfg)).with_vocab(vocab)
    trainer = Trainer(
        cfg, student, teachers, stream, eval_set, objective=objective, ds=sds, tokenizer=tokenizer, callbacks=callbacks
    )
    trainer.source_ids = data.SourceIds(train_set)
    if cfg.resume and checkpoint.read_latest(trainer.ckpt_root):
        trainer.resume(universal)
    elif cfg.resume and world.rank == 0:
        log.info("--resume: no checkpoint yet under %s, starting at step 0", trainer.ckpt_root)
    return trainer


def teacher_ds_config(teachers: list[str], teacher_deepspeed_config: str, world, quiet: bool = False) -> DSConfig:
    """The teachers' DeepSpeed JSON: the one named, else chosen by fit (``models.teacher_placement``), checked."""
    path = teacher_deepspeed_config
    if not path:
        has_gpu = get_accelerator().device_name() != "cpu"
        _, sharded, replicated = default_ds_configs(has_gpu)
        per_rank = get_accelerator().total_memory() // (1 if has_gpu else world.local_world_size)
        path, why = models.teacher_placement(
            teachers,
            sharded=sharded,
            replicated=replicated,
            world_size=world.world_size,
            rank_memory=per_rank,
            bytes_per_param=2 if has_gpu else 4,
        )
        if world.rank == 0 and not quiet:
            log.info("no --teacher_deepspeed_config given: using %s (%s)", path, why)
    return load_ds_config(path, world_size=world.world_size, flag="teacher_deepspeed_config", needs_optimizer=False)


def _prepare_output_dir(cfg: RunConfig, sds: DSConfig, tds: DSConfig, rank: int) -> None:
    """Refuse to train over someone's checkpoints; record the configs that really ran."""
    out = Path(cfg.output_dir)
    latest = checkpoint.read_latest(checkpoint.ckpt_root(out))
    if latest and not cfg.resume:
        raise UsageError(
            f"{out} already holds checkpoints (latest: {latest}): pass --resume to continue, or pick another --output_dir"
        )
    monitors.place(
        sds.raw, out, rank
    )  # the monitors write under the run directory unless the JSON names a place: a merge, logged below
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (out / "ds_config_student.json").write_text(json.dumps(sds.raw, indent=2))
        (out / "ds_config_teacher.json").write_text(json.dumps(tds.raw, indent=2))
        log.info("student DeepSpeed config (merged, as run): %s", json.dumps(sds.raw, sort_keys=True))


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: RunConfig, callbacks: list[Callback] = (), objective: Objective | None = None) -> Trainer:
    trainer = build(cfg, callbacks, objective)
    start = trainer.step
    trainer.fit()
    final = checkpoint.final_dir(cfg.output_dir)
    # A run resumed at or past max_steps trained nothing: it exports only what a previous job left unexported.
    if cfg.export and trainer.step >= cfg.max_steps and (trainer.step > start or not checkpoint.is_export(final)):
        if trainer.rank == 0:
            checkpoint.export_final(cfg.output_dir, trainer.last_tag)
            if trainer.step == start:
                log.info("exported %s (step %d) to %s", trainer.last_tag, trainer.step, final)
        distributed.barrier()
    for cb in trainer.callbacks:
        cb.on_train_end(trainer)
    return trainer


def default_callbacks(cfg: RunConfig) -> list[Callback]:
    """The extras a run gets from its flags; each is one object, none is a branch in the loop."""
    from ds_distill.extras.early_stopping import EarlyStopping
    from ds_distill.extras.manifest import Manifest
    from ds_distill.extras.preemption import Preemption
    from ds_distill.extras.tracking import ExampleTracker

    callbacks: list[Callback] = [Preemption()]  # (--router is part of the objective: build())
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta))
    if cfg.track_examples:
        callbacks.append(ExampleTracker())
    return [*callbacks, Manifest()]  # last: it records what the others did (checkpoints, best export)
