"""Held-out perplexity of a Hugging Face model directory, on the same tokenised examples the trainer evaluates.

    python -m ds_distill.evaluate MODEL_DIR --data eval.jsonl --seq_len 256 [--batch_size 4] [--json out.json]

Perplexity = exp(sum of next-token CE over every supervised token / number of those tokens), over the whole file
(examples truncated to `seq_len` as in training, via `data.get_dataset`), so numbers of different models on the
same file and `seq_len` compare token for token. One process, no DeepSpeed: it runs on the exported `final/` folders.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ds_distill import data
from ds_distill.config import UsageError


@torch.no_grad()
def perplexity(model_dir: str | os.PathLike, data_path: str, *, seq_len: int, batch_size: int = 4) -> dict[str, float]:
    """{"ppl", "ce" (nats per token), "tokens" (supervised tokens scored), "seconds"} of `model_dir` on `data_path`.

    Logits are computed over the model's full output rows but CE only needs the label's row, so rows padded beyond
    the tokenizer (never a label) do not change the result.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise UsageError(f"{model_dir} has no config.json: pass a Hugging Face model directory (e.g. a run's final/)")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dataset = data.get_dataset(data_path, tokenizer, seq_len=seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ce_sum, n_tokens = 0.0, 0
    for lo in range(0, len(dataset), batch_size):
        batch = data.collate(dataset[lo: lo + batch_size], pad_token_id=pad)
        labels = batch.pop("labels")
        batch.pop("example_ids")
        logits = model(**batch).logits.float()  # [B, T, V]
        ce_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        n_tokens += int((labels != -100).sum())
    ce = ce_sum / max(n_tokens, 1)
    return {"ppl": math.exp(min(ce, 50.0)), "ce": ce, "tokens": n_tokens, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="Hugging Face model directory (config.json, weights, tokenizer)")
    parser.add_argument("--data", required=True, help="held-out data, any form ds_distill.train reads (e.g. eval.jsonl)")
    parser.add_argument("--seq_len", type=int, required=True, help="tokens per example; longer ones are truncated as in training")
    parser.add_argument("--batch_size", type=int, default=4, help="examples per forward pass (memory only; the result is the same)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    try:
        result = perplexity(args.model_dir, args.data, seq_len=args.seq_len, batch_size=args.batch_size)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"evaluate: {args.model_dir}: ppl {result['ppl']:.2f} (ce {result['ce']:.4f} over {result['tokens']} tokens, {result['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
