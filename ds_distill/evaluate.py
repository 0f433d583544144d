"""Held-out perplexity of Hugging Face model directories on the examples the trainer evaluates, and optionally the
teacher's NLL of what each model writes (beside the model's own NLL of it).

    python -m ds_distill.evaluate MODEL_DIR --data eval.jsonl --seq_len 256 [--batch_size 4] [--json out.json] \
        [--generation_prompts eval_prompts.jsonl --teacher TEACHER_DIR --max_new_tokens 64 [--seed 0]]
    python -m ds_distill.evaluate [NAME=]MODEL_DIR [NAME=]MODEL_DIR ... --json_dir results/ ...   # several models

Several models in one process share the imports and the loaded teacher (the demo's six models, seven with
DEMO_LIVE_REFERENCE=1, in one process); each writes ``json_dir/NAME.json`` (NAME defaults to the directory's name, or
its parent's for a run's ``final``/``best``).

Perplexity = exp(sum of next-token CE over every supervised token / number of those tokens), over the whole file
(examples truncated to `seq_len` as in training, via `data.get_dataset`), so numbers of different models on the
same file and `seq_len` compare token for token. One process, no DeepSpeed: it runs on the exported `final/` folders.

Generation metric (``generation_nll``): the model samples a continuation of each held-out prompt (seeded), and the
teacher scores it: the mean over every sampled token of -log p_teacher(token | prompt, earlier sampled tokens), in
nats per token. This is what on-policy distillation optimises (reverse KL to the teacher on the student's own
samples, up to the student's entropy: E_student[-log p_teacher] = KL(student || teacher) + H(student)), while
perplexity scores the model on the dataset's text. The model's own NLL of the same samples (``gen_self_nll``, at
``--generation_temperature 1`` an estimate of H(student) along them) separates the two: ``gen_kl`` = their difference.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ds_distill import data, models, on_policy
from ds_distill.common import IGNORE_INDEX, UsageError, run_cli


def require_model_dir(path: str | os.PathLike, what: str = "") -> None:
    """UsageError unless `path` is a Hugging Face model directory (has a config.json); `what` prefixes the message."""
    if not (Path(path) / "config.json").is_file():
        raise UsageError(
            f"{what}{str(path)!r} has no config.json: pass a Hugging Face model directory (e.g. a run's final/)"
        )


@functools.lru_cache(maxsize=2)  # the teacher and the model being evaluated
def _load(model_dir: str, stamp: float):
    """The model in `model_dir` (float32, eval mode); `stamp` (config.json's mtime) keys a rewritten directory anew."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def load_model(model_dir: str | os.PathLike):
    """A Hugging Face model directory's causal LM, loaded once per process for as long as it is in use."""
    path = Path(model_dir).resolve()
    return _load(str(path), (path / "config.json").stat().st_mtime)


@torch.no_grad()
def perplexity(model_dir: str | os.PathLike, data_path: str, *, seq_len: int, batch_size: int = 4) -> dict[str, float]:
    """{"ppl", "ce" (nats per token), "tokens" (supervised tokens scored), "seconds"} of `model_dir` on `data_path`.

    Logits are computed over the model's full output rows but CE only needs the label's row, so rows padded beyond
    the tokenizer (never a label) do not change the result.
    """
    from transformers import AutoTokenizer

    require_model_dir(model_dir)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir)
    dataset = data.get_dataset(data_path, tokenizer, seq_len=seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ce_sum, n_tokens = 0.0, 0
    for lo in range(0, len(dataset), batch_size):
        batch = data.Batch.collate(dataset[lo : lo + batch_size], pad, epoch=0, position=lo)
        labels = batch.labels
        logits = model(**batch.inputs).logits.float()  # [B, T, V]
        ce_sum += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        n_tokens += int((labels != IGNORE_INDEX).sum())
    ce = ce_sum / max(n_tokens, 1)
    return {"ppl": math.exp(min(ce, 50.0)), "ce": ce, "tokens": n_tokens, "seconds": time.perf_counter() - start}


@torch.no_grad()
def generation_nll(
    model_dir: str | os.PathLike,
    prompts_path: str,
    *,
    teacher_dir: str | os.PathLike,
    seq_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
) -> dict:
    """The teacher's NLL of `model_dir`'s sampled continuations of the prompts in `prompts_path`.

    Prompts are read as training reads them (prompt/completion or messages records through ``data.get_dataset`` at
    `seq_len`; the prompt is every token before the supervised completion, ``on_policy.prompt_length``). The model
    samples at most `max_new_tokens` per prompt (transformers' ``generate`` through ``on_policy.HFGenerator``; batches
    of `batch_size` prompts, batch k seeded by (seed, k), so the samples depend on seed and batch_size). The sample
    ends at the model's first stop token (its generation_config.json eos ids, then the tokenizer's eos), which is
    scored (the model chose to stop); nothing after it is. Padding rows of the model's head are never sampled. The
    teacher scores
    each ``prompt + sample`` in one forward over its full output rows.

    The model scores its own samples the same way (``gen_self_nll``, a Monte Carlo estimate of its entropy per token
    along the samples), so ``gen_kl = gen_nll - gen_self_nll`` estimates KL(model || teacher) per sampled token
    (sequence-level reverse KL, MiniLLM's objective): a model can lower ``gen_nll`` by writing low-entropy text the
    teacher finds likely (a collapse), which ``gen_self_nll`` shows.

    Returns {"gen_nll" (nats per sampled token, the teacher's), "gen_self_nll", "gen_kl" (nats per sampled token),
    "gen_tokens" (sampled tokens scored), "gen_prompts",
    "gen_mean_len" (tokens per sample), "gen_eos_fraction" (samples that ended in a stop token),
    "gen_seconds", "samples": [{"id", "completion" (decoded, eos kept), "completion_ids", "nll" (mean)}]}.
    ``gen_self_nll`` estimates the model's entropy, and ``gen_kl`` KL(model || teacher), only at ``temperature`` 1 (the
    model scores its samples at temperature 1).
    Raises UsageError when a model or teacher directory has no config.json, the prompts file has no prompts or is plain
    text with no prompt at all (``on_policy.check_prompts``), or the tokenizers differ.
    """
    start = time.perf_counter()
    require_model_dir(model_dir)
    require_model_dir(teacher_dir, "--teacher ")
    tokenizer = models.load_tokenizer(str(model_dir))
    models.shared_vocab_size(str(model_dir), tokenizer, [str(teacher_dir)])  # the teacher must score the same tokens
    dataset = data.get_dataset(prompts_path, tokenizer, seq_len=seq_len)
    if len(dataset) == 0:
        raise UsageError(
            f"--generation_prompts {prompts_path!r}: no example has a completion token within --seq_len {seq_len} "
            f"(every prompt fills it): raise --seq_len or shorten the prompts"
        )
    on_policy.check_prompts(dataset, f"--generation_prompts {prompts_path!r}")
    model, teacher = load_model(model_dir), load_model(teacher_dir)
    # The model's own stop tokens (generation_config.json, then the tokenizer's eos); padding rows never sampled.
    generator = on_policy.HFGenerator(lambda: model, tokenizer, generation_config=model.generation_config, synced=False)
    stops, pad = generator.stop_token_ids, generator.pad
    sampling = on_policy.Sampling(max_new_tokens, temperature)
    samples, nll_sum, self_sum, n_tokens, n_eos = [], 0.0, 0.0, 0, 0
    for k, lo in enumerate(range(0, len(dataset), batch_size)):
        rows = dataset[lo : lo + batch_size]
        prompts = [ids[: on_policy.prompt_length(lab)] for ids, lab in zip(rows["input_ids"], rows["labels"])]
        completions = generator.generate(prompts, sampling, seed=on_policy.mix_seed(seed, k))
        # Right-padded prompt + sample; position t's logits predict token t + 1.
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            ids[b, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            mask[b, : len(p) + len(c)] = 1
        logprobs = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        own = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for b, (p, c, example_id) in enumerate(zip(prompts, completions, rows["id"])):
            positions, tokens = torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c, dtype=torch.long)
            token_nll = -logprobs[b, positions, tokens]
            nll_sum += token_nll.sum().item()
            self_sum -= own[b, positions, tokens].sum().item()
            n_tokens += len(c)
            n_eos += bool(c) and c[-1] in stops
            samples.append(
                {
                    "id": example_id,
                    "completion": tokenizer.decode(c),
                    "completion_ids": c,
                    "nll": token_nll.mean().item() if c else None,
                }
            )
    return {
        "gen_nll": nll_sum / max(n_tokens, 1),
        "gen_self_nll": self_sum / max(n_tokens, 1),
        "gen_kl": (nll_sum - self_sum) / max(n_tokens, 1),
        "gen_tokens": n_tokens,
        "gen_prompts": len(samples),
        "gen_mean_len": n_tokens / max(len(samples), 1),
        "gen_eos_fraction": n_eos / max(len(samples), 1),
        "gen_seconds": time.perf_counter() - start,
        "samples": samples,
    }


def _named(models_: list[str]) -> dict[str, str]:
    """{NAME: MODEL_DIR} from ``[NAME=]MODEL_DIR`` arguments; raises UsageError on a repeated name."""
    named = {}
    for arg in models_:
        name, sep, path = arg.partition("=")
        if not sep:
            path = arg
            p = Path(arg.rstrip("/"))
            name = p.parent.name if p.name in ("final", "best") and p.parent.name else p.name
        if name in named:
            raise UsageError(
                f"two models are named {name!r} ({named[name]} and {path}): name them, e.g. {name}_2={path}"
            )
        named[name] = path
    return named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), allow_abbrev=False)
    parser.add_argument(
        "model_dir",
        nargs="+",
        help="Hugging Face model directory (config.json, weights, tokenizer); several as [NAME=]DIR with --json_dir",
    )
    parser.add_argument(
        "--data", required=True, help="held-out data, any form ds_distill.train reads (e.g. eval.jsonl)"
    )
    parser.add_argument(
        "--seq_len", type=int, required=True, help="tokens per example; longer ones are truncated as in training"
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=4,
        help="examples per forward pass; perplexity does not depend on it, the generation metric's samples do "
        "(batch k is seeded by (seed, k))",
    )
    parser.add_argument("--json", help="also write the result to this JSON file (one model)")
    parser.add_argument("--json_dir", help="write each model's result to DIR/NAME.json")
    gen = parser.add_argument_group(
        "generation metric (the teacher's and the model's own NLL of the model's samples; needs both flags)"
    )
    gen.add_argument(
        "--generation_prompts", help="held-out prompt/completion or messages records whose prompts the model continues"
    )
    gen.add_argument("--teacher", help="the model directory that scores the samples (same tokenizer)")
    gen.add_argument("--max_new_tokens", type=int, default=64, help="most tokens sampled per prompt")
    gen.add_argument("--generation_temperature", type=float, default=1.0, help="sampling temperature of the model")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (batch k is seeded by (seed, k))")
    args = parser.parse_args(argv)
    return run_cli(lambda: evaluate_all(args))


def evaluate_all(args: argparse.Namespace) -> None:
    """``main``'s work: every model directory checked first, then each one evaluated, printed and written."""
    if bool(args.generation_prompts) != bool(args.teacher):
        raise UsageError(
            "--generation_prompts and --teacher go together: pass both for the generation metric, or neither"
        )
    if args.max_new_tokens < 1 or args.generation_temperature <= 0:
        raise UsageError(
            f"--max_new_tokens {args.max_new_tokens} must be >= 1 and --generation_temperature "
            f"{args.generation_temperature} > 0"
        )
    if args.json and len(args.model_dir) > 1:
        raise UsageError(
            f"--json names one file but {len(args.model_dir)} models were given: use --json_dir DIR "
            "(DIR/NAME.json each)"
        )
    named = _named(args.model_dir)
    for d in named.values():  # every directory checked before the first (slow) evaluation
        require_model_dir(d)
    if args.json_dir:
        Path(args.json_dir).mkdir(parents=True, exist_ok=True)
    shared = dict(seq_len=args.seq_len, batch_size=args.batch_size)
    for name, model_dir in named.items():
        r = perplexity(model_dir, args.data, **shared)
        print(
            f"evaluate: {model_dir}: ppl {r['ppl']:.2f} (ce {r['ce']:.4f} over {r['tokens']} tokens, "
            f"{r['seconds']:.0f} s)"
        )
        if args.generation_prompts:
            sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.generation_temperature, seed=args.seed)
            r.update(generation_nll(model_dir, args.generation_prompts, teacher_dir=args.teacher, **sampling, **shared))
            print(
                f"evaluate: {model_dir}: teacher NLL of its samples {r['gen_nll']:.4f} nats/token over "
                f"{r['gen_tokens']} tokens ({r['gen_prompts']} prompts, {r['gen_mean_len']:.1f} tokens per sample, "
                f"{r['gen_eos_fraction']:.0%} ended in a stop token, {r['gen_seconds']:.0f} s); own NLL "
                f"{r['gen_self_nll']:.4f}, KL estimate {r['gen_kl']:.4f}"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        if args.json_dir:
            (Path(args.json_dir) / f"{name}.json").write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    sys.exit(main())
