"""Write prompt/completion records sampled from any model: sequence-level KD data (from the teacher), or a look at what
a student writes.

    python -m ds_distill.generate --model DIR --data prompts.jsonl --output out.jsonl [--max_new_tokens 128] \
        [--temperature 1.0] [--top_p 1.0] [--top_k 0] [--seed 0] [--batch_size 8]
    deepspeed --num_gpus 8 --module ds_distill.generate ...    # or mpirun / srun, as ds_distill.train
    python -m ds_distill.generate --model TOKENIZER_DIR --server_url http://127.0.0.1:8000 ...   # a vLLM-served model

Input: any --data that ds_distill.train reads, with a "prompt" field (other fields are ignored; ids as in training:
the data's "id" as given, else the row number). Output: JSON lines {"id", "prompt", "completion"} in input order, ready
as
--data for ds_distill.train. Rank r samples rows r, r + world, ... and appends each batch to ``OUTPUT.rank{r}`` as it
is done; rank 0 then merges every shard with the existing output. Resumable: prompts already in the output or in a
shard are skipped, so a killed or preempted job is simply run again. Sampling of a batch is seeded by (seed, the
batch's first row number). A sample ends at the model's first stop token (the eos ids of its generation_config.json,
then the tokenizer's eos), which is not written (training appends eos to every completion); padding rows of the
model's head (beyond the tokenizer) are never sampled; the model's own sampling defaults are not applied (the flags
above are what runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill import data, models, on_policy
from ds_distill.common import UsageError, print_error, write_atomic
from ds_distill.runtime import distributed

log = logging.getLogger("ds_distill")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_distill.generate", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face model directory (AutoModelForCausalLM + tokenizer); with --server_url only its tokenizer "
        "is read.",
    )
    p.add_argument(
        "--server_url",
        default="",
        help="Sample from the model an OpenAI-compatible server (vLLM) serves at this URL instead of loading --model; "
        "the server must use --model's tokenizer (checked). Each prompt is seeded by (--seed, its row number).",
    )
    p.add_argument("--requests", type=int, default=4, help="With --server_url: requests in flight together per rank.")
    p.add_argument("--timeout", type=float, default=300.0, help="With --server_url: seconds per request.")
    p.add_argument(
        "--data", required=True, help="Prompts: a file or folder ds_distill.train reads, with a 'prompt' field."
    )
    p.add_argument("--output", required=True, help="JSON lines file to write (appended to when resuming).")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = off.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8, help="Prompts per generate call on each rank.")
    p.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; ignored.")
    return p.parse_args(argv)


def read_records(path: Path) -> dict[int, dict]:
    """id -> record of a JSON lines output or shard; a last line cut short by a kill is dropped (it is redone)."""
    out = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["id"]] = rec
    return out


def hf_sampler(args: argparse.Namespace, tok):
    """Batches of ``--batch_size`` prompts sampled by ``--model`` in this process; a batch is seeded by (seed, its first
    row number)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    unset_hf_deepspeed_config()  # one whole model per rank: no ZeRO-3 partitioning left over in this process
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load model {args.model!r}: {str(exc).splitlines()[0]}") from None
    lm.to(device)
    # The model's own stop tokens (generation_config.json, then the tokenizer's eos); padding rows never sampled.
    generator = on_policy.HFGenerator(lambda: lm, tok, generation_config=lm.generation_config, synced=False)
    sampling = on_policy.Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k)

    def sample(todo: list, adds_eos: bool):
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            prompts = [tok(p)["input_ids"][: -1 if adds_eos else None] for _, _, p in batch]  # as data.py tokenises
            yield batch, generator.generate(prompts, sampling, seed=on_policy.mix_seed(args.seed, batch[0][0]))

    sample.stop_token_ids = generator.stop_token_ids
    return sample


def served_sampler(args: argparse.Namespace, tok):
    """Prompts sampled by the model a server (vLLM) serves at ``--server_url``, ``--requests`` in flight; each prompt is
    its own request seeded by (seed, its row number), so the records do not depend on batching, ranks or resumes."""
    import concurrent.futures

    from ds_distill.teachers.served import ServedModel
    from ds_distill.teachers.server_client import ServerClient

    client = ServerClient(args.server_url, timeout=args.timeout, flag="--server_url")
    client.wait_ready()
    ServedModel(client, 1, len(tok), 1.0).check(tok, 0)  # the server's tokenizer is --model's (one line if not)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.requests, thread_name_prefix="ds_distill-generate")

    def one(n: int, prompt: list[int]) -> list[int]:
        kw = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        return client.sample([prompt], seed=on_policy.mix_seed(args.seed, n), **kw)[0]

    def sample(todo: list, adds_eos: bool):
        futures = [pool.submit(one, n, tok(p)["input_ids"][: -1 if adds_eos else None]) for n, _, p in todo]
        try:
            for start in range(0, len(todo), args.batch_size):
                yield (
                    todo[start : start + args.batch_size],
                    [f.result() for f in futures[start : start + args.batch_size]],
                )
        finally:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=True)

    return sample


def generate(args: argparse.Namespace) -> int:
    """Sample this rank's missing prompts; rank 0 merges. Returns the number of records this rank wrote."""
    if (
        args.max_new_tokens < 1
        or args.temperature <= 0
        or not 0 < args.top_p <= 1
        or args.top_k < 0
        or args.batch_size < 1
        or args.requests < 1
    ):
        raise UsageError(
            f"generation flags out of range (--max_new_tokens {args.max_new_tokens} >= 1, --temperature "
            f"{args.temperature} > 0, "
            f"--top_p {args.top_p} in (0, 1], --top_k {args.top_k} >= 0, --batch_size {args.batch_size} >= 1, "
            f"--requests {args.requests} >= 1)"
        )
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UsageError(
            f"--output {args.output!r}: folder {str(output.parent)!r} does not exist: create it or pick another path"
        )
    world = distributed.init_distributed()
    raw, files = data.load_raw(args.data, "train")
    if "prompt" not in raw.column_names:
        raise UsageError(
            f"--data {args.data!r} has columns {raw.column_names}, no 'prompt': write one {{\"prompt\": ...}} per line"
        )
    ids = data.with_ids(raw, args.data, files)["id"]  # as training reads them: the data's ids, else row numbers
    shard = output.with_name(f"{output.name}.rank{world.rank}")
    done = set(read_records(output)) | set(read_records(shard))
    todo = [
        (n, i, p)
        for n, (i, p) in enumerate(zip(ids, raw["prompt"]))
        if n % world.world_size == world.rank and i not in done
    ]

    tok = models.load_tokenizer(args.model)
    adds_eos = tok("a")["input_ids"][-1:] == [tok.eos_token_id]
    if args.server_url:
        sample = served_sampler(args, tok)
    else:
        sample = hf_sampler(args, tok)
    stops = getattr(sample, "stop_token_ids", [tok.eos_token_id])  # a served model stops as its server does
    with open(shard, "a", encoding="utf-8") as fh:
        for batch, samples in sample(todo, adds_eos):
            for (_, i, p), new in zip(batch, samples):
                # The stop token that ended the sample is not written: training appends eos to every completion.
                new = new[:-1] if new[-1:] and new[-1] in stops else new
                fh.write(json.dumps({"id": i, "prompt": p, "completion": tok.decode(new)}) + "\n")
            fh.flush()
    distributed.barrier()
    if world.rank == 0:
        records = read_records(output)
        shards = [output.with_name(f"{output.name}.rank{r}") for r in range(world.world_size)]
        shards += [
            p for p in output.parent.glob(f"{output.name}.rank*") if p not in shards
        ]  # from a run with more ranks
        for s in shards:
            records.update(read_records(s))
        order = {i: n for n, i in enumerate(ids)}  # the input's order
        write_atomic(
            output,
            "".join(json.dumps(records[i]) + "\n" for i in sorted(records, key=lambda i: order.get(i, len(order)))),
        )
        for s in shards:
            s.unlink(missing_ok=True)
        log.info("wrote %d records to %s (%d new on rank 0)", len(records), output, len(todo))
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from ds_distill.extras.preemption import PREEMPTED_EXIT_CODE
        from ds_distill.teachers.server_client import ServerUnavailable

        try:
            generate(parse_args(argv))
        except ServerUnavailable as exc:  # what is written is kept: the same command resumes
            print_error(f"{exc}: records written so far are kept; run the same command again")
            return PREEMPTED_EXIT_CODE
        return 0

    return distributed.entry_point(body)


if __name__ == "__main__":
    sys.exit(main())
