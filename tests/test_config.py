"""The run config and the DeepSpeed JSON checks: every shipped config is valid, every bad input is named."""

import json

import pytest
import torch

from ds_distill.common import UsageError
from ds_distill.config import RunConfig, parse_args
from ds_distill.ds_config import REPO_CONFIGS, load_ds_config

SHIPPED = sorted(REPO_CONFIGS.glob("*.json"))


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    for name in (
        "zero3_bf16.json",
        "zero2_bf16.json",
        "zero1_bf16.json",
        "zero3_offload_bf16.json",
        "teacher_zero3_bf16.json",
        "cpu_zero3.json",
        "cpu_zero2.json",
        "cpu_zero1.json",
        "cpu_zero0.json",
        "cpu_teacher_zero3.json",
    ):
        assert name in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_passes_the_checks(path):
    is_teacher = path.name.startswith(("teacher", "cpu_teacher"))
    ds = load_ds_config(str(path), world_size=2, flag="deepspeed_config", needs_optimizer=not is_teacher)
    assert ds.micro_batch >= 1
    assert ds.bf16 == (not path.name.startswith("cpu_")), "GPU configs are bf16, CPU twins fp32"
    if not is_teacher:
        assert ds.raw["optimizer"]["params"].get("torch_adam", False) == path.name.startswith("cpu_")


def write(tmp_path, obj, name="ds.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


GOOD = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "zero_optimization": {"stage": 3},
}


def assert_refused_in_one_line(tmp_path, mutate, message):
    """GOOD changed by ``mutate`` is refused by load_ds_config with one line that holds ``message``."""
    d = json.loads(json.dumps(GOOD))
    mutate(d)
    with pytest.raises(UsageError) as err:
        load_ds_config(write(tmp_path, d), world_size=2, flag="deepspeed_config", needs_optimizer=True)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d.update(train_batch_size=7),
            "train_batch_size 7 != micro batch 2 x accumulation 2 x world size 2 = 8",
        ),
        (
            lambda d: d.update(gradient_cliping=1.0),
            "unknown top-level keys ['gradient_cliping'] (DeepSpeed would silently ignore them): did you mean "
            "gradient_cliping -> gradient_clipping?",
        ),
        (
            lambda d: d.update(zzzz_qqq=1),
            "unknown top-level keys ['zzzz_qqq'] (DeepSpeed would silently ignore them): "
            "fix the spelling or remove them",
        ),
        (lambda d: d["optimizer"]["params"].update(lr="auto"), "\"auto\" values at ['optimizer.params.lr']"),
        (lambda d: d.pop("optimizer"), 'no "optimizer" block'),
        (lambda d: d["zero_optimization"].update(stage=4), "zero_optimization.stage 4"),
        (
            lambda d: d.update(train_micro_batch_size_per_gpu=0),
            "train_micro_batch_size_per_gpu must be a positive integer",
        ),
    ],
)
def test_bad_ds_config_is_named(tmp_path, mutate, message):
    assert_refused_in_one_line(tmp_path, mutate, message)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d["zero_optimization"].update(stage3_prefetch_bucket_sz=1000),
            "zero_optimization.stage3_prefetch_bucket_sz is not a DeepSpeed key (DeepSpeedZeroConfig): did you mean "
            "stage3_prefetch_bucket_size",
        ),
        (
            lambda d: d["zero_optimization"].update(offload_optimizer={"device": "cpu", "pin_mem": True}),
            "zero_optimization.offload_optimizer.pin_mem is not a DeepSpeed key (DeepSpeedZeroConfig): did you mean "
            "pin_memory?",
        ),
        (
            lambda d: d.update(csv_monitor={"enabled": True, "outpt_path": "m"}),
            "csv_monitor.outpt_path is not a DeepSpeed key (DeepSpeedMonitorConfig): did you mean output_path?",
        ),
        (
            lambda d: d.update(bf16={"enabled": True, "zzz": 1}),
            "bf16.zzz is not a DeepSpeed key (DeepSpeedBF16Config): valid keys there: bf16_master_weights_and_grads,",
        ),
        (
            lambda d: d["zero_optimization"].update(overlap_comm="sometimes"),
            "zero_optimization.overlap_comm: Input should be a valid boolean",
        ),
    ],
)
def test_deepspeed_checks_name_the_full_key(tmp_path, mutate, message):
    """DeepSpeed's own config classes check the blocks, before any model loads; the error names the key path."""
    assert_refused_in_one_line(tmp_path, mutate, message)


def test_good_ds_config_is_not_rewritten(tmp_path):
    ds = load_ds_config(
        write(tmp_path, dict(GOOD, train_batch_size=8)), world_size=2, flag="deepspeed_config", needs_optimizer=True
    )
    assert ds.raw == dict(GOOD, train_batch_size=8) and ds.grad_accum == 2 and ds.zero_stage == 3


def test_a_shipped_recipe_is_a_run_file(tmp_path):
    """--recipe NAME reads ds_distill/recipes/NAME.yaml as --config would; flags override it; one run file only."""
    from ds_distill.config import RECIPES, load_run_file, recipes

    assert "draft" in recipes()
    cfg = parse_args(["--recipe", "draft", "--alpha", "0.3"])
    for key, value in load_run_file(str(RECIPES / "draft.yaml")).items():
        assert getattr(cfg, key) == (0.3 if key == "alpha" else value), key
    with pytest.raises(UsageError, match="pass one run file, not both"):
        parse_args(["--recipe", "draft", "--config", write(tmp_path, {"alpha": 0.5}, "run.json")])


def test_malformed_and_missing_ds_config(tmp_path):
    with pytest.raises(UsageError, match=r"not valid JSON \(line 1, column 2"):
        load_ds_config(write(tmp_path, "{oops"), world_size=1, flag="deepspeed_config", needs_optimizer=True)
    with pytest.raises(UsageError, match="does not exist: pick a file from ds_configs/"):
        load_ds_config(str(tmp_path / "nope.json"), world_size=1, flag="deepspeed_config", needs_optimizer=True)


def test_teacher_stage_must_be_0_or_3(tmp_path):
    with pytest.raises(UsageError, match="teacher ZeRO stage 2"):
        load_ds_config(
            write(tmp_path, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}),
            world_size=1,
            flag="teacher_deepspeed_config",
            needs_optimizer=False,
        )


def test_cli_overrides_run_file_and_lists(tmp_path):
    run = write(tmp_path, "teacher: [a, b]\nalpha: 0.3\nseq_len: 64\n", "run.yaml")
    cfg = parse_args(["--config", run, "--alpha", "0.7", "--packing"])
    assert cfg.teacher == ["a", "b"] and cfg.alpha == 0.7 and cfg.seq_len == 64 and cfg.packing is True
    cfg = parse_args(["--config", run, "--teacher", "c", "--packing", "false"])
    assert cfg.teacher == ["c"] and cfg.packing is False
    assert parse_args(
        ["--teacher", "x", "--teacher", "y", "--teacher_weights", "1", "--teacher_weights", "3"]
    ).teacher_weights == [1.0, 3.0]


def test_run_file_unknown_key(tmp_path):
    with pytest.raises(UsageError, match=r"unknown keys \['alpah'\]"):
        parse_args(["--config", write(tmp_path, {"alpah": 0.5}, "run.json")])


def test_validation_reports_every_problem_at_once(tmp_path):
    cfg = RunConfig(
        teacher=[str(tmp_path / "missing")],
        student="",
        data="d",
        output_dir="o",
        alpha=1.5,
        temperature=0,
        loss="kl",
        seq_len=0,
        teacher_weights=[1.0, 2.0],
    )
    with pytest.raises(UsageError) as err:
        cfg.validate()
    text = str(err.value)
    for part in (
        "--student is required",
        "does not exist",
        "--loss 'kl' is unknown",
        "--alpha 1.5 must be in [0, 1]",
        "--temperature 0 must be > 0",
        "--seq_len 0 must be >= 1",
        "--teacher_weights has 2 values for 1 teachers",
    ):
        assert part in text, part
    assert "\n" not in text


def test_run_file_that_does_not_parse(tmp_path):
    with pytest.raises(UsageError, match=r"--config .*run.yaml' could not be parsed"):
        parse_args(["--config", write(tmp_path, "alpha: [0.5\n", "run.yaml")])
    with pytest.raises(UsageError, match="must hold a mapping"):
        parse_args(["--config", write(tmp_path, "[1, 2]", "run.json")])


def test_names_users_see_come_from_their_registries():
    """--loss, --router and --data_format list their registries' names in --help and accept exactly those names."""
    from ds_distill.config import field_docs
    from ds_distill.data import FORMATS
    from ds_distill.losses import LOSSES
    from ds_distill.losses.routing import ROUTERS

    docs = field_docs(RunConfig)
    for name, registry in (("loss", LOSSES), ("router", ROUTERS), ("data_format", ("auto", *FORMATS))):
        assert all(entry in docs[name] for entry in registry), (name, docs[name])
        for entry in registry:
            problems = _problems(**{name: entry})
            assert f"--{name}" not in problems, problems
        assert f"--{name} 'nope'" in _problems(**{name: "nope"})


def _problems(**kw) -> str:
    try:
        RunConfig(**kw).validate()
    except UsageError as exc:
        return str(exc)
    return ""


def test_launcher_local_rank_is_accepted_and_ignored():
    """The deepspeed launcher passes --local_rank=N (torch's launchers --local-rank N); the rank comes from the
    environment (runtime.distributed), so it is no RunConfig field and never reaches run_config.json."""
    cfg = parse_args(["--local_rank=1", "--seq_len", "8"])
    assert cfg.seq_len == 8 and "local_rank" not in cfg.to_dict()
    assert parse_args(["--local-rank", "3"]) == RunConfig()


def test_log_steps_are_every_log_steps_and_the_last():
    cfg = RunConfig(log_steps=3, max_steps=10)
    assert [s for s in range(1, 11) if cfg.is_log_step(s)] == [3, 6, 9, 10]


# ------------------------------------------------------------------ DeepSpeed JSONs as users write them (issue 30)
def test_fp16_on_cpu_is_one_line(tmp_path):
    """DeepSpeed #1270: an fp16 JSON on a machine without a GPU stops in one line, before any model loads."""
    path = write(tmp_path, dict(GOOD, fp16={"enabled": True}))
    with pytest.raises(UsageError) as err:
        load_ds_config(path, world_size=1, flag="deepspeed_config", needs_optimizer=True, has_gpu=False)
    assert "CPU runs need fp32 or bf16" in str(err.value) and "\n" not in str(err.value)
    assert load_ds_config(path, world_size=1, flag="deepspeed_config", needs_optimizer=True, has_gpu=True).raw["fp16"]


@pytest.mark.parametrize(
    "keys, world, micro, accum",
    [
        ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 2, 4, 2),  # micro = 16 / (2 x 2)
        ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 2, 2, 4),  # accumulation = 16 / (2 x 2)
        ({"train_batch_size": 8}, 2, 4, 1),  # alone: accumulation 1
        ({"train_micro_batch_size_per_gpu": 3}, 4, 3, 1),
    ],
)
def test_batch_sizes_resolve_as_deepspeed_resolves_them(tmp_path, keys, world, micro, accum):
    """Any two of the three batch keys (or train_batch_size alone) are accepted and give DeepSpeed's micro batch and
    accumulation (DeepSpeedConfig with that world size is the reference); the JSON is handed on unchanged."""
    from unittest import mock

    from deepspeed.runtime.config import DeepSpeedConfig

    d = {k: v for k, v in GOOD.items() if k not in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}
    d.update(keys)
    ds = load_ds_config(write(tmp_path, d), world_size=world, flag="deepspeed_config", needs_optimizer=True)
    assert (ds.micro_batch, ds.grad_accum) == (micro, accum) and ds.raw == d
    with (
        mock.patch("deepspeed.runtime.config.dist.get_rank", return_value=0),
        mock.patch("deepspeed.runtime.config.dist.get_world_size", return_value=world),
    ):
        ref = DeepSpeedConfig(json.loads(json.dumps(d)))
    assert (ref.train_micro_batch_size_per_gpu, ref.gradient_accumulation_steps) == (micro, accum)


def test_batch_sizes_that_do_not_divide_are_one_line(tmp_path):
    d = {"train_batch_size": 10, "gradient_accumulation_steps": 3, "optimizer": GOOD["optimizer"]}
    with pytest.raises(UsageError, match="train_batch_size 10 is not a multiple of accumulation 3 x world size 2 = 6"):
        load_ds_config(write(tmp_path, d), world_size=2, flag="deepspeed_config", needs_optimizer=True)
    with pytest.raises(UsageError, match="train_micro_batch_size_per_gpu must be a positive integer"):
        load_ds_config(
            write(tmp_path, {"gradient_accumulation_steps": 2, "optimizer": GOOD["optimizer"]}),
            world_size=1,
            flag="deepspeed_config",
            needs_optimizer=True,
        )


def test_activation_checkpointing_block_is_refused(tmp_path):
    """DeepSpeed's block configures deepspeed.checkpointing, which Hugging Face models never call: it would change
    nothing (DeepSpeed #5704), so it is refused with the flag that does checkpoint the student."""
    assert_refused_in_one_line(
        tmp_path,
        lambda d: d.update(activation_checkpointing={"partition_activations": True, "cpu_checkpointing": True}),
        "pass --gradient_checkpointing",
    )


@pytest.mark.parametrize(
    "scheduler, max_steps, problem, warning",
    [
        ({"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2}}, 20, "steps 11-20", None),
        ({"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2}}, 11, "steps 11-11", None),
        (
            {"type": "WarmupDecayLR", "params": {"total_num_steps": 30, "warmup_num_steps": 2}},
            20,
            None,
            "not have decayed",
        ),
        ({"type": "WarmupLR", "params": {"warmup_num_steps": 50}}, 20, None, "never reaches its peak"),
        ({"type": "WarmupDecayLR", "params": {"total_num_steps": 20, "warmup_num_steps": 2}}, 20, None, None),
        ({"type": "WarmupLR", "params": {"warmup_num_steps": 20}}, 20, None, None),
        (  # Hugging Face's warm-up as a JSON: constant after it, whatever total_num_steps says
            {"type": "WarmupCosineLR", "params": {"total_num_steps": 4, "warmup_num_steps": 4, "cos_min_ratio": 1.0}},
            20,
            None,
            None,
        ),
        ({"type": "WarmupCosineLR", "params": {"total_num_steps": 4, "warmup_num_steps": 4}}, 20, "steps 5-20", None),
    ],
)
def test_scheduler_length_against_max_steps(tmp_path, scheduler, max_steps, problem, warning):
    """A decaying schedule shorter than the run is refused (its last steps would train at the floor); longer than
    the run, or a warm-up longer than the run, is legitimate and warned."""
    from ds_distill.ds_config import schedule_check

    ds = load_ds_config(
        write(tmp_path, dict(GOOD, scheduler=scheduler)), world_size=2, flag="deepspeed_config", needs_optimizer=True
    )
    problems, warnings = schedule_check(ds, max_steps)
    assert len(problems) == (problem is not None) and all(problem in p and "\n" not in p for p in problems), problems
    assert len(warnings) == (warning is not None) and all(warning in w for w in warnings), warnings


SCHEDULED = [p for p in SHIPPED if "scheduler" in json.loads(p.read_text())]


def rates_per_step(raw: dict, steps: int) -> tuple[list[float], list[float]]:
    """(the rate each of ``steps`` steps of a DeepSpeed engine built from ``raw`` trains at, read off the torch
    optimizer inside it when its step runs; transformers' ``get_constant_schedule_with_warmup`` of N steps at the
    same steps, N = ``warmup_num_steps`` + 1, peak = the optimizer's lr). ZeRO and precision blocks are dropped and
    torch's AdamW runs: the schedule does not depend on them, and bf16 needs no GPU this way (``raw`` is changed)."""
    import deepspeed
    from transformers import get_constant_schedule_with_warmup

    for key in ("zero_optimization", "bf16", "fp16", "csv_monitor"):
        raw.pop(key, None)
    raw["optimizer"]["params"]["torch_adam"] = True  # not DeepSpeed's fused Adam: no op build; the rate is the same
    model = torch.nn.Linear(2, 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=raw)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    used = []
    real_step = inner.step
    inner.step = lambda *a, **k: (used.append(float(inner.param_groups[0]["lr"])), real_step(*a, **k))[1]
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=raw["optimizer"]["params"]["lr"])
    ref = get_constant_schedule_with_warmup(ref_opt, raw["scheduler"]["params"]["warmup_num_steps"] + 1)
    hf = []
    for _ in range(steps):
        engine.backward(engine(torch.ones(1, 2)).sum())
        engine.step()
        hf.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    return used, hf


@pytest.mark.parametrize("path", SCHEDULED, ids=lambda p: p.name)
def test_shipped_warmup_is_hugging_faces_from_step_2_and_never_zero(path, dist_env):
    """The rate every step of a DeepSpeed engine built from the shipped JSON trains at against transformers'
    ``get_constant_schedule_with_warmup`` of N steps, N chosen so the peaks coincide: from step 2 on the rates are
    Hugging Face's, and step 1 trains at step 2's rate where Hugging Face trains at 0 (DeepSpeed's WarmupLR gives
    steps 1 and 2 the same rate: ``warmup_min_lr``)."""
    raw = json.loads(path.read_text())
    params = raw["scheduler"]["params"]
    peak, n_hf = params["warmup_max_lr"], params["warmup_num_steps"] + 1
    used, hf = rates_per_step(raw, n_hf + 3)
    assert len(used) == n_hf + 3
    assert min(used) > 0, f"{path.name}: a step trains at lr 0: {used}"
    assert used[1:] == pytest.approx(hf[1:], rel=1e-9), f"{path.name}: DeepSpeed {used} against Hugging Face {hf}"
    assert used.index(max(used)) == hf.index(max(hf)) == n_hf and max(used) == pytest.approx(peak)


@pytest.mark.parametrize(
    "path", [REPO_CONFIGS / "cpu_demo.json", REPO_CONFIGS / "zero3_bf16.json"], ids=lambda p: p.name
)
def test_hugging_faces_warmup_with_step_1_at_zero_is_a_json_away(path, dist_env):
    """The README's form of Hugging Face's warm-up (``ds_config.hugging_face_warmup``: WarmupCosineLR, ratio 1/N over
    N - 1 steps, ``cos_min_ratio`` 1), step 1 at lr 0 included: every step of a DeepSpeed engine built from it trains
    at the rate of transformers' ``get_constant_schedule_with_warmup`` of N steps. Trained with it, ds-distill's
    student is TRL's to 1.6e-6 in every loss of 30 steps (docs/performance.md, session 11)."""
    from ds_distill.ds_config import hugging_face_warmup

    raw = json.loads(path.read_text())
    n_hf = raw["scheduler"]["params"]["warmup_num_steps"] + 1
    raw["scheduler"] = hugging_face_warmup(n_hf)
    assert raw["scheduler"]["params"]["warmup_num_steps"] + 1 == n_hf
    peak = raw["optimizer"]["params"]["lr"]
    used, hf = rates_per_step(raw, n_hf + 3)
    assert len(used) == n_hf + 3 and used[0] == hf[0] == 0.0
    assert used == pytest.approx(hf, rel=1e-9, abs=1e-15), f"{path.name}: DeepSpeed {used} against Hugging Face {hf}"
    assert used.index(max(used)) == hf.index(max(hf)) == n_hf and max(used) == pytest.approx(peak)


CPU_STUDENTS = [p for p in SHIPPED if p.name.startswith("cpu_") and "optimizer" in json.loads(p.read_text())]


@pytest.mark.parametrize("path", CPU_STUDENTS, ids=lambda p: p.name)
def test_shipped_cpu_students_step_with_torchs_fused_adamw(path, dist_env):
    """Every shipped CPU student JSON, on a DeepSpeed engine as written, steps with torch's AdamW with ``fused``
    (issue 28: the for-each-tensor AdamW DeepSpeed builds otherwise took 1.8 s of a step's CPU time at the demo's
    52M-parameter student under ZeRO-1, fused 0.75 s; Hugging Face's Trainer defaults to the fused one). A JSON
    choice: DeepSpeed builds the optimizer from its ``params``."""
    import deepspeed

    raw = json.loads(path.read_text())
    raw.pop("csv_monitor", None)
    model = torch.nn.Linear(2, 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=raw)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    assert type(inner) is torch.optim.AdamW and inner.defaults["fused"] is True, f"{path.name}: {inner!r}"
    engine.backward(engine(torch.ones(raw["train_micro_batch_size_per_gpu"], 2)).sum())
    engine.step()  # the fused kernel runs on CPU tensors
