"""Parity tests that see a gradient-scale error: one plain-SGD step (no clipping, lr 1) moves every parameter by
exactly minus the gradient of the documented loss, which a plain PyTorch forward/backward computes here (the
reference, no DeepSpeed). Loss curves under AdamW with clipping barely move when the gradient is off by a constant
factor; an SGD update moves by that factor. Plus a golden loss curve of a fixed tiny run, kept in tests/golden/.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill import data, losses, train
from ds_distill.ds_config import REPO_CONFIGS
from tests.helpers import ds_json, losses_of, make_cfg

GOLDEN = Path(__file__).resolve().parent / "golden" / "loss_curve.json"
LR = 1.0


def sgd_json(tmp_path, stage: int, micro: int, accum: int) -> str:
    """A shipped CPU config with plain SGD, no clipping and no scheduler: the step is exactly ``p -= lr * grad``."""
    d = json.loads((REPO_CONFIGS / "cpu_zero3.json").read_text())
    for key in ("scheduler", "csv_monitor"):
        d.pop(key)
    d["gradient_clipping"] = 0.0  # explicit: DeepSpeed's default when the key is absent is 1.0, not off
    d["optimizer"] = {"type": "SGD", "params": {"lr": LR}}  # torch.optim.SGD, as DeepSpeed builds any torch optimizer
    d["zero_allow_untested_optimizer"] = True
    d["zero_optimization"] = d["zero_optimization"] if stage == 3 else {"stage": stage}
    d.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    p = tmp_path / f"sgd_z{stage}_{micro}x{accum}.json"
    p.write_text(json.dumps(d))
    return str(p)


def engine_parameters(engine) -> dict[str, torch.Tensor]:
    """Full fp32 parameters by Hugging Face name (gathered under ZeRO-3)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.detach().clone().float() for k, v in params.items()}


def reference_gradients(tiny, trainer, examples: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """(initial parameters, gradients of the step's loss, its norm) from plain Hugging Face models in fp32, on the
    step's global batch as one batch: loss = sum over supervised tokens / global supervised tokens (train.py)."""
    from transformers import AutoModelForCausalLM

    unset_hf_deepspeed_config()  # the engines' ZeRO-3 config would partition these plain loads
    student = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).eval()
    stream = data.BatchStream(
        trainer.train.dataset,
        batch_size=examples,
        rank=0,
        world_size=1,
        seed=trainer.cfg.seed,
        pad_token_id=tiny["tokenizer"].pad_token_id,
    )
    labels, batch = (b := next(stream)).labels, b.inputs
    with torch.no_grad():
        t_logits = teacher(**batch).logits
    out = losses.loss_sums(student(**batch).logits, [t_logits], labels, **trainer.objective.loss_kw())
    (out.total / out.n_tokens).backward()
    before = {k: p.detach().clone() for k, p in student.named_parameters()}
    grads = {k: p.grad.detach().clone() for k, p in student.named_parameters()}
    return before, grads, torch.sqrt(sum((g**2).sum() for g in grads.values())).item()


@pytest.mark.parametrize(
    "stage, micro, accum", [(0, 8, 1), (0, 4, 2), (1, 4, 2), (2, 8, 1), (2, 4, 2), (3, 8, 1), (3, 4, 2)]
)
def test_one_sgd_step_moves_by_minus_the_gradient(tiny, dist_env, tmp_path, stage, micro, accum):
    """ZeRO 0/1/2/3 and micro-batch x accumulation: the same update, and it is -lr x the reference gradient."""
    trainer = train.run(
        make_cfg(tiny, tmp_path / "o", max_steps=1, deepspeed_config=sgd_json(tmp_path, stage, micro, accum))
    )
    # ZeRO 0/1: the tied embedding's gradient is sparse and added into the head's (models.sparse_tied_embedding)
    assert trainer.student.module.grad_into_weight == (stage < 2)
    after = engine_parameters(trainer.student)
    before, grads, norm = reference_gradients(tiny, trainer, micro * accum)
    assert set(after) == set(grads)
    assert norm > 1e-2, "a step that barely moves proves nothing"
    for name in grads:
        torch.testing.assert_close(
            after[name] - before[name], -LR * grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )
    # Stage 0 included: DeepSpeed keeps no norm there, the trainer's GradNorm computes it at the boundary.
    assert trainer.history[0]["Train/grad_norm"] == pytest.approx(norm, rel=1e-4), "logged grad_norm = reference norm"


def test_stage0_clips_as_zero1_logs_its_norm_and_exports(tiny, dist_env, tmp_path):
    """Without ZeRO (the one-rank CPU default) DeepSpeed still clips as the JSON says and the logged grad_norm is the
    one ZeRO-1 reports, step by step; plain SGD, so a clipping left out would move the weights by the norm, not by
    CLIP. On one rank the stage-0 backward all-reduces nothing (ZeRO-1's still hands its gradients over there). The
    stage-0 checkpoint exports to final/ with the engine's weights."""
    from safetensors.torch import load_file

    from ds_distill.runtime.callbacks import Callback

    class CountReductions(Callback):
        calls = 0

        def on_train_start(self, trainer):
            reduce = trainer.student.allreduce_gradients

            def counted(*args, **kw):
                self.calls += 1
                return reduce(*args, **kw)

            trainer.student.allreduce_gradients = counted

    CLIP = 0.25  # below the tiny run's gradient norms (~0.5): every step is clipped
    runs, counts = {}, {}
    for stage in (0, 1):
        d = json.loads(Path(sgd_json(tmp_path, stage, 8, 1)).read_text())
        d["gradient_clipping"] = CLIP
        path = tmp_path / f"clip_z{stage}.json"
        path.write_text(json.dumps(d))
        cfg = make_cfg(tiny, tmp_path / f"z{stage}", deepspeed_config=str(path), export=stage == 0)
        counts[stage] = CountReductions()
        runs[stage] = train.run(cfg, callbacks=[counts[stage]])
    z0, z1 = runs[0], runs[1]
    assert z0.ds.zero_stage == 0 and z1.ds.zero_stage == 1
    assert counts[0].calls == 0 and counts[1].calls == 3, (counts[0].calls, counts[1].calls)
    norms = losses_of(z1, "Train/grad_norm")
    assert len(norms) == 3 and min(norms) > CLIP, "every step must be clipped, or the comparison proves nothing"
    for key in ("Train/loss", "Train/grad_norm"):
        assert losses_of(z0, key) == pytest.approx(losses_of(z1, key), rel=1e-5), key
    exported = load_file(str(tmp_path / "z0" / "final" / "model.safetensors"))
    trained = engine_parameters(z0.student)
    assert exported.keys() <= trained.keys() and "model.embed_tokens.weight" in exported
    for name, value in exported.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_golden_loss_curve(tiny, dist_env, tmp_path):
    """A fixed tiny run (shipped ZeRO-3 CPU config, AdamW at lr 1e-2) against the curve committed in tests/golden/.
    It changes only on purpose: after a deliberate change rerun with DS_DISTILL_UPDATE_GOLDEN=1 and commit the file."""
    trainer = train.run(make_cfg(tiny, tmp_path / "g", max_steps=4, deepspeed_config=ds_json(tmp_path)))
    curve = {key: losses_of(trainer, f"Train/{key}") for key in ("loss", "ce", "kd", "grad_norm")}
    if os.environ.get("DS_DISTILL_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for key, values in golden.items():
        assert curve[key] == pytest.approx(values, rel=1e-4, abs=1e-6), key


def test_hidden_loss_update_is_the_same_for_any_micro_batching(tiny, dist_env, tmp_path):
    """--hidden_loss: one plain-SGD step with micro-batch 4 x 1 and 2 x 2 moves every parameter the same, and logs the
    same loss and hidden term: the hidden sums are divided by the step's global token count, not per micro-batch."""
    runs = []
    for micro, accum in ((4, 1), (2, 2)):
        cfg = make_cfg(
            tiny,
            tmp_path / f"h{micro}",
            max_steps=1,
            deepspeed_config=sgd_json(tmp_path, 3, micro, accum),
            hidden_loss="mse",
            hidden_weight=3.0,
            hidden_layers="0:1",
        )
        runs.append(train.run(cfg))
    a, b = (engine_parameters(r.student) for r in runs)
    start = engine_parameters(
        train.build(make_cfg(tiny, tmp_path / "s", deepspeed_config=sgd_json(tmp_path, 3, 4, 1))).student
    )
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3, "the step must move the weights"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for key in ("Train/loss", "Train/hidden", "Train/hidden_s0_t1"):
        assert runs[0].history[0][key] == pytest.approx(runs[1].history[0][key], rel=1e-5), key
