"""Teacher size for the placement, from the config alone: every checkpoint format is sized alike."""

import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill import models


def test_teacher_size_is_the_same_for_every_checkpoint_format(tiny, tmp_path):
    unset_hf_deepspeed_config()  # an earlier test's ZeRO-3 config would partition this plain load
    lm = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    want = sum(p.numel() for p in lm.parameters())  # the real model, tied embedding once
    sharded, legacy, config_only = tmp_path / "sharded", tmp_path / "bin", tmp_path / "config_only"
    lm.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    lm.config.save_pretrained(legacy)
    torch.save(lm.state_dict(), legacy / "pytorch_model.bin")
    reloaded = AutoModelForCausalLM.from_pretrained(legacy)  # a checkpoint transformers really loads
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), lm.parameters()))
    lm.config.save_pretrained(config_only)  # no weights at all: the count never reads them
    for path in (tiny["teacher"], sharded, legacy, config_only):
        assert models.parameter_count(str(path)) == want, path
    kw = dict(sharded="S", replicated="R", bytes_per_param=4, world_size=8)
    assert models.teacher_placement([str(legacy)], rank_memory=4 * want * 4, **kw)[0] == "R"  # fits in 25%
    assert models.teacher_placement([str(legacy)], rank_memory=4 * want * 4 - 1, **kw)[0] == "S"
    assert models.parameter_count(str(tmp_path)) is None  # no config.json: size unknown, sharded
