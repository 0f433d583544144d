"""A LoRA student (--lora_r, ds_distill/models/lora.py) on tiny random models, in process (one rank, ZeRO-3): only the
adapters train, checkpoints hold only them and resume on the same base only, both exports give the engine's logits
(and carry the student's provenance) and the merge gathers one module at a time, on-policy generation gathers the base
once. The 2-rank checks (dtype and checkpointing combinations against ZeRO-0, kill and resume) are in
tests/test_lora_multirank.py."""

from __future__ import annotations

import contextlib
import json
import shutil

import deepspeed
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill import train
from ds_distill.common import UsageError
from ds_distill.config import RunConfig
from ds_distill.extras.manifest import Manifest
from ds_distill.models import lora
from ds_distill.models.layer_map import read_provenance, write_provenance
from ds_distill.runtime.callbacks import Callback
from tests import tiny as tiny_mod
from tests.helpers import ds_json, losses_of, make_cfg, op_cfg

LORA = dict(lora_r=4, lora_alpha=8.0)


class CountGathers:
    """Wraps ``deepspeed.zero.GatheredParameters``: records every gather's parameters and the deepest nesting."""

    def __init__(self, monkeypatch):
        self.calls: list[list] = []
        self.depth = self.max_depth = 0
        real = deepspeed.zero.GatheredParameters
        outer = self

        @contextlib.contextmanager
        def counted(params, *args, **kwargs):
            params = list(params) if not isinstance(params, torch.nn.Parameter) else [params]
            outer.calls.append(params)
            outer.depth += 1
            outer.max_depth = max(outer.max_depth, outer.depth)
            try:
                with real(params, *args, **kwargs):
                    yield
            finally:
                outer.depth -= 1

        monkeypatch.setattr(deepspeed.zero, "GatheredParameters", counted)


def inputs_of(trainer):
    return next(trainer.train).inputs


@torch.no_grad()
def engine_logits(trainer, inputs):
    return trainer.student.module.head(trainer.student(**inputs))


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_train_alone_and_both_exports_give_the_engine_logits(tiny, dist_env, tmp_path, monkeypatch, dora):
    from peft import PeftModel

    out = tmp_path / "run"
    # The tiny student with a provenance (as student_init writes it), which both exports carry.
    student = str(shutil.copytree(tiny["student"], tmp_path / "student"))
    write_provenance(student, [0, 1], 2, "teacher-fingerprint", random_init=False)
    prov = read_provenance(student)
    assert prov["teacher_layers"] == [0, 1]
    trainer = train.run(
        make_cfg(
            tiny,
            out,
            student=student,
            max_steps=6,
            export=True,
            deepspeed_config=ds_json(tmp_path, lr=3e-2),
            lora_dora=dora,
            **LORA,
        ),
        [Manifest()],
    )
    module = trainer.student.module
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    kinds = (".lora_A.", ".lora_B.") + ((".lora_magnitude_vector.",) if dora else ())
    assert trained and all(any(k in n for k in kinds) for n in trained), trained
    # Every linear layer of the decoder got one (7 in a Llama layer), the lm_head none.
    assert len(trained) == len(kinds) * 7 and not any("lm_head" in n for n in trained)
    loss = losses_of(trainer)
    assert loss[-1] < loss[0] - 0.05, loss
    # The frozen base is the model on disk, bit for bit, after training.
    unset_hf_deepspeed_config()  # the engine's ZeRO-3 config would make from_pretrained build partitioned weights
    base = AutoModelForCausalLM.from_pretrained(student)
    own = dict(base.named_parameters())
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        for n, p in module.named_parameters():
            if not p.requires_grad:
                torch.testing.assert_close(p.data, own[n.replace(".base_layer", "")].data, rtol=0, atol=0)

    inputs = inputs_of(trainer)
    want = engine_logits(trainer, inputs)
    adapter = out / "final" / lora.ADAPTER_DIR
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), adapter)
    with torch.no_grad():
        from_adapter = peft_model(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "final")(**inputs).logits
        before = base(**inputs).logits
    assert not torch.allclose(before, want, atol=1e-3), "training must have changed the student"
    torch.testing.assert_close(from_adapter, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, from_adapter, atol=1e-5, rtol=1e-5)

    # The export CLI, from the checkpoint (adapters only) and the base on disk, writes the same two forms.
    from ds_distill.export import main as export_main

    assert export_main([str(out / "checkpoints"), str(tmp_path / "again")]) == 0
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")(**inputs).logits
        again_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(student), tmp_path / "again" / lora.ADAPTER_DIR
        )(**inputs).logits
    torch.testing.assert_close(again, merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again_adapter, from_adapter, atol=1e-5, rtol=1e-5)
    assert read_provenance(out / "final") == read_provenance(tmp_path / "again") == prov

    # The merge under ZeRO-3 gathers one module at a time: each adapted layer (base + adapters) or one plain module,
    # never nested, each unit once (the tied lm_head is not gathered again).
    gathers = CountGathers(monkeypatch)
    lora.save_merged(module.lora, tmp_path / "counted", dtype=torch.float32, max_shard_bytes=4096)
    units = lora.merge_units(module.lm)
    owner = {id(p): name for name, m in units for p in m.parameters(recurse=isinstance(m, lora_layer()))}
    assert gathers.max_depth == 1
    assert all(len({owner[id(p)] for p in call}) == 1 for call in gathers.calls)
    assert len(gathers.calls) == len(units) - 1  # lm_head shares the embedding's weight
    with torch.no_grad():
        sharded = AutoModelForCausalLM.from_pretrained(out / "final")
        shutil.copy(out / "final" / "config.json", tmp_path / "counted" / "config.json")
        counted = AutoModelForCausalLM.from_pretrained(tmp_path / "counted")(**inputs).logits
    assert (tmp_path / "counted" / "model.safetensors.index.json").is_file()  # 4 KiB shards: several
    torch.testing.assert_close(counted, sharded(**inputs).logits, atol=0, rtol=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lora"]["base_fingerprint"] == lora.base_fingerprint(student)


def lora_layer():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def test_checkpoint_holds_the_adapters_only_and_resume_checks_the_base(tiny, dist_env, tmp_path, capsys):
    """A LoRA tag is under 5% of a full one (a 2-layer, hidden-128 student, so that the weights, not the file
    overheads, set the sizes); resume continues the same curve; another base, or other LoRA flags, are refused."""
    student = tiny_mod.make_model(tmp_path / "student", tiny["tokenizer"], layers=2, hidden=128, heads=4, seed=3)
    cfg_ds = ds_json(tmp_path)

    def tag_bytes(out):
        tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
        return sum(f.stat().st_size for f in tag.rglob("*") if f.is_file() and "hf" not in f.parts)

    kw = dict(student=student, deepspeed_config=cfg_ds)
    LORA = dict(lora_r=2, lora_alpha=4.0)  # adapters of 2.4% of the weights: the tag must follow, not the overheads
    full = train.run(make_cfg(tiny, tmp_path / "full", max_steps=1, **kw))
    straight = train.run(make_cfg(tiny, tmp_path / "s", max_steps=6, **kw, **LORA))
    assert full.step == 1 and tag_bytes(tmp_path / "s") < 0.05 * tag_bytes(tmp_path / "full"), (
        tag_bytes(tmp_path / "s"),
        tag_bytes(tmp_path / "full"),
    )
    first = train.run(make_cfg(tiny, tmp_path / "r", max_steps=3, save_steps=3, **kw, **LORA))
    record = json.loads((tmp_path / "r" / "checkpoints" / "step_00000003" / "hf" / lora.RECORD).read_text())
    assert record["base_fingerprint"] == lora.base_fingerprint(student)

    # Refused before any step, in one line, the checkpoint untouched: another base (same shape, other weights), other
    # LoRA settings, no LoRA at all.
    other = tiny_mod.make_model(tmp_path / "other", tiny["tokenizer"], layers=2, hidden=128, heads=4, seed=4)
    for change, message in [
        (dict(student=other, **LORA), "trained adapters on another base"),
        (dict(student=student, lora_r=4), "pass the same --lora_"),
        (dict(student=student), "pass the same --lora_"),
    ]:
        cfg = make_cfg(tiny, tmp_path / "r", max_steps=6, resume=True, deepspeed_config=cfg_ds, **change)
        with pytest.raises(UsageError, match=message):
            train.run(cfg)
    with pytest.raises(UsageError, match="is a full-training checkpoint: drop --lora_r"):
        train.run(make_cfg(tiny, tmp_path / "full", max_steps=2, resume=True, **kw, **LORA))

    second = train.run(make_cfg(tiny, tmp_path / "r", max_steps=6, resume=True, **kw, **LORA))
    assert second.history[0]["step"] == 4
    assert losses_of(first) + losses_of(second) == pytest.approx(losses_of(straight), rel=1e-5, abs=1e-6)


def test_generation_gathers_the_base_once_and_the_adapters_per_step(tiny, pc_data, dist_env, tmp_path, monkeypatch):
    """The whole-copy generator of a LoRA student: one gather of every parameter for the first generation, then one
    of the adapters only per optimizer step; the samples are those of the engine's own modules (same losses as
    layered generation)."""
    kw = dict(deepspeed_config=ds_json(tmp_path, lr=3e-2), on_policy_fraction=1.0, max_steps=3, **LORA)
    layered = train.run(op_cfg(tiny, pc_data, tmp_path / "l", generation_gather="layered", **kw))

    class CountFromTheFirstStep(Callback):  # not the gathers of loading and wrapping the models
        def on_train_start(self, trainer):
            self.gathers = CountGathers(monkeypatch)

    counter = CountFromTheFirstStep()
    whole = train.run(op_cfg(tiny, pc_data, tmp_path / "w", generation_gather="whole", **kw), [counter])
    gathers = counter.gathers
    assert losses_of(whole) == pytest.approx(losses_of(layered), rel=1e-5, abs=1e-6)
    params = list(whole.student.module.parameters())
    adapters = {id(p) for p in params if p.requires_grad}
    assert [len(c) for c in gathers.calls] == [len(params)] + [len(adapters)] * 2  # steps 1, 2, 3 generate
    assert all({id(p) for p in c} == adapters for c in gathers.calls[1:])


def test_lora_flags_and_bases_that_are_refused(tiny, dist_env, tmp_path):
    with pytest.raises(UsageError, match="--lora_alpha --lora_dora given without --lora_r"):
        RunConfig(lora_alpha=4.0, lora_dora=True).validate()
    with pytest.raises(UsageError, match="LoRA flags out of range"):
        RunConfig(lora_r=-1).validate()
    with pytest.raises(UsageError, match="'lm_head' is not a linear layer of the decoder"):
        train.run(make_cfg(tiny, tmp_path / "a", lora_r=2, lora_target_modules=["q_proj", "lm_head"]))
    quantised = tmp_path / "quantised"
    shutil.copytree(tiny["student"], quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"is quantised \(bitsandbytes\).*unquantised"):
        train.run(make_cfg(tiny, tmp_path / "q", student=str(quantised), lora_r=2))


def test_packing_and_an_ensemble_train_a_lora_student(tiny, dist_env, tmp_path):
    trainer = train.run(
        make_cfg(
            tiny,
            tmp_path / "p",
            teacher=[tiny["teacher"], tiny["teacher"]],
            teacher_weights=[0.3, 0.7],
            packing=True,
            max_steps=4,
            deepspeed_config=ds_json(tmp_path, lr=3e-2),
            **LORA,
        )
    )
    loss = losses_of(trainer)
    assert len(loss) == 4 and loss[-1] < loss[0], loss
