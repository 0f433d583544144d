"""A LoRA student on 2 CPU ranks through the real deepspeed launcher (ZeRO-3, fp32 base: CPU runs no bf16).

- Gradients: with and without activation checkpointing (reentrant and not), fp32 adapters, and DoRA, the adapters'
  gradients of 3 steps equal a one-rank ZeRO-0 run's on the same global batch.
- Kill and resume: a rank SIGKILLed after a checkpoint; the resumed run continues the same loss curve.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from ds_distill.core.checkpoint import read_latest
from tests.cluster_fixtures import ROOT, launcher_env, run_logged
from tests.lora_grads import collect
from tests.test_preemption import JOB_TIMEOUT, STEPS, assert_complete, deepspeed_cmd, poll, run_args, train_losses
from tests.test_train import ds_json, losses_of, make_cfg

pytestmark = pytest.mark.multiprocess
LORA = ["--lora_r", "4", "--lora_alpha", "8"]


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
    port = random.randint(20000, 40000)
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "--module",
        "tests.lora_grads",
        str(tmp_path / "grads.pt"),
        str(tmp_path / "cases.json"),
    ]
    proc = run_logged(cmd, env=launcher_env(PYTHONPATH=str(ROOT)), timeout=600)
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
    """The reference: the same run in process on one rank with the same global batch (1 x 4 = 2 x 2)."""
    constant_lr = ds_json(tmp_path, name="two.json")
    one = ds_json(tmp_path, name="one.json", train_micro_batch_size_per_gpu=4)
    ref = train_losses_of_one_rank(tiny, tmp_path / "reference", one)
    out = tmp_path / "run"
    args = run_args(tiny, out, constant_lr, save_steps=2) + LORA
    env = launcher_env(PYTHONPATH=str(ROOT))
    launcher = subprocess.Popen(
        deepspeed_cmd(args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        poll(lambda: read_latest(out / "checkpoints"), JOB_TIMEOUT, "the first checkpoint")
        ranks = [
            p
            for p in psutil.Process(launcher.pid).children(recursive=True)
            if "--local_rank=1" in " ".join(p.cmdline())
        ]
        assert len(ranks) == 1
        ranks[0].send_signal(signal.SIGKILL)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    assert launcher.returncode != 0, output[-6000:]
    tag = read_latest(out / "checkpoints")
    assert STEPS > int(tag[5:]) >= 2, f"{tag}\n{output[-6000:]}"
    assert_complete(out / "checkpoints", tag, ranks=2)
    proc = run_logged(deepspeed_cmd(args + ["--resume"]), env=env, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert f"resumed from {out / 'checkpoints' / tag}" in proc.stdout, proc.stdout[-6000:]
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert abs(ref[0] - ref[-1]) > 1e-3


def train_losses_of_one_rank(tiny, out, ds_config):
    from ds_distill import train

    cfg = make_cfg(
        tiny, out, deepspeed_config=ds_config, max_steps=STEPS, lora_r=4, lora_alpha=8.0, keep_last=0, seed=42
    )
    return losses_of(train.run(cfg))
