"""Make the demo corpus: CPython's pydoc help topics as train.jsonl / eval.jsonl (no download needed).

`pydoc_data.topics.topics` maps ~80 topic names ("assert", "for", "specialnames", ...) to reference-manual text,
~0.5 MB in all. Each topic is cut into records of whole paragraphs, and whole topics go to either train or eval,
so eval text is never seen in training (paragraphs of one topic repeat phrases).

    python scripts/prepare_data.py --out data/pydoc [--eval_fraction 0.1] [--seed 0]

Each line: {"id": int (unique across both files), "topic": str, "text": str}. Deterministic for a given Python
version (the topics text changes between CPython releases); re-running rewrites the same files.

The same records are also written as prompt/completion pairs, train_prompts.jsonl / eval_prompts.jsonl (same ids
and topics; prompt + completion == text): the prompt is the record's first lines (at most PROMPT_CHARS characters),
the completion the rest. On-policy training samples completions for the train prompts; the evaluation's generation
metric samples them for the eval prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

# Record size in characters (~4 characters per token for English prose, so ~500 tokens): small enough that a
# short training sequence sees most of a record, large enough to keep paragraphs in context.
CHUNK_CHARS = 2000
# Prompt size in characters (~50 tokens): a record's heading or first sentence, leaving most of a 128-token sequence
# for the sampled completion.
PROMPT_CHARS = 200


def chunk_paragraphs(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Greedily join consecutive blank-line-separated paragraphs into pieces of at most `max_chars` characters.

    A single paragraph longer than `max_chars` becomes its own piece (never cut mid-paragraph).
    """
    pieces, current = [], ""
    for para in (p.strip("\n") for p in text.split("\n\n")):
        if not para.strip():
            continue
        if current and len(current) + 2 + len(para) > max_chars:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return pieces


def split_topics(topics: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train topics, eval topics), both sorted; eval gets ceil(eval_fraction * n) topics chosen by `seed`."""
    if not 0 < eval_fraction < 1:
        raise SystemExit(f"error: --eval_fraction {eval_fraction} is outside (0, 1): pass e.g. 0.1")
    shuffled = sorted(topics)
    random.Random(seed).shuffle(shuffled)
    n_eval = math.ceil(eval_fraction * len(shuffled))
    return sorted(shuffled[n_eval:]), sorted(shuffled[:n_eval])


def build_records(topics: dict[str, str], eval_fraction: float = 0.1, seed: int = 0) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]} records; ids number the chunks of all topics in sorted-topic order."""
    train_topics, eval_topics = split_topics(list(topics), eval_fraction, seed)
    split_of = {t: "train" for t in train_topics} | {t: "eval" for t in eval_topics}
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    next_id = 0
    for topic in sorted(topics):
        for text in chunk_paragraphs(topics[topic]):
            out[split_of[topic]].append({"id": next_id, "topic": topic, "text": text})
            next_id += 1
    return out


def split_prompt(text: str, max_chars: int = PROMPT_CHARS) -> tuple[str, str]:
    """(prompt, completion) with prompt + completion == text: the prompt is the longest run of whole leading lines
    of at most `max_chars` characters (a first line longer than that is cut after its last space within the limit),
    never the whole text. The completion keeps the newline that starts it.
    """
    lines = text.split("\n")
    n = 0
    while n + 1 < len(lines) and len("\n".join(lines[: n + 1])) <= max_chars:
        n += 1
    if n:
        prompt = "\n".join(lines[:n])
    else:  # one long first line (or a one-line record)
        cut = text.rfind(" ", 1, min(max_chars, len(text) - 1))
        prompt = text[: cut if cut > 0 else min(max_chars, len(text) - 1)]
    return prompt, text[len(prompt) :]


def prompt_records(records: list[dict]) -> list[dict]:
    """The records as {"id", "topic", "prompt", "completion"} (see `split_prompt`)."""
    out = []
    for r in records:
        prompt, completion = split_prompt(r["text"])
        out.append({"id": r["id"], "topic": r["topic"], "prompt": prompt, "completion": completion})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    # Write then rename: a reader never sees a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="directory for {train,eval}.jsonl and {train,eval}_prompts.jsonl"
    )
    parser.add_argument("--eval_fraction", type=float, default=0.1, help="fraction of topics (not records) held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the topic split")
    args = parser.parse_args(argv)

    from pydoc_data.topics import topics

    records = build_records(topics, args.eval_fraction, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, recs in records.items():
        write_jsonl(args.out / f"{split}.jsonl", recs)
        write_jsonl(args.out / f"{split}_prompts.jsonl", prompt_records(recs))
        n_topics = len({r["topic"] for r in recs})
        n_chars = sum(len(r["text"]) for r in recs)
        print(
            f"prepare_data: {args.out / f'{split}.jsonl'}: {len(recs)} records, {n_topics} topics, {n_chars} "
            "characters "
            f"(and as prompt/completion pairs in {split}_prompts.jsonl)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
