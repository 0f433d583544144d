"""Two CPU ranks through the real `deepspeed` launcher: ZeRO-3 student and teacher, checkpoints, exact resume, export.

Also the data-parallel invariance: 1 rank x micro-batch 16 gives the same losses and grad_norm as 2 ranks x
micro-batch 8 (accumulation 2 on both); elastic resume: a 2-rank checkpoint resumed on 1 rank, then on 2 again,
equals the straight run step by step; and per-example tracking across ranks and epochs. Each launch costs 15-40 s
of start-up, so one straight run serves several tests and the resumes start from its checkpoints
(docs/performance.md, the suite's time).
"""

import csv
import json
import shutil
from collections import Counter

import pytest

from tests.helpers import ds_json, launch_args
from tests.launch import deepspeed

pytestmark = pytest.mark.multiprocess


def launch(tiny, out, ds_config, *, ranks, steps, extra=(), expect=0):
    """The tiny pair on ``ranks`` CPU ranks for ``steps`` steps through the real deepspeed launcher (tests/launch.py:
    a free port, a time-out, no /dev/shm segment left), then more flags; asserts the exit code ``expect``."""
    args = launch_args(tiny, out, ds_config, max_steps=steps, chunk_size=16) + list(extra)
    proc = deepspeed("ds_distill.train", args, ranks=ranks)
    assert proc.returncode == expect, proc.stdout[-6000:]
    return proc


def csv_curve(out, name="loss"):
    """{step: value} of one Train/ metric from DeepSpeed's csv monitor (a resumed run appends to the same files)."""
    from ds_distill.plot import read_curves

    return dict(read_curves(out)[f"Train/{name}"])


def examples_per_step(out):
    """{step: sorted [(epoch, example id)]} from examples.csv: which examples each global step trained on."""
    from ds_distill.extras.tracking import read_examples

    steps = {}
    for row in read_examples(out / "examples.csv"):
        steps.setdefault(int(row["step"]), []).append((int(row["epoch"]), row["example_id"]))
    return {s: sorted(ids) for s, ids in steps.items()}


def converted(proc):
    return [l for l in (proc.stdout + proc.stderr).splitlines() if "converting it to a universal checkpoint" in l]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """One uninterrupted 2-rank run that several tests read (one launch: docs/performance.md, the suite's time): 4 steps
    of 2 ranks x micro-batch 8 x accumulation 2 = 32 examples per step, so 2 epochs of the 64 tiny examples, every
    example tracked, checkpoints at steps 2 and 4 (the elastic resume starts from step 2's). Returns its output_dir."""
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "run"
    cfg2 = ds_json(tmp, name="two.json", train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    launch(tiny, out, cfg2, ranks=2, steps=4, extra=["--save_steps", "2", "--export", "false", "--track_examples"])
    return out


def copy_checkpoint(src, dst, tag):
    """``dst`` as a run stopped at ``src``'s checkpoint ``tag``: that tag, ``latest`` naming it and the settings
    record."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / "latest").write_text(tag)
    shutil.copy(src / "settings.json", dst / "settings.json")


def test_two_ranks_track_every_example_once_per_epoch(straight):
    with open(straight / "examples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for epoch in (0, 1):
        assert sorted(int(r["example_id"]) for r in rows if int(r["epoch"]) == epoch) == list(range(64))
    assert Counter(int(r["step"]) for r in rows) == {s: 32 for s in range(1, 5)}
    m = json.loads((straight / "manifest.json").read_text())
    assert m["results"]["step"] == 4 and m["checkpoints"][-1]["step"] == 4


def test_two_ranks_checkpoint_resume_export(tiny, straight, tmp_path):
    cfg2 = ds_json(tmp_path, name="two.json", train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    # the same global batch on one rank
    cfg1 = ds_json(tmp_path, name="one.json", train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=2)
    a, norm2 = csv_curve(straight), csv_curve(straight, "grad_norm")
    assert sorted(a) == sorted(norm2) == [1, 2, 3, 4]
    assert abs(a[1] - a[4]) > 1e-3

    # Elastic resume through universal checkpoints (AdamW: ds_to_universal cannot convert SGD momentum): the 2-rank
    # step-2 checkpoint (the straight run's) resumed on 1 rank to step 3, then on 2 ranks to step 4 = the straight
    # run, example by example. (A resume on the same 2 ranks is the SLURM preemption test's requeue,
    # tests/test_preemption.py.) Step 3 is also the 1-rank vs 2-rank parity check: one rank with the same global batch
    # sees the same examples, so the same loss and the same gradient. The loss curve under AdamW is blind to a constant
    # gradient scale (a lost `* world_size` in train_step); grad_norm is not: DeepSpeed records it before clipping
    # (ZeRO-3 step(): _global_grad_norm, then unscale_and_clip_grads), and a 2-rank scale error changes the straight
    # run's step 3 but not the 1-rank step 3.
    assert (straight / "checkpoints" / "latest").read_text() == "step_00000004"
    assert {p.name for p in (straight / "checkpoints" / "step_00000002").glob("*rank*")} >= {
        "rng_rank0.pt",
        "rng_rank1.pt",
    }
    elastic = tmp_path / "elastic"
    copy_checkpoint(straight, elastic, "step_00000002")
    to_one = launch(
        tiny,
        elastic,
        cfg1,
        ranks=1,
        steps=3,
        extra=["--resume", "--save_steps", "1", "--export", "false", "--track_examples"],
    )
    assert len(converted(to_one)) == 1 and "written by 2 ranks and this job has 1" in converted(to_one)[0], (
        to_one.stdout[-2000:]
    )
    to_two = launch(tiny, elastic, cfg2, ranks=2, steps=4, extra=["--resume", "--track_examples"])
    assert len(converted(to_two)) == 1 and "written by 1 ranks and this job has 2" in converted(to_two)[0], (
        to_two.stdout[-2000:]
    )
    e, norm_e = csv_curve(elastic), csv_curve(elastic, "grad_norm")
    assert sorted(e) == [3, 4]  # steps 1 and 2 are the straight run's
    assert [e[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], rel=1e-5, abs=1e-6)
    assert [norm_e[s] for s in (3, 4)] == pytest.approx([norm2[s] for s in (3, 4)], rel=1e-4)
    assert all(n > 0 for n in norm_e.values())
    seen, want = examples_per_step(elastic), examples_per_step(straight)
    assert sorted(want) == [1, 2, 3, 4] and all(len(ids) == 32 for ids in want.values())
    assert seen == {s: want[s] for s in (3, 4)}

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(elastic / "final")
    assert model.config.num_hidden_layers == 1


def test_rank_error_is_one_line_and_nonzero(tiny, tmp_path):
    proc = launch(
        tiny, tmp_path / "bad", ds_json(tmp_path, name="bad.json", train_batch_size=3), ranks=2, steps=1, expect=2
    )
    errors = {l.split("error: ", 1)[1] for l in (proc.stdout + proc.stderr).splitlines() if "error: " in l}
    assert errors == {
        f"--deepspeed_config {tmp_path / 'bad.json'}: train_batch_size 3 != micro batch 2 x accumulation 1 x world "
        "size 2 = 4: set it to that or remove it"
    }, errors


def test_on_policy_generation_with_unequal_lengths_finishes_under_zero3(tiny, tmp_path):
    """2 ranks, per-layer ZeRO-3 generation (every token a collective): rank 0's prompt is short and ends in eos, so
    its greedy sample is eos at once (tiny random models repeat the last token); rank 1's prompt is 5x longer and
    samples 10 or more. Without synced stepping rank 0 would stop while rank 1 waits on a gather: a hang. (That the
    gathered copy samples the same tokens is tested in process, in test_on_policy.py.)"""
    from ds_distill.data import BatchStream, get_dataset
    from ds_distill.plot import read_curves

    words = "the quick brown fox jumps over the lazy dog while a small cat sleeps".split()
    path = tmp_path / "pc.jsonl"
    with open(path, "w") as fh:
        for i in range(16):
            prompt = "the cat</s>" if i % 2 == 0 else " ".join(words[:10])
            fh.write(json.dumps({"id": i, "prompt": prompt, "completion": " a dog"}) + "\n")
    ds = get_dataset(str(path), tiny["tokenizer"], seq_len=32)
    short, long = (
        len(tiny["tokenizer"](p)["input_ids"]) for p in ("the cat</s>", " ".join(words[:10]))
    )  # prompt tokens
    assert ds[0]["input_ids"][short - 1] == tiny["tokenizer"].eos_token_id
    # The data seed whose first micro-batch gives rank 0 a short eos prompt and rank 1 a long one.
    seed = next(
        s
        for s in range(100)
        if [
            BatchStream(ds, batch_size=1, rank=r, world_size=2, seed=s, pad_token_id=0).__next__().example_ids.item()
            % 2
            for r in (0, 1)
        ]
        == [0, 1]
    )
    out = tmp_path / "layered"
    launch(
        {**tiny, "data": str(path)},
        out,
        ds_json(tmp_path, name="micro1.json", train_micro_batch_size_per_gpu=1),
        ranks=2,
        steps=2,
        extra=[
            "--on_policy_fraction",
            "1",
            "--max_new_tokens",
            "12",
            "--top_k",
            "1",
            "--generation_gather",
            "layered",
            "--alpha",
            "0",
            "--loss",
            "jsd",
            "--seed",
            str(seed),
            "--export",
            "false",
        ],
    )
    # Step 1: 1 token on rank 0 (eos), on rank 1 the room its prompt leaves (>= 10 tokens).
    long_room = min(12, 32 - long)
    curves = read_curves(out)
    assert long_room >= 10 and curves["Generate/tokens"][0] == (1, 1 + long_room)
    # The collapse monitors are over both ranks' samples: [eos] on rank 0, long_room tokens without eos on rank 1.
    assert curves["Generate/length"][0] == (1, pytest.approx((1 + long_room) / 2))
    assert curves["Generate/eos_rate"][0] == (1, pytest.approx(0.5))


@pytest.fixture(scope="module")
def ms_teacher(tmp_path_factory):
    """A 2-layer random teacher with a SentencePiece-style tokenizer (the tiny student's is byte-level BPE)."""
    from tests.tiny import make_metaspace_tokenizer, make_model

    root = tmp_path_factory.mktemp("ms_teacher")
    return make_model(root / "teacher", make_metaspace_tokenizer(root / "tok"), layers=2, hidden=32, seed=1)


def test_cross_tokenizer_two_ranks_zero3_resume(tiny, tmp_path, ms_teacher):
    """--cross_tokenizer alm on 2 CPU ranks (ZeRO-3 student and teacher): the loss falls, the alignment report is
    logged, and a run stopped at step 2 (the straight run's step-2 checkpoint) and resumed continues the straight
    run's curve."""
    cfg = ds_json(tmp_path, name="two.json", lr=3e-2, train_micro_batch_size_per_gpu=2)
    extra = ["--cross_tokenizer", "alm", "--export", "false"]
    straight, halves, tiny = tmp_path / "straight", tmp_path / "halves", {**tiny, "teacher": ms_teacher}
    proc = launch(tiny, straight, cfg, ranks=2, steps=4, extra=[*extra, "--save_steps", "2"])
    assert "cross-tokenizer distillation: --cross_tokenizer alm" in proc.stdout + proc.stderr
    assert "align/bytes_1to1=" in proc.stdout + proc.stderr
    a = csv_curve(straight)
    assert sorted(a) == [1, 2, 3, 4] and a[4] < 0.9 * a[1], a
    copy_checkpoint(straight, halves, "step_00000002")
    launch(tiny, halves, cfg, ranks=2, steps=4, extra=[*extra, "--resume"])
    b = csv_curve(halves)
    assert sorted(b) == [3, 4]  # steps 1 and 2 are the straight run's
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], rel=1e-5, abs=1e-6)


def test_hidden_projection_two_ranks_equal_one_rank_and_resume(tiny, tmp_path, dist_env):
    """--hidden_loss with a 48-wide student and the 32-wide teacher: its learned projection, partitioned over 2 ZeRO-3
    ranks (no persistence threshold), trains as on one rank with the same global batch: the same loss, hidden term
    and grad_norm per step, and the same projection saved beside final/ (the reference runs in process). Killed after
    its step-2 checkpoint and resumed on 2 ranks, the run continues the same curve and saves the same projection
    (TWO launches: straight, resumed)."""
    import torch
    from safetensors.torch import load_file

    from ds_distill import train
    from tests.helpers import make_cfg, projection_json
    from tests.tiny import make_model

    wide = {**tiny, "student": str(make_model(tmp_path / "wide", tiny["tokenizer"], layers=1, hidden=48, seed=3))}
    flags = dict(hidden_loss="mse", hidden_weight=2.0, hidden_layers="0:1", seed=0)
    one = tmp_path / "one"
    train.run(
        make_cfg(
            wide,
            one,
            max_steps=4,
            export=True,
            deepspeed_config=projection_json(tmp_path, train_micro_batch_size_per_gpu=4),
            **flags,
        )
    )
    two, halves = tmp_path / "two", tmp_path / "halves"
    cfg2 = projection_json(tmp_path, train_micro_batch_size_per_gpu=2)
    extra = [f"--{k}={v}" for k, v in flags.items()]
    proc = launch(wide, two, cfg2, ranks=2, steps=4, extra=[*extra, "--save_steps", "2"])
    assert "learned projections 48->32" in proc.stdout + proc.stderr
    copy_checkpoint(two, halves, "step_00000002")
    launch(wide, halves, cfg2, ranks=2, steps=4, extra=[*extra, "--resume"])
    for name in ("loss", "hidden", "hidden_s0_t1", "grad_norm"):
        a, b, c = csv_curve(one, name), csv_curve(two, name), csv_curve(halves, name)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4] and sorted(c) == [3, 4], name
        assert [b[s] for s in (1, 2, 3, 4)] == pytest.approx([a[s] for s in (1, 2, 3, 4)], rel=1e-4, abs=1e-6), name
        assert [c[s] for s in (3, 4)] == pytest.approx([b[s] for s in (3, 4)], rel=1e-5, abs=1e-6), name
    w1, w2, w3 = (load_file(d / "final.hidden_projection.safetensors")["s0_t1.weight"] for d in (one, two, halves))
    assert w1.shape == (32, 48)
    torch.testing.assert_close(w2, w1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w3, w2, rtol=1e-5, atol=1e-6)
