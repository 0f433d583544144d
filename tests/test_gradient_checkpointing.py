"""--gradient_checkpointing of the student (issue 30, DeepSpeed #5704): the same updates, really recomputed, under
ZeRO-3 with the chunked loss and with packing, in process."""

import json

import pytest
import torch

from ds_distill import train
from tests.helpers import losses_of, make_cfg, sgd_zero3_json


@pytest.mark.parametrize("packing", [False, True])
def test_gradient_checkpointing_gives_the_same_updates_and_recomputes(tiny, dist_env, tmp_path, packing):
    """Two SGD steps under ZeRO-3 with the chunked loss: the student's parameters after them equal those without
    checkpointing, and each decoder layer runs twice per micro-batch (forward, then recomputed in the backward)."""
    import deepspeed

    def run(checkpointing: bool):
        cfg = make_cfg(
            tiny,
            tmp_path / f"gc{checkpointing}{packing}",
            max_steps=2,
            chunk_size=7,
            packing=packing,
            gradient_checkpointing=checkpointing,
            deepspeed_config=sgd_zero3_json(tmp_path),
        )
        trainer = train.build(cfg)
        module = trainer.student.module
        layers = [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]
        calls = []
        # transformers checkpoints a layer's forward, module hooks stay outside the recompute: count the mlp's forward
        mlp_forward = layers[0].mlp.forward

        def counted(*args, **kwargs):
            calls.append(torch.is_grad_enabled())
            return mlp_forward(*args, **kwargs)

        layers[0].mlp.forward = counted
        trainer.fit()
        assert module.lm.is_gradient_checkpointing == checkpointing
        params = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return losses_of(trainer), {n: p.detach().clone() for n, p in params.items()}, len(calls)

    ref_losses, ref, ref_calls = run(False)
    got_losses, got, got_calls = run(True)
    assert abs(ref_losses[0] - ref_losses[1]) > 1e-3, "the first step must move the loss"
    micro_batches = 2 * trainer_grad_accum(tmp_path)
    assert ref_calls == micro_batches and got_calls == 2 * micro_batches, (ref_calls, got_calls)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert got_losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)


def trainer_grad_accum(tmp_path) -> int:
    return json.loads((tmp_path / "sgd_zero3.json").read_text()).get("gradient_accumulation_steps", 1)
