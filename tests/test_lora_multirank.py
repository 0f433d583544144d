"""A LoRA student on 2 CPU ranks through the real deepspeed launcher (ZeRO-3, fp32 base: CPU runs no bf16).

- Gradients: with and without activation checkpointing (reentrant and not), fp32 adapters, and DoRA, the adapters'
  gradients of 3 steps equal a one-rank ZeRO-0 run's on the same global batch.
- Kill and resume: a rank SIGKILLed after a checkpoint; the resumed run continues the same loss curve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_distill import train
from ds_distill.core.checkpoint import read_latest
from tests.helpers import ds_json, launch_args, losses_of, make_cfg, train_losses
from tests.launch import deepspeed, kill_rank_after_first_checkpoint
from tests.lora_grads import collect

pytestmark = pytest.mark.multiprocess
LORA = {"lora_r": 4, "lora_alpha": 8.0}
STEPS = 12  # long enough to kill a 2-rank run after its first checkpoint
JOB_TIMEOUT = 300


def fields(tiny, out, ds_config, **kw):
    """The RunConfig of every case: 3 steps at a visible learning rate, 2 ranks x micro-batch 2 = 1 x 4."""
    return {
        **make_cfg(tiny, out, deepspeed_config=ds_config, lora_r=4, lora_alpha=8.0, max_steps=3).to_dict(),
        **kw,
    }


def test_gradients_under_zero3_on_two_ranks_equal_zero0(tiny, dist_env, tmp_path):
    zero3 = ds_json(tmp_path, name="z3.json", lr=5e-2)
    zero0 = json.loads(Path(ds_json(tmp_path, name="z0.json", lr=5e-2, train_micro_batch_size_per_gpu=4)).read_text())
    zero0["zero_optimization"] = {"stage": 0}
    (tmp_path / "z0.json").write_text(json.dumps(zero0))
    cases = {
        "plain": {},
        "reentrant": {"checkpointing": "reentrant"},
        "non_reentrant": {"checkpointing": "non_reentrant"},
        "fp32_adapters": {"lora_fp32": True},
        "dora": {"lora_dora": True},
    }
    launched = {n: fields(tiny, tmp_path / n, zero3, **c) for n, c in cases.items()}
    (tmp_path / "cases.json").write_text(json.dumps(launched))
    proc = deepspeed("tests.lora_grads", [str(tmp_path / "grads.pt"), str(tmp_path / "cases.json")], timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    got = torch.load(tmp_path / "grads.pt")
    for dora in (False, True):
        want = collect(fields(tiny, tmp_path / f"ref{dora}", str(tmp_path / "z0.json"), lora_dora=dora))
        assert any(g.abs().max() > 0 for g in want[-1].values())
        for name in [n for n in cases if (n == "dora") == dora]:
            assert len(got[name]) == 3 and sorted(got[name][0]) == sorted(want[0]), name
            for step, (mine, ref) in enumerate(zip(got[name], want)):
                for p in ref:
                    torch.testing.assert_close(mine[p], ref[p], rtol=1e-4, atol=1e-6, msg=f"{name} step {step} {p}")


def test_sigkill_and_resume_continue_the_same_curve(tiny, dist_env, tmp_path):
    """A LoRA run whose rank 1 is SIGKILLed after a checkpoint, resumed: the loss curve of a run never stopped (the
    same run in process on one rank with the same global batch, 1 x 4 = 2 x 2)."""
    ref = losses_of(
        train.run(
            make_cfg(
                tiny,
                tmp_path / "reference",
                deepspeed_config=ds_json(tmp_path, name="one.json", train_micro_batch_size_per_gpu=4),
                max_steps=STEPS,
                keep_last=0,
                seed=42,
                **LORA,
            )
        )
    )
    out = tmp_path / "run"
    args = launch_args(
        tiny,
        out,
        ds_json(tmp_path, name="two.json"),
        max_steps=STEPS,
        save_steps=2,
        chunk_size=16,
        export="false",
        keep_last=0,
        **LORA,
    )
    output = kill_rank_after_first_checkpoint(args, out / "checkpoints", timeout=JOB_TIMEOUT)
    tag = read_latest(out / "checkpoints")
    assert STEPS > int(tag[5:]) >= 2, f"{tag}\n{output[-6000:]}"
    files = {p.name for p in (out / "checkpoints" / tag).iterdir()}
    assert {"rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files, files
    proc = deepspeed("ds_distill.train", args + ["--resume"], timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert f"resumed from {out / 'checkpoints' / tag}" in proc.stdout, proc.stdout[-6000:]
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert abs(ref[0] - ref[-1]) > 1e-3
