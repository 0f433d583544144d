"""The fused chunked loss with a ZeRO-3 lm_head (the default config), in process: SGD updates against full logits."""

import pytest
import torch

from ds_distill import losses, train
from tests.helpers import losses_of, make_cfg, sgd_zero3_json


@pytest.mark.parametrize("tie,paths", [(True, ["checkpointed", "fused"]), (False, ["fused"])])
def test_fused_zero3_head_equals_full_logits(tiny, dist_env, tmp_path, monkeypatch, tie, paths):
    """Two SGD steps (teacher, T = 2, alpha 0.5, chunks of 7 tokens) with a partitioned lm_head, tied to the
    embedding or not: the student's parameters after them equal those of the full-logits path (chunk_size 0), for the
    fused path (the default) and, tied, for the checkpointed one (the fallback)."""
    import deepspeed

    from tests import tiny as tiny_mod

    student = (
        tiny["student"]
        if tie
        else tiny_mod.make_model(tmp_path / "untied", tiny["tokenizer"], layers=1, tie=False, seed=2)
    )
    config = sgd_zero3_json(tmp_path)

    def run(path: str):
        if path == "checkpointed":
            monkeypatch.setattr(losses.chunked, "fusable", lambda head: False)
        trainer = train.run(
            make_cfg(
                tiny,
                tmp_path / path,
                student=student,
                chunk_size=0 if path == "full" else 7,
                max_steps=2,
                temperature=2.0,
                deepspeed_config=config,
            )
        )
        monkeypatch.undo()
        module = trainer.student.module
        head = module.head
        assert hasattr(head.linear.weight, "ds_id") and losses.chunked.fusable(head)  # a ZeRO-3 head, fused by default
        assert (module.lm.get_input_embeddings().weight is head.linear.weight) == tie
        params = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return losses_of(trainer), {n: p.detach().clone() for n, p in params.items()}

    ref_losses, ref = run("full")
    assert abs(ref_losses[0] - ref_losses[1]) > 1e-3, "the first step must move the loss"
    for path in paths:
        got_losses, got = run(path)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{path} {name}: {m}")
        assert got_losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
