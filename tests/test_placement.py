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


def test_student_stage_by_fit():
    """One rank: the one-rank file when 16 bytes per parameter fit in half the rank's memory; else, several ranks, or
    an unknown size: ZeRO-3."""
    kw = dict(zero3="Z3", one_rank="Z1")
    n = 1000
    assert models.student_placement(n, world_size=1, rank_memory=2 * 16 * n, **kw)[0] == "Z1"
    assert models.student_placement(n, world_size=1, rank_memory=2 * 16 * n - 1, **kw)[0] == "Z3"
    assert models.student_placement(n, world_size=2, rank_memory=10**12, **kw)[0] == "Z3"
    assert models.student_placement(None, world_size=1, rank_memory=10**12, **kw)[0] == "Z3"


def test_one_rank_default_student_config_is_stage0_and_logged(tiny, dist_env, tmp_path, caplog):
    """No --deepspeed_config on one rank with a tiny student: the configs phase picks the shipped stage-0 file, says
    why in the log, and records it as run; a named JSON is used as written (ZeRO-3 stays ZeRO-3)."""
    import json
    import logging

    from ds_distill.core import build
    from ds_distill.ds_config import REPO_CONFIGS
    from tests.helpers import make_cfg

    with caplog.at_level(logging.INFO, logger="ds_distill"):
        run = build.configs(make_cfg(tiny, tmp_path / "d", deepspeed_config=""))
    assert run.student.zero_stage == 0 and run.student.path == str(REPO_CONFIGS / "cpu_zero0.json")
    assert any("cpu_zero0.json" in r.message and "partition nothing" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "d" / "ds_config_student.json").read_text())["zero_optimization"]["stage"] == 0
    named = build.configs(make_cfg(tiny, tmp_path / "n"))  # make_cfg names cpu_zero3.json
    assert named.student.zero_stage == 3
