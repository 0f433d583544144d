"""The DeepSpeed JSON (``ds_configs/``): read, checked, never rewritten.

DeepSpeed owns batch sizes, precision, ZeRO stage, optimizer, scheduler, clipping and monitors: those live only in the
JSON files. ``load_ds_config`` checks one (every problem at once, with the fix) and returns it unchanged.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_distill.common import UsageError, read_json

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"

# Top-level keys DeepSpeed reads (deepspeed/runtime/constants.py and the feature configs). DeepSpeed ignores unknown
# keys silently, so a typo such as "gradient_cliping" would quietly disable clipping: we refuse them instead.
DS_KNOWN_KEYS = frozenset(
    """
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print wall_clock_breakdown
dump_state optimizer scheduler fp16 bf16 bfloat16 amp gradient_clipping zero_optimization zero_allow_untested_optimizer
zero_force_ds_cpu_optimizer prescale_gradients gradient_predivide_factor sparse_gradients communication_data_type
seq_parallel_communication_data_type activation_checkpointing flops_profiler tensorboard wandb csv_monitor comet
elasticity aio pipeline checkpoint data_types compression_training data_efficiency curriculum_learning autotuning
nebula weight_quantization memory_breakdown disable_allgather sparse_attention torch_autocast compile eigenvalue
progressive_layer_drop hybrid_engine timers graph_harvesting use_data_before_expert_parallelism zero_quantized_weights
zero_quantized_gradients zero_hpz_partition_size load_universal_checkpoint use_node_local_storage
dataloader_drop_last mics_shard_size mics_hierarchical_params_gather pld_enabled pld_params
""".split()
)


@dataclass
class DSConfig:
    """A checked DeepSpeed JSON: the dict handed to DeepSpeed unchanged, plus where it came from.

    ``micro_batch`` and ``grad_accum`` are resolved as DeepSpeed resolves them (``DeepSpeedConfig.
    _set_batch_related_parameters``) from whichever two of train_batch_size, train_micro_batch_size_per_gpu and
    gradient_accumulation_steps the JSON gives, with ``world_size`` ranks (train_batch_size alone: accumulation 1).
    """

    path: str
    raw: dict[str, Any]
    world_size: int = 1

    @property
    def zero_stage(self) -> int:
        return int(self.raw.get("zero_optimization", {}).get("stage", 0))

    @property
    def micro_batch(self) -> int:
        return _batch_sizes(self.raw, self.world_size)[0]

    @property
    def grad_accum(self) -> int:
        return _batch_sizes(self.raw, self.world_size)[1]

    @property
    def bf16(self) -> bool:
        return bool(self.raw.get("bf16", {}).get("enabled", False))


def _batch_sizes(raw: dict[str, Any], world_size: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) as DeepSpeed derives them from the keys present (all positive
    integers; load_ds_config checked that they divide)."""
    total, micro, gas = (
        raw.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    )
    if micro is None:
        return total // ((gas or 1) * world_size), gas or 1
    if gas is None:
        return micro, total // (micro * world_size) if total is not None else 1
    return micro, gas


def _find_auto(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{where}.{k}" if where else k)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{where}[{i}]")]
    return [where] if node == "auto" else []


def load_ds_config(path: str, *, world_size: int, flag: str, needs_optimizer: bool, has_gpu: bool = True) -> DSConfig:
    """Read and check a DeepSpeed JSON; every problem is reported at once, with the fix. ``has_gpu``: the run has an
    accelerator (fp16 needs one)."""
    raw = read_json(path, f"--{flag}", "pick a file from ds_configs/")
    if not isinstance(raw, dict):
        raise UsageError(f"--{flag} {path!r} must hold a JSON object")
    problems = []
    unknown = sorted(k for k in raw if k not in DS_KNOWN_KEYS and not k.startswith("_"))
    if unknown:
        near = {k: difflib.get_close_matches(k, DS_KNOWN_KEYS, 1) for k in unknown}
        means = ", ".join(f"{k} -> {m[0]}" for k, m in near.items() if m)
        problems.append(
            f"unknown top-level keys {unknown} (DeepSpeed would silently ignore them): "
            + (f"did you mean {means}?" if means else "fix the spelling or remove them")
        )
    autos = _find_auto(raw)
    if autos:
        problems.append(f'"auto" values at {autos}: write the numbers (only the HF Trainer fills "auto")')
    problems += _batch_problems(raw, world_size)
    stage = raw.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage {stage!r} must be 0, 1, 2 or 3")
    if raw.get("fp16", {}).get("enabled") and raw.get("bf16", {}).get("enabled"):
        problems.append("fp16 and bf16 are both enabled: enable one")
    elif raw.get("fp16", {}).get("enabled") and not has_gpu:
        # DeepSpeed's CPU accelerator has no fp16 kernels (DeepSpeed #1270): the engine would stop deep in its init.
        problems.append(
            'fp16 is enabled but this run has no GPU: CPU runs need fp32 or bf16 (set "fp16": {"enabled": false}, '
            "e.g. ds_configs/cpu_zero3.json)"
        )
    if raw.get("activation_checkpointing"):
        # DeepSpeed's block configures deepspeed.checkpointing.checkpoint, which only models that call it use; a
        # Hugging Face model never does, so the block would change nothing (DeepSpeed #5704).
        problems.append(
            'the "activation_checkpointing" block has no effect on a Hugging Face model: remove it and pass '
            "--gradient_checkpointing"
        )
    if needs_optimizer and "optimizer" not in raw:
        problems.append('no "optimizer" block: the student needs one (see ds_configs/zero3_bf16.json)')
    if not needs_optimizer and stage != 3 and stage != 0:
        problems.append(
            f"teacher ZeRO stage {stage}: a frozen teacher is sharded with stage 3 or replicated with stage 0"
        )
    problems += optimizer_scheduler_problems(raw)
    if not problems:  # DeepSpeed's classes assume the basics above hold; they stop at the first bad block
        problems = deepspeed_problems(raw, world_size)
    if problems:
        raise UsageError(f"--{flag} {path}: " + "; ".join(problems))
    return DSConfig(path=str(path), raw=raw, world_size=world_size)


def _batch_problems(raw: dict[str, Any], world_size: int) -> list[str]:
    """The batch keys: each present one a positive integer, at least train_batch_size or the micro batch, and
    train_batch_size = micro batch x accumulation x world size (DeepSpeed's ``_batch_assertion``)."""
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    values = {k: raw.get(k) for k in keys}
    bad = [k for k, v in values.items() if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1)]
    if bad:
        return [f"{k} must be a positive integer" for k in bad]
    total, micro, gas = values.values()
    if total is None and micro is None:
        return ["train_micro_batch_size_per_gpu must be a positive integer (or give train_batch_size)"]
    if total is None:
        return []
    if micro is None or gas is None:
        known = (gas or 1) * world_size if micro is None else micro * world_size
        what = (
            f"accumulation {gas or 1} x world size {world_size}"
            if micro is None
            else f"micro batch {micro} x world size {world_size}"
        )
        if total % known:
            return [
                f"train_batch_size {total} is not a multiple of {what} = {known}: DeepSpeed could not split it; "
                "set train_micro_batch_size_per_gpu"
            ]
        return []
    if total != micro * gas * world_size:
        return [
            f"train_batch_size {total} != micro batch {micro} x accumulation {gas} x world size {world_size} "
            f"= {micro * gas * world_size}: set it to that or remove it"
        ]
    return []


def deepspeed_problems(raw: dict[str, Any], world_size: int = 1) -> list[str]:
    """What DeepSpeed's own config parsing (``deepspeed.runtime.config.DeepSpeedConfig``, which builds its pydantic
    models such as DeepSpeedZeroConfig) rejects in ``raw``, each as "full.key.path: what is wrong", with the valid
    neighbouring keys for a misspelt one. Run here, before any model loads, instead of inside the engine's init."""
    import copy

    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    # A copy (DeepSpeed may fill in defaults) without train_batch_size but with the micro batch it implies: the batch
    # keys are checked above against the launch's world size, which DeepSpeed would take from a process group that may
    # not exist yet.
    copied = {k: copy.deepcopy(v) for k, v in raw.items() if k != "train_batch_size"}
    copied["train_micro_batch_size_per_gpu"] = _batch_sizes(raw, world_size)[0]
    try:
        DeepSpeedConfig(copied)
    except pydantic.ValidationError as exc:
        model = _deepspeed_model(exc.title)
        return [_describe(raw, model, err) for err in exc.errors()]
    except (ValueError, AssertionError) as exc:
        return [f"DeepSpeed rejects it: {' '.join(str(exc).split())}"]
    return []


def _nearest(word: str, choices: list[str], otherwise: str, n: int = 1) -> str:
    """``did you mean X?`` (up to ``n`` names close to ``word``, difflib's 0.6 cutoff), else ``otherwise``."""
    near = difflib.get_close_matches(word, choices, n, 0.6)
    return f"did you mean {' or '.join(near)}?" if near else otherwise


def optimizer_scheduler_problems(raw: dict[str, Any]) -> list[str]:
    """The ``optimizer`` and ``scheduler`` blocks as DeepSpeed's engine will build them: a ``type`` it knows
    (``DEEPSPEED_OPTIMIZERS`` or a ``torch.optim`` class, as ``DeepSpeedEngine._is_supported_optimizer``; a name of
    ``deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES``) and ``params`` its class takes. DeepSpeed's config parsing
    does not look inside these blocks, so a misspelt key would stop the engine's init with a TypeError after the models
    have loaded. Adam and AdamW take the keywords of every class DeepSpeed may pick for them (``FusedAdam``,
    ``DeepSpeedCPUAdam``, ``torch.optim.AdamW``) and its own switches; DeepSpeed's other optimizers are not checked."""
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    def keywords(*classes) -> set[str]:
        names = {n for c in classes for n in inspect.signature(c.__init__).parameters}
        return names - {"self", "params", "model_params", "optimizer", "args", "kwargs"}

    def unknown(block: str, params: Any, accepted: set[str]) -> list[str]:
        if not isinstance(params, dict):
            return [f"{block}.params must be a JSON object"]
        out = []
        valid = sorted(accepted)
        for key in sorted(k for k in params if k not in accepted):
            hint = _nearest(key, valid, f"valid keys there: {', '.join(valid)}")
            out.append(f"{block}.params.{key} is not a parameter of {raw[block]['type']}: {hint}")
        return out

    problems = []
    opt = raw.get("optimizer")
    if isinstance(opt, dict) and "type" in opt:
        name = str(opt["type"])
        if name.lower() in ("adam", "adamw"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

            switches = {"torch_adam", "adam_w_mode", "fp32_optimizer_states"}
            problems += unknown(
                "optimizer", opt.get("params", {}), keywords(FusedAdam, DeepSpeedCPUAdam, torch.optim.AdamW) | switches
            )
        elif name.lower() not in DEEPSPEED_OPTIMIZERS:
            cls = getattr(torch.optim, name, None)
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
                problems += unknown("optimizer", opt.get("params", {}), keywords(cls))
            else:
                torch_names = [
                    n
                    for n, c in vars(torch.optim).items()
                    if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
                ]
                otherwise = f"use one of {', '.join(DEEPSPEED_OPTIMIZERS)} or a torch.optim class"
                hint = _nearest(name, [*DEEPSPEED_OPTIMIZERS, *torch_names], otherwise)
                problems.append(
                    f"optimizer.type {name!r} is neither a DeepSpeed optimizer nor a torch.optim class: {hint}"
                )
    sched = raw.get("scheduler")
    if isinstance(sched, dict) and "type" in sched:
        name = str(sched["type"])
        if name in lr_schedules.VALID_LR_SCHEDULES:
            problems += unknown("scheduler", sched.get("params", {}), keywords(getattr(lr_schedules, name)))
        else:
            names = lr_schedules.VALID_LR_SCHEDULES
            hint = _nearest(name, names, f"use one of {', '.join(names)}")
            problems.append(f"scheduler.type {name!r} is not a DeepSpeed scheduler: {hint}")
    return problems


def _deepspeed_model(name: str):
    """The pydantic class of DeepSpeed's config named ``name`` (a ValidationError carries only the name)."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo, seen = [DeepSpeedConfigModel], {}
    while todo:
        cls = todo.pop()
        seen[cls.__name__] = cls
        todo += cls.__subclasses__()
    return seen.get(name)


def _model_keys(model, loc: tuple) -> list[str]:
    """Field names and aliases (DeepSpeed accepts both) of the model found by following ``loc`` from ``model``."""
    import typing

    import pydantic

    for key in loc:
        info = (
            {**{f.alias: f for f in model.model_fields.values() if f.alias}, **model.model_fields}.get(key)
            if model
            else None
        )
        kinds = [info.annotation, *typing.get_args(info.annotation)] if info else []
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, pydantic.BaseModel)), None)
    if model is None:
        return []
    return sorted({*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)})


def _describe(raw: dict[str, Any], model, err: dict[str, Any]) -> str:
    """One pydantic error as ``full.key.path: problem``. DeepSpeed validates each block on its own, so the error's
    location starts inside the block: the block is the dict in ``raw`` where that location leads."""

    loc = tuple(str(x) for x in err["loc"])

    def reaches(prefix: tuple) -> bool:
        node: Any = raw
        for key in prefix + loc[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        return isinstance(node, dict) and (loc[-1] in node or err["type"] == "missing")

    blocks = [(), *((k,) for k, v in raw.items() if isinstance(v, dict))]
    fields = set(_model_keys(model, ()))
    # Several blocks may lead there: the one whose keys the model knows best is the one DeepSpeed validated.
    block = max((b for b in blocks if reaches(b)), key=lambda b: len(fields & set(raw[b[0]] if b else raw)), default=())
    where = ".".join(block + loc)
    if err["type"] == "extra_forbidden":
        valid = _model_keys(model, loc[:-1])
        hint = _nearest(loc[-1], valid, f"valid keys there: {', '.join(valid)}", n=3)
        return f"{where} is not a DeepSpeed key ({model.__name__ if model else 'unknown block'}): {hint}"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def default_ds_configs(has_gpu: bool) -> tuple[str, str, str]:
    """The shipped configs for the device: ZeRO-3 student, sharded (ZeRO-3) teacher, replicated (stage 0) teacher.
    bf16 on GPU, fp32 on CPU (no bf16 units there). Which teacher file runs is chosen by fit
    (models.teacher_placement)."""
    if has_gpu:
        return tuple(
            str(REPO_CONFIGS / f)
            for f in ("zero3_bf16.json", "teacher_zero3_bf16.json", "teacher_replicated_bf16.json")
        )
    return tuple(
        str(REPO_CONFIGS / f) for f in ("cpu_zero3.json", "cpu_teacher_zero3.json", "cpu_teacher_replicated.json")
    )


# DeepSpeed schedulers that decay to their end over ``total_num_steps`` optimizer steps
# (deepspeed/runtime/lr_schedules.py).
DECAYING_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")


def hugging_face_warmup(n: int) -> dict[str, Any]:
    """The JSON ``scheduler`` block of Hugging Face's linear warm-up of ``n`` steps then constant
    (``get_constant_schedule_with_warmup``, TRL's ``constant_with_warmup``), step 1 at lr 0 included: DeepSpeed's
    WarmupCosineLR sets 0 at construction, then trains step k >= 2 at ``warmup_min_ratio + (1 - warmup_min_ratio)
    (k - 2) / warmup_num_steps`` of the optimizer's lr, which with ratio 1/n over n - 1 steps is (k - 1)/n;
    ``cos_min_ratio`` 1 holds the peak afterwards (no decay, so ``total_num_steps`` does not matter). README
    "Learning-rate warm-up"; n >= 3 (DeepSpeed raises ``warmup_num_steps`` below 2 to 2)."""
    params = dict(warmup_min_ratio=1 / n, warmup_num_steps=n - 1, warmup_type="linear", cos_min_ratio=1.0)
    return {"type": "WarmupCosineLR", "params": params | {"total_num_steps": n - 1}}


def _cos_min_ratio(params: dict[str, Any]) -> float:
    """WarmupCosineLR's floor as a ratio of the optimizer's lr: the JSON's, else DeepSpeed's default."""
    if "cos_min_ratio" in params:
        return params["cos_min_ratio"]
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    return inspect.signature(WarmupCosineLR).parameters["cos_min_ratio"].default


def schedule_check(ds: DSConfig, max_steps: int) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the JSON's scheduler against the run's ``max_steps`` optimizer steps.

    Refused: a decaying schedule shorter than the run (past ``total_num_steps`` WarmupDecayLR trains at lr 0 and
    WarmupCosineLR at its floor, so the extra steps would be silently wasted). Warned (legitimate, e.g. a short trial
    run or one to be extended with --resume): a decaying schedule longer than the run (it ends before the lr has
    decayed) and a warm-up longer than the run (the lr never reaches its peak). WarmupCosineLR with
    ``cos_min_ratio`` 1 (Hugging Face's warm-up, README "Learning-rate warm-up") holds its peak after the warm-up:
    it does not decay.
    """
    sched = ds.raw.get("scheduler") or {}
    kind, params = sched.get("type"), sched.get("params") or {}
    where = f"--deepspeed_config {ds.path}: scheduler {kind}"
    problems, warnings = [], []
    total = params.get("total_num_steps")
    flat = kind == "WarmupCosineLR" and _cos_min_ratio(params) >= 1.0
    if kind in DECAYING_SCHEDULERS and isinstance(total, int) and not flat:
        if total < max_steps:
            problems.append(
                f"{where} decays over total_num_steps {total} but --max_steps is {max_steps}: steps {total + 1}-"
                f"{max_steps} would train at the schedule's floor; set total_num_steps to {max_steps} or --max_steps "
                f"{total}"
            )
        elif total > max_steps:
            warnings.append(
                f"{where} decays over total_num_steps {total} but the run stops at --max_steps {max_steps}: the lr "
                "will "
                "not have decayed (set total_num_steps to --max_steps unless you will extend the run with --resume)"
            )
    warmup = params.get("warmup_num_steps")
    if kind in ("WarmupLR", *DECAYING_SCHEDULERS) and isinstance(warmup, int) and warmup > max_steps:
        warnings.append(
            f"{where} warms up over {warmup} steps but the run stops at --max_steps {max_steps}: the lr never reaches "
            "its peak"
        )
    return problems, warnings


def default_one_rank_config(has_gpu: bool) -> str:
    """The shipped student for one rank that holds the student's training state (models.student_placement): the
    same optimizer and schedule as the ZeRO-3 default, without partitioning. CPU: stage 0 (no ZeRO): ZeRO-1 over one
    rank still keeps a flat fp32 copy of the weights and copies every gradient into its buckets (issue 28: +0.6 s of
    optimizer step and +0.3 GiB at the demo's shape). GPU: ZeRO-1 (bf16 at stage 0 runs DeepSpeed's BF16_Optimizer,
    which keeps the same fp32 copies; not measured against ZeRO-1)."""
    return str(REPO_CONFIGS / ("zero1_bf16.json" if has_gpu else "cpu_zero0.json"))
