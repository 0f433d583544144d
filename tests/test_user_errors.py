"""Mistakes and mishaps of new users, through the real entry points in one process (issue 30): each is one line
(``error: ...``, exit 2, no traceback) before any model loads, or accepted and done as the user meant."""

import errno
import json
import signal
from pathlib import Path

import pytest

from ds_distill.ds_config import REPO_CONFIGS
from tests.helpers import base_args, ds_json, process_group_not_started, run_main


def _replace(args, old, new):
    return [new if x == old else x for x in args]


# ---------------------------------------------------------------------------------------------- a full disk
def test_disk_full_during_a_checkpoint_is_one_line_and_the_rerun_continues(
    tiny, dist_env, tmp_path, capsys, keep_process_group, monkeypatch
):
    """dolly #139: the second checkpoint's write runs out of space. One line naming the tag and the free space; the
    first checkpoint and ``latest`` stay as they were; the rerun with --resume continues from them and finishes."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    real = DeepSpeedEngine.save_checkpoint

    def full_at_step_2(self, save_dir, tag=None, **kw):
        if tag == "step_00000002":
            Path(save_dir, tag).mkdir(parents=True, exist_ok=True)  # a half-written tag
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, save_dir, tag=tag, **kw)

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", full_at_step_2)
    out = tmp_path / "o"
    args = base_args(tiny, out) + ["--deepspeed_config", ds_json(tmp_path), "--max_steps", "2", "--save_steps", "1"]
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    code, errors = run_main(args, capsys)  # also: the progress bar is closed, so error: starts its own line
    tag = out / "checkpoints" / "step_00000002"
    assert code == 2 and len(errors) == 1, errors
    # The run that failed gave back the preemption handlers (Callback.on_exit): a later SIGTERM is not swallowed.
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert f"no space left writing {tag}" in errors[0] and "GiB free there" in errors[0], errors
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001"
    assert (out / "checkpoints" / "step_00000001" / "rng_rank0.pt").is_file()

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", real)  # space freed
    assert run_main(args + ["--resume"], capsys) == (0, [])
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"


def test_disk_full_while_writing_a_teacher_cache_is_one_line(tiny, dist_env, tmp_path, capsys, monkeypatch):
    """The same for a teacher cache: the shard's write fails for space; the rerun writes only what is missing."""
    from ds_distill import cache_teacher
    from ds_distill.teachers import cache_writer

    real, calls = cache_writer.pq.write_table, []

    def full_at_shard_2(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, **kw)

    monkeypatch.setattr(cache_writer.pq, "write_table", full_at_shard_2)
    out = tmp_path / "cache"
    args = ["--teacher", tiny["teacher"], "--data", tiny["data"], "--output_dir", str(out), "--seq_len", "32"]
    args += ["--shard_examples", "24", "--teacher_deepspeed_config", str(REPO_CONFIGS / "cpu_teacher_replicated.json")]
    assert cache_teacher.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"no space left writing {calls[1]}" in errors[0] and "GiB free" in errors[0], errors
    monkeypatch.setattr(cache_writer.pq, "write_table", real)
    assert cache_teacher.main(args) == 0
    assert json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------- --output_dir
def test_output_dir_that_is_a_file_or_read_only_is_refused_before_any_model_loads(
    tiny, tmp_path, capsys, keep_process_group, monkeypatch, no_process_group
):
    """NeMo-Framework-Launcher #74: found otherwise at the first checkpoint, after the training it was to keep."""
    import os
    import tempfile

    from ds_distill import models

    monkeypatch.setattr(models, "student_engine", lambda *a, **k: pytest.fail("a model loaded"))
    a_file = tmp_path / "taken"
    a_file.write_text("someone's notes")
    code, errors = run_main(base_args(tiny, a_file), capsys)
    assert code == 2 and len(errors) == 1 and "is a file, not a folder" in errors[0], errors

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is what root meets

        def read_only(*a, dir=None, **k):
            if str(dir).startswith(str(locked)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real(*a, dir=dir, **k)

        real = tempfile.TemporaryFile
        monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code, errors = run_main(base_args(tiny, locked / "run"), capsys)
    assert code == 2 and len(errors) == 1 and f"cannot write in {locked} (" in errors[0], errors


def test_a_missing_model_folder_names_its_flag(tiny, tmp_path, capsys):
    """With several model paths on the line, the line says which one is missing."""
    for flag in ("--student", "--teacher"):
        args = [tmp_path / "nosuch" if a == tiny[flag[2:]] else a for a in base_args(tiny, tmp_path / "o")]
        code, errors = run_main([str(a) for a in args], capsys)
        assert code == 2 and len(errors) == 1 and f"{flag}: model directory" in errors[0], errors
    config = str(Path(tiny["student"]) / "config.json")  # a file of the folder, not the folder
    args = [config if a == tiny["student"] else str(a) for a in base_args(tiny, tmp_path / "o")]
    code, errors = run_main(args, capsys)
    assert code == 2 and len(errors) == 1 and "is a file: pass the model's folder" in errors[0], errors


# --------------------------------------------------------------------------------------------- DeepSpeed JSONs
@pytest.fixture
def no_process_group():
    """Refused before the process group starts (``distributed.planned_world``): the one line is not preceded by
    DeepSpeed's start-up lines (the comm op's build, the group's)."""
    with process_group_not_started():
        yield


def test_fp16_json_on_cpu_is_one_line(tiny, tmp_path, capsys, keep_process_group, no_process_group):
    """DeepSpeed #1270, through the entry point: the student's and the teacher's JSON alike."""
    fp16 = ds_json(tmp_path, fp16={"enabled": True})
    code, errors = run_main(base_args(tiny, tmp_path / "o") + ["--deepspeed_config", fp16], capsys)
    assert code == 2 and len(errors) == 1 and "CPU runs need fp32 or bf16" in errors[0], errors
    teacher = tmp_path / "t16.json"
    teacher.write_text(
        json.dumps({**json.loads((REPO_CONFIGS / "cpu_teacher_zero3.json").read_text()), "fp16": {"enabled": True}})
    )
    code, errors = run_main(base_args(tiny, tmp_path / "o") + ["--teacher_deepspeed_config", str(teacher)], capsys)
    assert code == 2 and len(errors) == 1 and "CPU runs need fp32 or bf16" in errors[0], errors


@pytest.mark.parametrize(
    "block, change, words",
    [
        (
            "optimizer",
            {"params": {"lr": 1e-3, "lrr": 1e-3}},
            "optimizer.params.lrr is not a parameter of AdamW: did you mean lr?",
        ),
        (
            "optimizer",
            {"type": "AdamWW"},
            "optimizer.type 'AdamWW' is neither a DeepSpeed optimizer nor a torch.optim class: did you mean AdamW?",
        ),
        (
            "optimizer",
            {"type": "SGD", "params": {"lr": 0.1, "momentun": 0.9}},
            "optimizer.params.momentun is not a parameter of SGD: did you mean momentum?",
        ),
        (
            "scheduler",
            {"type": "WarmupLR", "params": {"warmup_max_lrr": 1e-3}},
            "scheduler.params.warmup_max_lrr is not a parameter of WarmupLR: did you mean warmup_max_lr?",
        ),
        (
            "scheduler",
            {"type": "WarmupCosine", "params": {}},
            "scheduler.type 'WarmupCosine' is not a DeepSpeed scheduler: did you mean WarmupCosineLR?",
        ),
    ],
)
def test_a_misspelt_optimizer_or_scheduler_key_is_one_line_before_any_model_loads(
    tiny, tmp_path, capsys, keep_process_group, no_process_group, block, change, words
):
    """DeepSpeed's config parsing does not look inside these blocks: the engine's init raised a TypeError (or an
    AssertionError for the type) after the models had loaded, and the output dir was half made."""
    d = json.loads((REPO_CONFIGS / "cpu_zero0.json").read_text())
    d[block] = {**d.get(block, {}), **change}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    out = tmp_path / "o"
    code, errors = run_main(base_args(tiny, out) + ["--deepspeed_config", str(bad)], capsys)
    assert code == 2 and len(errors) == 1 and words in errors[0], errors
    assert not out.exists() or not any(out.iterdir()), "nothing written for a refused run"


def test_the_block_check_refuses_no_valid_json():
    """Every shipped JSON, and keywords DeepSpeed passes through (a scheduler's last_batch_iteration, a torch.optim
    class's own), pass ``optimizer_scheduler_problems``."""
    from ds_distill.ds_config import optimizer_scheduler_problems

    for path in sorted(REPO_CONFIGS.glob("*.json")):
        assert optimizer_scheduler_problems(json.loads(path.read_text())) == [], path.name
    valid = {
        "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "last_batch_iteration": -1}},
    }
    assert optimizer_scheduler_problems(valid) == []


def test_train_batch_size_with_accumulation_trains_as_deepspeed_resolves_it(
    tiny, dist_env, tmp_path, capsys, keep_process_group
):
    """train_batch_size 4 + accumulation 2 on one rank: micro batch 2 (DeepSpeed's own resolution), and the run
    equals the one that writes micro batch 2 x accumulation 2."""
    from ds_distill import train
    from tests.helpers import losses_of, make_cfg

    d = json.loads(open(ds_json(tmp_path)).read())
    d.pop("train_micro_batch_size_per_gpu")
    d.update(train_batch_size=4, gradient_accumulation_steps=2)
    implied = tmp_path / "implied.json"
    implied.write_text(json.dumps(d))
    a = train.run(make_cfg(tiny, tmp_path / "a", deepspeed_config=str(implied)))
    b = train.run(
        make_cfg(
            tiny,
            tmp_path / "b",
            deepspeed_config=ds_json(tmp_path, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2),
        )
    )
    assert a.ds.micro_batch == 2 and a.ds.grad_accum == 2 and a.student.train_micro_batch_size_per_gpu() == 2
    assert losses_of(a) == pytest.approx(losses_of(b), rel=1e-6, abs=1e-7) and abs(losses_of(a)[0] - losses_of(a)[-1])


def test_scheduler_shorter_than_the_run_is_one_line(
    tiny, tmp_path, capsys, keep_process_group, caplog, no_process_group
):
    """WarmupDecayLR over 2 steps in a 3-step run: refused; over 10 steps: warned once and trained."""
    short = ds_json(
        tmp_path,
        lr=None,
        scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 2, "warmup_num_steps": 1}},
    )
    code, errors = run_main(base_args(tiny, tmp_path / "o") + ["--deepspeed_config", short, "--max_steps", "3"], capsys)
    assert code == 2 and len(errors) == 1 and "decays over total_num_steps 2 but --max_steps is 3" in errors[0], errors
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- ranks sharing stderr
_WRITER = """
import sys, time
from ds_distill.common import print_error
rank, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
while time.time() < start + 0.4:
    print_error(f"rank {rank}: " + "x" * 300 + ": set it to that or remove it")
"""


def test_error_lines_of_ranks_sharing_one_stderr_never_splice(tmp_path):
    """CI, stop 33: two ranks refused the same JSON into the launcher's one stderr, Python unbuffered (``-u``, as
    the deepspeed launcher runs it), and ``print``'s text and newline, written separately, came out spliced
    (``...remove iterror: ...``). Two writers print_error into one shared stderr for the same 0.4 s: their lines
    interleave (the check that they overlapped) and every line arrives whole."""
    import re
    import subprocess
    import sys
    import time

    start = f"{time.time() + 2:.3f}"  # both started before the first line
    with open(tmp_path / "stderr", "ab") as shared:
        procs = [subprocess.Popen([sys.executable, "-u", "-c", _WRITER, str(r), start], stderr=shared) for r in (0, 1)]
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    lines = (tmp_path / "stderr").read_text().splitlines()
    ranks = [l[len("error: rank ")] for l in lines]
    assert sum(a != b for a, b in zip(ranks, ranks[1:])) >= 10, "the writers did not overlap: the check proves nothing"
    whole = re.compile(r"error: rank [01]: x{300}: set it to that or remove it")
    spliced = [l for l in lines if not whole.fullmatch(l)]
    assert not spliced, f"{len(spliced)} of {len(lines)} lines spliced, e.g. {spliced[0][:80]}...{spliced[0][-80:]}"


def test_export_names_a_missing_checkpoint_path_apart_from_a_folder_that_is_not_one(tmp_path, capsys):
    """A typo in the path says the path does not exist; an existing folder without a checkpoint says what it lacks."""
    from ds_distill.export import main as export_main

    (tmp_path / "empty").mkdir()
    for name, says in (("nowhere", "does not exist"), ("empty", "is not a ds-distill checkpoint (no hf/config.json)")):
        assert export_main([str(tmp_path / name), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "out").exists()
