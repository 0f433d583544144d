"""Where a sample stops and what it may hold, in the three places the toolkit samples: on-policy training
(on_policy.wrap), ``python -m ds_distill.generate`` and ``ds_distill.evaluate``'s generation metric.

The models are tiny and rigged through their weights, so the property is visible in a few samples: one whose
generation_config.json lists ``<|end|>`` as a second eos and which writes it with probability ~1/4 at every
position, and one whose head has padding rows (more rows than tokens) with one padding id as its favourite.
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from ds_distill import on_policy, train
from ds_distill.runtime.callbacks import Callback
from tests import tiny as tiny_mod
from tests.helpers import ds_json, op_cfg, write_pc_data


@pytest.fixture(scope="module")
def pc_one_word(tiny):
    """48 prompt/completion records, prompts of 2 to 12 words, one-word completions."""
    return write_pc_data(tiny["root"] / "sampling_pc.jsonl", completion_words=None)


def rigged_model(dir, tok, token: int, logit: float, *, vocab_pad: int = 0, eos_ids=None) -> str:
    """A 1-layer model whose next-token logits are ~``logit`` for ``token`` and ~0 for every other row, at every
    position: every embedding holds 100 in dimension 0, so the residual stream, hence the final norm's output, is
    ~sqrt(hidden) there whatever the token, and only ``token``'s head row reads that dimension. ``eos_ids``: the eos
    list written to generation_config.json (the tokenizer's eos stays ``</s>``)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # built whole even when an earlier test's ZeRO-3 engine left its config behind
    hidden = 32
    path = tiny_mod.make_model(dir, tok, layers=1, hidden=hidden, vocab_pad=vocab_pad, tie=False, seed=3)
    lm = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        lm.model.embed_tokens.weight[:, 0] = 100.0
        lm.lm_head.weight[:, 0] = 0.0
        lm.lm_head.weight[token, 0] = logit / math.sqrt(hidden)
    if eos_ids is not None:
        lm.generation_config.eos_token_id = eos_ids
    lm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def end_model(tiny):
    """(model dir, id of <|end|>): generation_config.json says eos_token_id [</s>, <|end|>]; p(<|end|>) ~ 1/4."""
    tok = tiny["tokenizer"]
    end = tok.convert_tokens_to_ids("<|end|>")
    logit = math.log(0.25 / 0.75 * (len(tok) - 1))
    path = rigged_model(tiny["root"] / "end_model", tok, end, logit, eos_ids=[tok.eos_token_id, end])
    # The model as transformers loads it: its own generate stops at both ids; its own forward favours <|end|>.
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    assert GenerationConfig.from_pretrained(path).eos_token_id == lm.generation_config.eos_token_id == [2, end]
    with torch.no_grad():
        p = lm(input_ids=torch.tensor([[1, 30, 40]])).logits.softmax(-1)[0, :, end]
    assert p.min() > 0.2 and p.max() < 0.3
    return path, end


@pytest.fixture(scope="module")
def pad_model(tiny):
    """(model dir, the favoured padding id): 8 head rows beyond the tokenizer; row len(tok) + 3 has p ~ 1."""
    tok = tiny["tokenizer"]
    favourite = len(tok) + 3
    path = rigged_model(tiny["root"] / "pad_model", tok, favourite, 20.0, vocab_pad=8)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([[1, 30, 40]])).logits
    assert logits.shape[-1] == len(tok) + 8 and (logits.argmax(-1) == favourite).all()
    return path, favourite


def ends_at_first_stop(sample: list[int], stops: set[int]) -> bool:
    """No stop token before the last token."""
    return not any(t in stops for t in sample[:-1])


class RecordSamples(Callback):
    """Records every sample the on-policy stream's generator returns."""

    def __init__(self):
        self.samples = []

    def on_train_start(self, trainer) -> None:
        generator = trainer.train.generator
        real = generator.generate

        def recorded(prompts, sampling, seed):
            out = real(prompts, sampling, seed)
            self.samples += out
            return out

        generator.generate = recorded


def on_policy_samples(tiny, pc_one_word, tmp_path, student: str) -> list[list[int]]:
    """Every sample of a 2-step on-policy run (every micro-batch sampled) of `student` against the tiny teacher."""
    record = RecordSamples()
    cfg = op_cfg(
        tiny,
        pc_one_word,
        tmp_path / "run",
        student=student,
        on_policy_fraction=1.0,
        max_new_tokens=12,
        max_steps=2,
        deepspeed_config=ds_json(tmp_path),
    )
    trainer = train.run(cfg, [record])
    assert trainer.step == 2 and len(record.samples) >= 4  # 2 steps x micro-batch 2
    return record.samples


def test_on_policy_stops_at_the_models_own_eos_list(tiny, pc_one_word, dist_env, tmp_path, end_model):
    """A student whose generation_config.json ends turns with <|end|>: every sample ends at its first <|end|> (kept,
    supervised once), none runs on past it."""
    path, end = end_model
    samples = on_policy_samples(tiny, pc_one_word, tmp_path, path)
    stops = {tiny["tokenizer"].eos_token_id, end}
    assert all(ends_at_first_stop(s, stops) for s in samples), samples
    ended = [s for s in samples if s[-1] == end]
    assert len(ended) >= len(samples) // 2 and any(len(s) > 1 for s in ended), samples


def test_generate_and_evaluate_stop_at_the_models_own_eos_list(tiny, pc_one_word, tmp_path, end_model):
    from ds_distill import evaluate, generate

    path, end = end_model
    tok = tiny["tokenizer"]
    out = tmp_path / "out.jsonl"
    args = ["--model", path, "--data", pc_one_word, "--output", str(out), "--max_new_tokens", "12", "--seed", "1"]
    assert generate.main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 48
    # The stop token that ended a sample is not written (training appends eos), and nothing was sampled after it.
    assert not any("<|end|>" in r["completion"] for r in records), [r["completion"] for r in records]
    assert sum(r["completion"] == "" for r in records) < 24 and any(r["completion"] for r in records)

    got = evaluate.generation_nll(
        path, pc_one_word, teacher_dir=tiny["teacher"], seq_len=24, max_new_tokens=12, seed=0, batch_size=8
    )
    samples = [s["completion_ids"] for s in got["samples"]]
    stops = {tok.eos_token_id, end}
    assert all(ends_at_first_stop(s, stops) for s in samples), samples
    assert sum(s[-1] == end for s in samples) >= len(samples) // 2
    assert got["gen_eos_fraction"] == sum(s[-1] in stops for s in samples) / len(samples)


def test_on_policy_never_samples_padding_rows(tiny, pc_one_word, dist_env, tmp_path, pad_model):
    """A student with 8 padding rows beyond the tokenizer, its favourite a padding id: on-policy training runs and
    every sampled token is a real one (the teacher has no row for the others)."""
    path, _ = pad_model
    samples = on_policy_samples(tiny, pc_one_word, tmp_path, path)
    assert all(t < len(tiny["tokenizer"]) for s in samples for t in s), samples
    assert sum(map(len, samples)) > 4 * len(samples)  # real tokens were sampled, not a stop at once


def test_generate_and_evaluate_never_sample_padding_rows(tiny, pc_one_word, tmp_path, pad_model):
    """generate's greedy completion is the model's own argmax over the real vocabulary; evaluate's samples are
    real tokens the teacher can score."""
    from ds_distill import evaluate, generate

    path, _ = pad_model
    tok = tiny["tokenizer"]
    prompts = [json.loads(line)["prompt"] for line in open(pc_one_word).readlines()[:4]]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    assert (
        generate.main(
            ["--model", path, "--data", str(src), "--output", str(out), "--max_new_tokens", "4", "--top_k", "1"]
        )
        == 0
    )
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    for r in (json.loads(line) for line in out.read_text().splitlines()):
        ids, new = tok(r["prompt"])["input_ids"], []
        with torch.no_grad():
            for _ in range(4):
                new.append(int(lm(input_ids=torch.tensor([ids + new])).logits[0, -1, : len(tok)].argmax()))
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert r["completion"] == tok.decode(new) != ""

    got = evaluate.generation_nll(
        path, pc_one_word, teacher_dir=tiny["teacher"], seq_len=24, max_new_tokens=8, seed=0, batch_size=8
    )
    assert all(t < len(tok) for s in got["samples"] for t in s["completion_ids"])
    assert got["gen_tokens"] > 4 * got["gen_prompts"] and math.isfinite(got["gen_nll"])


def test_sampling_is_what_was_asked_not_the_models_defaults(tiny, tmp_path):
    """top_k 0 is no filtering (transformers would fill an unset top_k with 50), and the sampling defaults of the
    model's generation_config.json (here repetition_penalty, top_k) are not applied: greedy is the model's own
    argmax."""
    tok = tiny["tokenizer"]
    lm = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    lm.generation_config.repetition_penalty, lm.generation_config.top_k = 5.0, 3
    gen = on_policy.HFGenerator(lambda: lm, tok, generation_config=lm.generation_config, synced=False)
    prompts = [[1, 30, 31, 32, 33, 34], [1, 40]]
    out = gen.generate(prompts, on_policy.Sampling(6, top_k=1), seed=0)
    for p, got in zip(prompts, out):
        ids = list(p)
        with torch.no_grad():
            for _ in range(len(got)):
                ids.append(int(lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert got == ids[len(p) :]
    assert lm.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was

    # At temperature 50 the tiny model is ~uniform over ~400 tokens: 256 first tokens hit far more than 50 ids.
    firsts = gen.generate([[1, 30]] * 256, on_policy.Sampling(1, temperature=50.0), seed=0)
    assert len({s[0] for s in firsts}) > 100
