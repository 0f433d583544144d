"""Wiring a run in phases: configs, data, models, teacher source, stream, callbacks; then ``run`` trains and exports.

Each phase is one function with a typed result, called in that order by ``build()``. The first two check everything
they can before any model loads (flags, DeepSpeed JSONs, the output directory, the data, teacher caches). On-policy is
wired in one place, the stream phase (its prompt check included, so that check runs after the models load).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator

from ds_distill import data, models, on_policy
from ds_distill.common import UsageError
from ds_distill.config import RunConfig
from ds_distill.core import checkpoint, resume
from ds_distill.core.trainer import Trainer
from ds_distill.ds_config import DSConfig, default_ds_configs, default_one_rank_config, load_ds_config, schedule_check
from ds_distill.losses.objective import Objective
from ds_distill.runtime import distributed, monitors
from ds_distill.runtime.callbacks import Callback
from ds_distill.teachers import acceptance, attention, cache_reader, ensemble, hidden, served
from ds_distill.teachers.live import AlignmentReport, CrossTokenizerTeacher, LiveTeachers, TeacherSource

log = logging.getLogger("ds_distill")


def build(cfg: RunConfig, callbacks: list[Callback] = (), objective: Objective | None = None) -> Trainer:
    """A run ready to ``fit``, phase by phase (module docstring), resumed from its latest checkpoint with --resume.
    ``objective``: what to train for (default: ``Objective.from_config(cfg)``); build() sets its vocabulary."""
    run_configs = configs(cfg)
    run_data = load_data(cfg, run_configs)
    engines = load_models(cfg, run_configs, run_data)
    teachers = teacher_source(cfg, run_data, engines)
    stream = batch_stream(cfg, run_configs, run_data, engines, teachers)
    run_callbacks = [*stream.callbacks, *callbacks]  # the stream's own, then the extras (default_callbacks)
    cross = teachers.cross if isinstance(teachers, served.ServedCrossTokenizerTeacher) else teachers
    if isinstance(cross, CrossTokenizerTeacher):  # the per-step alignment report
        run_callbacks.insert(0, AlignmentReport(cross))
    trainer = Trainer(
        cfg,
        engines.student,
        teachers,
        stream.batches,
        run_data.eval,
        objective=(objective or Objective.from_config(cfg)).with_vocab(engines.vocab),
        ds=run_configs.student,
        tokenizer=run_data.tokenizer,
        callbacks=run_callbacks,
        source_ids=data.SourceIds(run_data.train),
    )
    if cfg.resume and checkpoint.read_latest(trainer.ckpt_root):
        trainer.resume(run_configs.universal)
    elif cfg.resume and run_configs.world.rank == 0:
        log.info("--resume: no checkpoint yet under %s, starting at step 0", trainer.ckpt_root)
    return trainer


# ------------------------------------------------------------------------------------------------ 1. configs
@dataclass(frozen=True)
class Configs:
    """The run's settings beyond ``RunConfig``, checked; the output directory is ready (or refused)."""

    world: distributed.WorldInfo
    student: DSConfig  # the student's DeepSpeed JSON, as run (merged: monitors' places, universal resume)
    teacher: DSConfig  # the teachers' (inference, no optimizer)
    has_gpu: bool
    rank_memory: int  # accelerator bytes one rank may use (on CPU: the host's memory shared by the node's ranks)
    teachers: list[str]  # the teacher models to load (--teacher): none at alpha = 1 (plain fine-tuning)
    universal: str | None  # the universal checkpoint to resume from (saved with another number of ranks)


def configs(cfg: RunConfig) -> Configs:
    """Validate the flags, read and check both DeepSpeed JSONs, the output dir and a resumed run's settings, start the
    process group, prepare the output dir. The checks run against the launcher's world before the group starts
    (``distributed.planned_world``): bad input is refused in one line, not after DeepSpeed's start-up lines."""
    cfg.validate()
    _check_output_dir(cfg)  # before the JSONs are chosen and logged: its one line is the only one
    planned = distributed.planned_world()
    if planned.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # console logging on rank 0 only
    has_gpu = get_accelerator().device_name() != "cpu"
    sds = load_ds_config(
        cfg.deepspeed_config or student_ds_config(cfg.student, planned, has_gpu),
        world_size=planned.world_size,
        flag="deepspeed_config",
        needs_optimizer=True,
        has_gpu=has_gpu,
    )
    _check_schedule(sds, cfg.max_steps, planned.rank)
    monitors.check_packages(sds.raw)
    tds = teacher_ds_config(
        cfg.teacher, cfg.teacher_deepspeed_config, planned, quiet=cfg.alpha == 1.0 or not cfg.teacher
    )
    # alpha = 1 is plain fine-tuning: no teacher forward at all (the tokenizers are still checked, load_models).
    teachers = cfg.teacher if cfg.alpha < 1.0 else []
    models.check_positions(cfg.seq_len, [cfg.student, *teachers])
    resumed = cfg.resume and checkpoint.read_latest(checkpoint.ckpt_root(cfg.output_dir))
    settings = resume.settings(cfg, sds, planned.world_size) if resumed or planned.rank == 0 else {}
    if resumed:  # before the universal conversion and any model: a changed meaning is refused in one line
        resume.check(cfg, settings, Path(cfg.output_dir), planned.rank)
    world = distributed.init_distributed()
    universal = (
        checkpoint.universal_for_resume(
            checkpoint.ckpt_root(cfg.output_dir), world.world_size, sds.zero_stage, world.rank
        )
        if cfg.resume
        else None
    )
    if universal:  # a merge into the student's JSON, logged with it below
        sds.raw["checkpoint"] = {**sds.raw.get("checkpoint", {}), "load_universal": True}
    # A resume with nothing left to train keeps the record of the attempt that trained (its settings are what ran).
    finished = bool(resumed) and checkpoint.step_of(resumed) >= cfg.max_steps
    _prepare_output_dir(cfg, sds, tds, world.rank, settings, record=not finished)
    return Configs(world, sds, tds, has_gpu, _rank_memory(world, has_gpu), teachers, universal)


# --------------------------------------------------------------------------------------------------- 2. data
@dataclass(frozen=True)
class Data:
    """The student's tokenizer and the tokenised sets (``data.get_dataset``: columns id, row, input_ids, labels)."""

    tokenizer: Any
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset, or None: no evaluation
    caches: list[cache_reader.TeacherCache]  # --teacher_cache, checked against these tokens (before the eval split)
    servers: list[served.ServedModel]  # --teacher_url, ready and checked against the student's tokenizer
    teacher_tokenizer: Any = None  # --cross_tokenizer: the teacher's own (its ids and the chunk maps are in the sets)
    chat_template: str | None = None  # chat data: the Jinja text it is rendered with (--chat_template or the student's)


def load_data(cfg: RunConfig, run: Configs) -> Data:
    """Tokenise --data and --eval_data (or split --eval_fraction off --data); check the teacher caches against them;
    connect to the served teachers."""
    tokenizer = models.load_tokenizer(cfg.student)
    # A teacher with another tokenizer: every example is aligned once, here (cached with the tokenised data).
    teacher_tokenizer = None
    if cfg.cross_tokenizer and cfg.teacher:
        teacher_tokenizer = models.load_tokenizer(cfg.teacher[0])
    elif cfg.cross_tokenizer and cfg.teacher_cache:  # the cache's saved copy
        teacher_tokenizer = cache_reader.cross_teacher_tokenizer(cfg.teacher_cache[0], cfg.cross_tokenizer)
    elif cfg.cross_tokenizer and cfg.teacher_url:  # checked against the server's own at connect (below)
        teacher_tokenizer = models.load_tokenizer(cfg.teacher_tokenizer)
    train_set, eval_set = tokenise(cfg, tokenizer, teacher_tokenizer)
    template = chat_template_of(cfg, tokenizer)
    # A teacher cache must hold exactly these tokens (checked before any model loads); its eval rows come either from
    # --eval_data or, split off below, from --data.
    caches = cache_reader.open_for_run(cfg, tokenizer, train_set, eval_set, template) if cfg.teacher_cache else []
    ranks_batch = run.student.micro_batch * run.world.world_size  # one micro-batch per rank
    if eval_set is None and cfg.eval_fraction:
        train_set, eval_set = data.split_eval(train_set, cfg.eval_fraction, cfg.seed, min_eval=ranks_batch)
        if eval_set is None and cfg.early_stopping_patience:
            raise UsageError(
                f"--early_stopping_patience needs an eval set but {len(train_set)} examples are too few to hold "
                f"out one micro-batch per rank: pass --eval_data or use more data"
            )
    if eval_set is not None and len(eval_set) < ranks_batch:
        raise UsageError(
            f"the eval set has {len(eval_set)} examples, fewer than one micro-batch per rank "
            f"({run.student.micro_batch} x {run.world.world_size}): raise --eval_fraction, pass a larger --eval_data, "
            "or set --eval_fraction 0"
        )
    # Served teachers: ready and checked (tokenizer, K, vocabulary, parity against --teacher_reference), each in one
    # line, before any model loads (the vocabulary distilled over is the student tokenizer's: models.shared_vocab_size).
    servers = []
    if cfg.teacher_url and teacher_tokenizer is not None:  # ALM: each scored teacher token's own log-prob (K = 1)
        servers = served.connect_run(cfg, teacher_tokenizer, len(teacher_tokenizer), 1, "--teacher_tokenizer's")
    elif cfg.teacher_url:
        servers = served.connect_run(cfg, tokenizer, len(tokenizer))
    return Data(tokenizer, train_set, eval_set, caches, servers, teacher_tokenizer, template)


def chat_template_of(cfg, tokenizer) -> str | None:
    """The Jinja text chat data is rendered with (``--chat_template`` FILE, else the tokenizer's); None when --data is
    not chat (``data.format_of``). Every teacher must render a sample conversation the same way
    (``models.check_teacher_tokenizer``)."""
    if data.format_of(cfg.data, cfg.data_split, cfg.data_format) != "messages":
        return None
    return Path(cfg.chat_template).read_text() if cfg.chat_template else tokenizer.chat_template


def tokenise(cfg, tokenizer, teacher_tokenizer=None) -> tuple[Any, Any]:
    """(--data, --eval_data or None) tokenised with the run's token flags (``cache_format.TOKEN_FLAGS``): the one
    place that reads them, shared with ``ds_distill.cache_teacher`` so that a cache holds a run's exact tokens."""
    data_kw = dict(
        seq_len=cfg.seq_len,
        data_format=cfg.data_format,
        packing=cfg.packing,
        train_on_prompt=cfg.train_on_prompt,
        drop_long=cfg.drop_long,
        chat_template=Path(cfg.chat_template).read_text() if cfg.chat_template else None,
        teacher_tokenizer=teacher_tokenizer,
    )
    train_set = data.get_dataset(
        cfg.data, tokenizer, split=cfg.data_split, max_samples=cfg.max_samples or None, **data_kw
    )
    return train_set, data.get_dataset(cfg.eval_data, tokenizer, **data_kw) if cfg.eval_data else None


# ------------------------------------------------------------------------------------------------- 3. models
@dataclass(frozen=True)
class Models:
    """The DeepSpeed engines, each checked against its own forward, and the vocabulary they share."""

    student: Any  # the student engine (optimizer and scheduler of its JSON)
    teachers: list[Any]  # frozen teacher engines (none at alpha = 1 or with a cache)
    vocab: int  # the tokenizer's real vocabulary: logits past it (padding rows) are ignored


def load_models(cfg: RunConfig, run: Configs, run_data: Data) -> Models:
    """Check the tokenizers agree, seed, build the engines, probe each one's logits against its own forward."""
    vocab = models.shared_vocab_size(
        cfg.student, run_data.tokenizer, cfg.teacher, cfg.cross_tokenizer, run_data.chat_template
    )
    _seed_everything(cfg.seed)
    packed_rows = cfg.packing and run.student.micro_batch > 1
    student = models.student_engine(
        cfg.student,
        run.student,
        attn=cfg.attn_implementation,
        packed_rows=packed_rows,
        lora=models.LoraSpec.from_config(cfg),
        gradient_checkpointing=cfg.gradient_checkpointing,
        # --hidden_loss with a student of another width: its projections train inside the student's engine
        projection=hidden.projection_for(cfg, run.teachers),
    )
    monitors.attach(student)
    if student.module.grad_into_weight and run.world.rank == 0:  # models.sparse_tied_embedding
        log.info("tied embedding: its gradient is sparse and added into the head's (one [V, H] gradient buffer)")
    if cfg.router_aux_loss and student.module.use_router_loss() and run.world.rank == 0:
        log.info(
            "MoE student: adding its router load-balancing loss x router_aux_loss_coef %g",
            student.module.router_loss.coef,
        )
    teachers = [models.teacher_engine(p, run.teacher, cfg.attn_implementation, packed_rows) for p in run.teachers]
    engines, paths = [student, *teachers], [cfg.student, *run.teachers]
    # Each model scores its own tokenizer's vocabulary: the student's is shared unless --cross_tokenizer.
    vocabs = [vocab] + [len(run_data.teacher_tokenizer) if run_data.teacher_tokenizer else vocab] * len(teachers)
    for engine, path, v in zip(engines, paths, vocabs):
        models.check_output_rows(v, [engine], [path])
        models.check_logits(engine, path, v, packing=cfg.packing)
    return Models(student, teachers, vocab)


# ----------------------------------------------------------------------------------------- 4. teacher source
def teacher_source(cfg: RunConfig, run_data: Data, engines: Models) -> TeacherSource:
    """Where a step's teacher targets come from: servers (--teacher_url, with any caches as one ensemble), the caches,
    the live teacher engines, or live engines beside caches or servers as one ensemble (``ensemble.MixedTeachers``);
    with --hidden_loss, wrapped to add the hidden-state loss (``teachers.hidden``: live engines only, refused
    otherwise); with --on_policy_anchor, wrapped to add the CE on the dataset's completions of the sampled
    micro-batches (``on_policy.anchor``); with --attention_relation_weight, wrapped to add MiniLMv2's attention
    relations (``teachers.attention``); with --loss tvd and one live teacher, wrapped to log the expected
    acceptance rate of the student as its draft (``teachers.acceptance``)."""
    splits = {"train": "data", "eval": "eval_data" if cfg.eval_data else "data"}
    sparse = None  # the caches and servers: top-K plus a tail, or ALM's own-token log-probs
    if cfg.cross_tokenizer and run_data.servers:  # ALM from the teacher's log-probs of its own tokens
        _log_cross(cfg, run_data, f"served at {cfg.teacher_url[0]}")
        sparse = served.ServedCrossTokenizerTeacher(run_data.servers, splits)
    elif cfg.cross_tokenizer and run_data.caches:
        _log_cross(cfg, run_data, f"from the cache {cfg.teacher_cache[0]}")
        sparse = cache_reader.CachedCrossTokenizerTeacher(run_data.caches[0], splits)
    elif run_data.servers:
        sparse = served.ServedTeacher(run_data.servers, run_data.caches, splits)
    elif run_data.caches:
        sparse = cache_reader.CachedTeacher(run_data.caches, splits)
    if sparse is not None:  # with live teachers too: one ensemble, each member through its own source
        source = ensemble.MixedTeachers(LiveTeachers(engines.teachers), sparse) if engines.teachers else sparse
    elif cfg.cross_tokenizer and engines.teachers:
        teacher_tok = run_data.teacher_tokenizer
        maps = models.vocab_map(run_data.tokenizer, teacher_tok) if cfg.cross_tokenizer == "vocab_map" else None
        _log_cross(cfg, run_data, f"{len(maps[0])} tokens map by their bytes" if maps else "")
        source = CrossTokenizerTeacher(engines.teachers[0], cfg.cross_tokenizer, maps, len(teacher_tok))
    else:
        source = LiveTeachers(engines.teachers)
    one_live_teacher = isinstance(source, LiveTeachers) and len(engines.teachers) == 1
    source = hidden.wrap(cfg, source, engines.student)  # --hidden_loss: hooks on the mapped layers, else unchanged
    source = attention.wrap(cfg, source, engines.student)  # --attention_relation_weight: + W x MiniLMv2 relations
    source = on_policy.anchor.wrap(cfg, source, engines.student)  # --on_policy_anchor: + W x CE on the data
    # --loss tvd with one live teacher: + the draft's expected acceptance rate 1 - TVD, logged (adds no loss)
    return acceptance.wrap(cfg, source, one_live_teacher=one_live_teacher)


def _log_cross(cfg: RunConfig, run_data: Data, more: str) -> None:
    """The method of a cross-tokenizer run, once at its start (rank 0)."""
    if distributed.rank_or_none() in (None, 0):
        log.info(
            "cross-tokenizer distillation: --cross_tokenizer %s (student %d tokens, teacher %d%s)",
            cfg.cross_tokenizer,
            len(run_data.tokenizer),
            len(run_data.teacher_tokenizer),
            f", {more}" if more else "",
        )


# ------------------------------------------------------------------------------------------------- 5. stream
@dataclass(frozen=True)
class Stream:
    """The training batch stream and the callbacks it needs at the loop's hooks (prefetch thread, generation rate)."""

    batches: Any  # data.BatchStream, maybe behind a Prefetcher and an on_policy.OnPolicyStream
    callbacks: list[Callback]


def batch_stream(cfg: RunConfig, run: Configs, run_data: Data, engines: Models, teachers: TeacherSource) -> Stream:
    """One seeded global order per epoch, split over the ranks; prefetched on a thread; on-policy: all of it here;
    a served teacher's requests issued as micro-batches are drawn."""
    world, pad = run.world, run_data.tokenizer.pad_token_id
    stream = data.BatchStream(
        run_data.train,
        batch_size=run.student.micro_batch,
        rank=world.rank,
        world_size=world.world_size,
        seed=cfg.seed,
        pad_token_id=pad,
    )
    callbacks: list[Callback] = []
    if cfg.prefetch_batches:
        from ds_distill.data.prefetch import ClosePrefetcher, Prefetcher

        stream = Prefetcher(stream, cfg.prefetch_batches, pin=run.has_gpu)
        callbacks.append(ClosePrefetcher(stream))
    server_part = teachers.sparse if isinstance(teachers, ensemble.MixedTeachers) else teachers
    if isinstance(server_part, served.ServedTeacher):  # requests two steps ahead; a dead server: checkpoint, exit 75
        from ds_distill.extras.served_guard import ServedGuard

        stream = served.ServedStream(stream, server_part, ahead=2 * run.student.grad_accum)
        callbacks.append(ServedGuard(stream, run.student.grad_accum))
    # After the prefetcher (data only, on its thread): generation's collectives stay on the main thread.
    if cfg.on_policy_fraction:  # the student (or the one teacher) writes a seeded fraction of the completions
        on_policy.check_prompts(run_data.train, repr(cfg.data))
        sampler = engines.teachers[0] if cfg.on_policy_sampler == "teacher" else engines.student
        stream = on_policy.wrap(cfg, stream, sampler, run_data.tokenizer, world=world, rank_memory=run.rank_memory)
        callbacks.append(on_policy.monitor(cfg, stream))  # generation rate and collapse monitors
    return Stream(stream, callbacks)


# ------------------------------------------------------------------------------------------------ helpers
def student_ds_config(student: str, world, has_gpu: bool) -> str:
    """The student's DeepSpeed JSON when the user named none: the device's shipped file, its ZeRO stage chosen by fit
    (``models.student_placement``), logged. A JSON the user names is used as written."""
    path, why = models.student_placement(
        models.parameter_count(student) if world.world_size == 1 else None,
        zero3=default_ds_configs(has_gpu)[0],
        one_rank=default_one_rank_config(has_gpu),
        world_size=world.world_size,
        rank_memory=_rank_memory(world, has_gpu),
    )
    if world.rank == 0:
        log.info(
            "no --deepspeed_config given: using %s (%s present; %s)", path, "a GPU is" if has_gpu else "no GPU is", why
        )
    return path


def teacher_ds_config(teachers: list[str], teacher_deepspeed_config: str, world, quiet: bool = False) -> DSConfig:
    """The teachers' DeepSpeed JSON: the one named, else chosen by fit (``models.teacher_placement``), checked."""
    path = teacher_deepspeed_config
    if not path:
        has_gpu = get_accelerator().device_name() != "cpu"
        _, sharded, replicated = default_ds_configs(has_gpu)
        path, why = models.teacher_placement(
            teachers,
            sharded=sharded,
            replicated=replicated,
            world_size=world.world_size,
            rank_memory=_rank_memory(world, has_gpu),
            bytes_per_param=2 if has_gpu else 4,
        )
        if world.rank == 0 and not quiet:
            log.info("no --teacher_deepspeed_config given: using %s (%s)", path, why)
    return load_ds_config(
        path,
        world_size=world.world_size,
        flag="teacher_deepspeed_config",
        needs_optimizer=False,
        has_gpu=get_accelerator().device_name() != "cpu",
    )


def _check_schedule(sds: DSConfig, max_steps: int, rank: int) -> None:
    """The scheduler's length against --max_steps (``ds_config.schedule_check``): refused, or warned on rank 0."""
    problems, warnings = schedule_check(sds, max_steps)
    if problems:
        raise UsageError("; ".join(problems))
    for line in warnings if rank == 0 else []:
        log.warning(line)


def _prepare_output_dir(
    cfg: RunConfig, sds: DSConfig, tds: DSConfig, rank: int, settings: dict[str, Any], record: bool = True
) -> None:
    """Place the monitors under the run directory and record the configs that really ran (``resume.record``: what a
    later --resume is compared with); ``record`` False (a resume with nothing left to train) keeps the last attempt's
    record. The directory was checked before the process group started (``_check_output_dir``)."""
    out = Path(cfg.output_dir)
    monitors.place(
        sds.raw, out, rank
    )  # the monitors write under the run directory unless the JSON names a place: a merge, logged below
    if rank == 0 and record:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (out / "ds_config_student.json").write_text(json.dumps(sds.raw, indent=2))
        (out / "ds_config_teacher.json").write_text(json.dumps(tds.raw, indent=2))
        resume.record(settings, out)
        log.info("student DeepSpeed config (merged, as run): %s", json.dumps(sds.raw, sort_keys=True))


def _check_output_dir(cfg: RunConfig) -> None:
    """Before the process group starts: ``--output_dir`` can hold a run, and holds no checkpoints unless --resume."""
    out = Path(cfg.output_dir)
    _check_writable(out)
    latest = checkpoint.read_latest(checkpoint.ckpt_root(out))
    if latest and not cfg.resume:
        raise UsageError(
            f"{out} already holds checkpoints (latest: {latest}): pass --resume to continue, or pick another "
            "--output_dir"
        )


def _check_writable(out: Path) -> None:
    """One UsageError, before any model loads, when ``--output_dir`` is a file or cannot be written (read-only mount,
    another user's folder): found otherwise at the first checkpoint, after the training it was to keep."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder: pick another --output_dir")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    try:  # a real write: permission bits do not show a read-only mount, and root passes them all
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise UsageError(
            f"--output_dir {out}: cannot write in {existing} ({exc.strerror}): pick another --output_dir"
        ) from None


def _rank_memory(world: distributed.WorldInfo, has_gpu: bool) -> int:
    """Accelerator bytes one rank may use: a GPU's own memory, or the host's shared by the node's ranks."""
    return get_accelerator().total_memory() // (1 if has_gpu else world.local_world_size)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: RunConfig, callbacks: list[Callback] = (), objective: Objective | None = None) -> Trainer:
    trainer = build(cfg, callbacks, objective)
    try:
        _fit_and_export(cfg, trainer)
        for cb in trainer.callbacks:
            cb.on_train_end(trainer)
    finally:  # an error included (a full disk at a checkpoint): signal handlers, threads and connections go back
        for cb in trainer.callbacks:
            cb.on_exit(trainer)
    return trainer


def _fit_and_export(cfg: RunConfig, trainer: Trainer) -> None:
    start = trainer.step
    trainer.fit()
    final = checkpoint.final_dir(cfg.output_dir)
    # A run resumed at or past max_steps trained nothing: it exports only what a previous job left unexported.
    if cfg.export and trainer.step >= cfg.max_steps and (trainer.step > start or not checkpoint.is_export(final)):
        if trainer.student.module.lora is not None:  # every rank: merged one module at a time under ZeRO-3
            checkpoint.export_final_engine(trainer.student, cfg.output_dir)
        elif trainer.rank == 0:
            checkpoint.export_final(cfg.output_dir, trainer.last_tag)
        if trainer.rank == 0:
            log.info("exported %s (step %d) to %s", trainer.last_tag, trainer.step, final)
        distributed.barrier()


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
