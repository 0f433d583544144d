"""Helpers every test module may import: the tiny run's config and command line, DeepSpeed JSONs, losses of a run.

Test modules import from here (or name the fixtures of tests/conftest.py), never from one another; tests/launch.py
starts ranks through the real launchers.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch

from ds_distill import train
from ds_distill.common import UsageError
from ds_distill.config import RunConfig
from ds_distill.ds_config import REPO_CONFIGS
from ds_distill.plot import read_curves

ROOT = Path(__file__).resolve().parent.parent
# The words of the tiny runs' texts, prompts and completions.
WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun".split()
# The chat tests' conversation (and a chat cache's): turn 1 is a reply starting with "\n"; turn 3 carries
# reasoning, which Qwen3 drops once a later user turn follows.
CONV = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "\nsure"},
    {"role": "user", "content": "the sea"},
    {"role": "assistant", "content": "<think>\nthe wind\n</think>\n\nhere is a poem"},
]


def ds_json(tmp_path, base="cpu_zero3.json", name=None, lr=1e-2, **batch):
    """A shipped config with a constant, visible learning rate (no warm-up) so that steps differ; ``lr=None`` keeps
    the shipped one. ``batch`` overrides top-level keys (batch sizes). Returns the path of the written file."""
    d = json.loads((REPO_CONFIGS / base).read_text())
    d.pop("scheduler", None)
    if lr is not None:
        d["optimizer"]["params"]["lr"] = lr
    d.update(batch)
    p = tmp_path / (name or f"{base}.{len(list(tmp_path.glob('*.json')))}.json")
    p.write_text(json.dumps(d))
    return str(p)


def projection_json(tmp_path, **more) -> str:
    """The shipped ZeRO-3 CPU config with every parameter partitioned (no persistence threshold: the tiny
    projections would otherwise stay whole), a constant lr; ``more``: top-level overrides."""
    zero = json.loads((REPO_CONFIGS / "cpu_zero3.json").read_text())["zero_optimization"]
    return ds_json(tmp_path, zero_optimization={**zero, "stage3_param_persistence_threshold": 0}, **more)


def sgd_zero3_json(tmp_path) -> str:
    """cpu_zero3.json with plain SGD (updates proportional to the gradients), no clipping, and every parameter
    partitioned (threshold 0): equal parameters after the steps mean equal gradients, and the lm_head is gathered by
    its module's hooks in forward and again in backward."""
    d = json.loads((REPO_CONFIGS / "cpu_zero3.json").read_text())
    d.pop("scheduler", None)
    d["optimizer"] = {"type": "SGD", "params": {"lr": 0.5}}
    d["gradient_clipping"] = 0.0
    d["zero_allow_untested_optimizer"] = True
    d["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    p = tmp_path / "sgd_zero3.json"
    p.write_text(json.dumps(d))
    return str(p)


def make_cfg(tiny, out, **kw):
    """The tiny pair's RunConfig: 3 steps of 32 tokens, ZeRO-3 student and teacher, every step logged, no export."""
    base = dict(
        teacher=[tiny["teacher"]],
        student=tiny["student"],
        data=tiny["data"],
        output_dir=str(out),
        deepspeed_config=str(REPO_CONFIGS / "cpu_zero3.json"),
        teacher_deepspeed_config=str(REPO_CONFIGS / "cpu_teacher_zero3.json"),
        max_steps=3,
        seq_len=32,
        log_steps=1,
        eval_fraction=0.0,
        export=False,
        chunk_size=16,
        seed=0,
    )
    base.update(kw)
    return RunConfig(**base)


def write_pc_data(path, completion_words: tuple[int, int] | None = (2, 8)) -> str:
    """48 prompt/completion records of WORDS (seed 1) in the JSONL file ``path``: prompts of 2 to 12 words,
    completions of ``completion_words`` words (an inclusive range), or of exactly one with None. Returns the path."""
    rng = random.Random(1)
    with open(path, "w") as fh:
        for _ in range(48):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            n = 1 if completion_words is None else rng.randint(*completion_words)
            completion = " " + " ".join(rng.choice(WORDS) for _ in range(n))
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return str(path)


def op_cfg(tiny, data, out, **kw):
    """An on-policy-ready run config: prompt/completion ``data``, 24 tokens, samples of 8 tokens, all-KD jsd."""
    return make_cfg(tiny, out, **{**dict(data=data, seq_len=24, max_new_tokens=8, alpha=0.0, loss="jsd"), **kw})


def losses_of(trainer, key="Train/loss"):
    """The logged values of ``key``, one per log step."""
    return [h[key] for h in trainer.history if key in h]


def train_losses(out: Path | str) -> dict[int, float]:
    """{step: Train/loss} from a launched run's csv monitor, {} before its first log line; a resumed run appends, and
    its values win for the steps it redid."""
    try:
        return dict(read_curves(out).get("Train/loss", []))
    except UsageError:  # no csv file yet
        return {}


def flags(**values) -> list[str]:
    """Command-line flags: ``flags(max_steps=2, track_examples=True, teacher=[a, b])`` is ``--max_steps 2
    --track_examples --teacher a --teacher b`` (True: the bare flag; a list: the flag once per item)."""
    argv = []
    for key, value in values.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            argv += [f"--{key}"] if item is True else [f"--{key}", str(item)]
    return argv


def tiny_args(tiny, out, **more) -> list[str]:
    """The tiny pair's training command line (teacher, student, data, output_dir), then ``flags(**more)``."""
    return flags(teacher=tiny["teacher"], student=tiny["student"], data=tiny["data"], output_dir=out, **more)


def launch_args(tiny, out, ds_config, **more) -> list[str]:
    """The tiny pair's command line as the launcher tests run it: ZeRO-3 teacher, 32 tokens, every step logged."""
    more = dict(max_steps=2, seq_len=32, log_steps=1, eval_fraction=0) | more
    return tiny_args(
        tiny,
        out,
        deepspeed_config=ds_config,
        teacher_deepspeed_config=REPO_CONFIGS / "cpu_teacher_zero3.json",
        **more,
    )


def base_args(tiny, out):
    """One step of the tiny pair with the default configs: the command line the bad-input tests change."""
    return tiny_args(tiny, out, max_steps=1, seq_len=32, eval_fraction=0)


@contextlib.contextmanager
def process_group_not_started():
    """Inside: starting the process group fails the test. Bad input is refused before it (``build.configs``), so its
    one line is not preceded by DeepSpeed's start-up lines."""
    from ds_distill.runtime import distributed

    def started(*args, **kw):
        raise AssertionError("the process group started before the input was checked")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "init_distributed", started)
        yield


def run_main(args, capsys):
    """``train.main(args)``'s exit code and its ``error:`` lines on stderr."""
    code = train.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


# ---------------------------------------------------------------- float64 reference divergences
# Deliberately plain (probabilities, not log-probabilities; no special cases beyond the documented jsd endpoints), so
# that they share no code or tricks with ds_distill.losses (tests/test_losses.py, tests/test_cross_tokenizer.py).


def ref_kl(p, q):
    """KL(p || q) per row, 0 log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def ref_entropy(p):
    """H(p) per row in nats, 0 log 0 = 0."""
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)


def ref_divergence(kind, pt, ps, beta, skew, entropy_threshold=3.0):
    if kind == "forward_kl":
        return ref_kl(pt, ps)
    if kind == "reverse_kl":
        return ref_kl(ps, pt)
    if kind == "jsd":
        if beta == 0.0:  # the GKD convention: the endpoints are the two KLs
            return ref_kl(pt, ps)
        if beta == 1.0:
            return ref_kl(ps, pt)
        m = beta * pt + (1 - beta) * ps
        return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)
    if kind == "skew_forward_kl":
        return ref_kl(pt, skew * pt + (1 - skew) * ps)
    if kind == "skew_reverse_kl":
        return ref_kl(ps, skew * ps + (1 - skew) * pt)
    if kind == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    if kind == "entropy_aware_kl":  # w = min(H(p_t) / h, 1) on forward KL, 1 - w on reverse KL (no special cases)
        w = torch.clamp(ref_entropy(pt) / entropy_threshold, max=1.0)
        return w * ref_kl(pt, ps) + (1 - w) * ref_kl(ps, pt)
    raise AssertionError(kind)


def as_lists(batch):
    """Every field of a data.Batch as plain values, for == (tensors compare elementwise)."""
    return (
        batch.epoch,
        batch.position,
        batch.labels.tolist(),
        batch.example_ids.tolist(),
        {k: v.tolist() for k, v in batch.inputs.items()},
    )
