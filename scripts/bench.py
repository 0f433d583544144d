"""Throughput of ds-distill's own training step against a plain PyTorch loop on the same models, data and loss.

    python scripts/bench.py --preset cpu                                   # tiny shapes, seconds, CI smoke
    python scripts/bench.py --preset demo --cpu_threads 2 --steps 3        # the demo's shapes (vocab 49152), CPU
    python scripts/bench.py --preset h100 --variants plain_full,plain_chunked,ds_z3,ds_z3_teacher_zero3 \
        --json bench.json --markdown bench.md                              # the shapes of issue 9 on one GPU

Random Llama teacher/student models of the preset's shapes, a word-level tokenizer with exactly ``vocab`` tokens and a
jsonl corpus of random words (every row exactly ``seq_len`` tokens) are written once into a temporary folder. Each
variant then runs in its own process (``--worker``), so peak memory is per variant: ``warmup`` + ``steps`` optimizer
steps, each timed to the end of the device's work. Variants:

    plain_full        plain PyTorch loop, full [tokens, V] logits           (the reference of the "vs plain" column)
    plain_chunked     plain PyTorch loop, loss in token chunks (losses.chunked_loss_sums), checkpointed chunks
                      (the lm_head passed as a bare module: both heads run again in backward)
    plain_fused       the same with the lm_head as a losses.OutputHead: gradients computed in the forward
    teacher_forward   the teacher's forward alone (a ceiling, no student)
    ds_z{0,1,2,3}[_teacher_zero3|_teacher_replicated][_full_logits|_checkpointed][_prefetch][_lora][_gc][_xtok_M]
                      ds_distill.core.build.build(RunConfig(...)) + Trainer.train_step, exactly as Trainer.fit calls it;
                      student ZeRO stage k; teacher placed as the toolkit chooses when no teacher JSON is given (by
                      fit: replicated on one rank), or forced to ZeRO-3 / replicated (stage 0); chunked loss
                      (RunConfig's default chunk_size; the fused path, ZeRO-3 head included), full
                      logits (chunk_size 0), or the chunked loss forced onto its checkpointed path (an experiment);
                      _prefetch: micro-batches drawn 2 ahead on a background thread, pinned on GPU
                      (--prefetch_batches 2);
                      _lora: a LoRA student (LORA_R on every linear layer of the decoder; only the adapters train);
                      _gc: --gradient_checkpointing (the student's decoder layers recomputed in backward);
                      _xtok_alm, _xtok_vocab_map: a teacher of the same shape with another tokenizer
                      (--xtok_tokenizer, else a byte-level BPE trained on the corpus), --cross_tokenizer M.

Cross-tokenizer cost at the demo's shape (the demo's student and text, a teacher of SmolLM2-135M's shape with another
tokenizer's vocabulary; the tokenizer folder any fast tokenizer, e.g. Mistral's Tekken converted from mistral-common's
data with transformers' MistralConverter):

    python scripts/bench.py --preset demo --micro_batch 4 --student_model STUDENT --data_file TRAIN.jsonl \
        --xtok_tokenizer TOKENIZER --variants ds_z3,ds_z3_xtok_alm,ds_z3_xtok_vocab_map

Both loops use loss 0.5 CE + 0.5 forward KL (T = 1) through ``ds_distill.losses``, AdamW (lr 1e-4, betas 0.9/0.95),
gradient clipping 1.0 and micro-batches from ``ds_distill.data``. On GPU the DeepSpeed JSONs are the shipped bf16 ones
and the plain loop uses torch autocast bf16 with fp32 master weights and fused AdamW; on CPU everything is fp32.
The JSONs are copied with only ``train_micro_batch_size_per_gpu`` changed; ZeRO stage 0 (no shipped file) is the
stage-1 file with ``stage`` set to 0.

FLOPs per step: 6 * N_student * tokens + 2 * N_teacher * tokens (N counts tied embeddings once; attention score
FLOPs and the chunked loss's recomputed heads are not counted). MFU = achieved / peak bf16 dense FLOP/s of the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "ds_configs"
REFERENCE = "plain_full"
PLAIN = ("plain_full", "plain_chunked", "plain_fused", "teacher_forward")
DS_VARIANT = re.compile(
    r"^ds_z([0-3])(?:_teacher_(zero3|replicated))?(_full_logits|_checkpointed)?(_prefetch)?(_lora)?(_gc)?"
    r"(?:_xtok_(alm|vocab_map))?$"
)
LORA_R = 16  # the _lora variants: rank 16 on every linear layer of the decoder (--lora_r 16 --lora_alpha 32)

# Peak dense bf16 tensor FLOP/s (no sparsity), by the first name fragment found in torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class Shape:
    """One model's Llama shape."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass
class Preset:
    teacher: Shape
    student: Shape
    variants: str  # run by default
    vocab: int = 49152  # tokenizer and embedding rows (SmolLM2's)
    micro_batch: int = 2  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence
    warmup: int = 2  # untimed optimizer steps
    steps: int = 5  # timed optimizer steps


SMOLLM2_135M = Shape(30, 576, 9, 3, 1536)
PRESETS = {
    # SmolLM2-1.7B-like teacher (1.71B params) and SmolLM2-135M-like student (134.5M), as in issue 9.
    "h100": Preset(
        Shape(24, 2048, 32, 32, 8192),
        SMOLLM2_135M,
        "teacher_forward,plain_full,plain_chunked,ds_z0,ds_z3,ds_z3_teacher_zero3",
        micro_batch=4,
        seq_len=2048,
        warmup=3,
        steps=10,
    ),
    # Runs in seconds on a laptop CPU.
    "cpu": Preset(
        Shape(4, 256, 4, 4, 1024),
        Shape(2, 128, 4, 2, 384),
        "plain_full,plain_chunked,ds_z0,ds_z3,ds_z3_teacher_zero3,ds_z3_full_logits",
        vocab=4096,
    ),
    # The demo (scripts/demo.sh) per rank: SmolLM2-135M's shape as teacher (30 layers), its 7-layer student (the
    # shape of the demo's student_0_5_10_15_20_25_29), 2 x 128 tokens per micro-batch; random weights. Minutes on 2
    # CPU cores.
    "demo": Preset(
        SMOLLM2_135M, Shape(7, 576, 9, 3, 1536), "plain_full,plain_chunked,plain_fused,ds_z3,ds_z3_checkpointed"
    ),
}


# ------------------------------------------------------------------------------------------- models and data
def make_tokenizer(folder: Path, vocab: int):
    """A word-level tokenizer of exactly ``vocab`` tokens: <pad> <s> </s> <unk>, then "w4" ... one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(folder)
    return tok


def make_bpe_tokenizer(folder: Path, corpus: Path, vocab: int):
    """A byte-level BPE of ``vocab`` tokens trained on the corpus's texts: another tokenizer than make_tokenizer's
    (its words split into pieces), for the _xtok variants when no --xtok_tokenizer is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator((json.loads(line)["text"] for line in corpus.open()), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(folder)
    return tok


def make_model(folder: Path, tok, shape: Shape, vocab: int, seq_len: int, seed: int) -> int:
    """Save a random LlamaForCausalLM (tied embeddings, like SmolLM2) with the tokenizer beside it; return its
    parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(seq_len, 2048),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    gpu = torch.cuda.is_available()
    with torch.device("cuda" if gpu else "cpu"):  # initialising 1.7B parameters is minutes on a CPU, seconds on a GPU
        model = LlamaForCausalLM(config)
    if gpu:
        model = model.to(torch.bfloat16)  # half the disk and load time; both loops load it in their own dtype
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def make_data(path: Path, vocab: int, seq_len: int, rows: int, seed: int = 0) -> None:
    """Rows of ``seq_len`` random words: with <s> in front they are truncated to exactly ``seq_len`` tokens."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(seq_len))}) + "\n")


def ds_configs(
    variant: str, workdir: Path, micro_batch: int, gpu: bool, zero_set: list[str] = ()
) -> tuple[str, str, bool]:
    """(student JSON, teacher JSON or "" for the toolkit's choice, full_logits) for a ds_* variant: shipped files
    copied with only the micro-batch changed (and the stage, for ZeRO stage 0). ``zero_set``: "key=value"
    experiments written into the ``zero_optimization`` block of every ZeRO-3 copy (``--zero_set``; off by default)."""
    stage, teacher_kind, full, *_ = DS_VARIANT.match(variant).groups()
    student_file = f"zero{max(int(stage), 1)}_bf16.json" if gpu else f"cpu_zero{max(int(stage), 1)}.json"
    files = {"student": student_file}
    if teacher_kind:
        files["teacher"] = f"teacher_{teacher_kind}_bf16.json" if gpu else f"cpu_teacher_{teacher_kind}.json"
    paths = {"teacher": ""}
    for name, file in files.items():
        d = json.loads((CONFIGS / file).read_text())
        if name == "student" and stage == "0":
            d["zero_optimization"]["stage"] = 0
        d["train_micro_batch_size_per_gpu"] = micro_batch
        if d["zero_optimization"]["stage"] == 3:
            for item in zero_set:
                key, value = item.split("=", 1)
                d["zero_optimization"][key] = json.loads(value)
        p = workdir / "configs" / f"{variant}.{name}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(d, indent=2))
        paths[name] = str(p)
    return paths["student"], paths["teacher"], full == "_full_logits"


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], None], device, warmup: int, steps: int, profile: str = ""
) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of each timed step, measured to the end of the device's work (one sync
    per step). On a shared CPU the CPU seconds (all threads of this process) measure the step's work; wall time also
    measures the neighbours."""
    import torch

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steady-state peak, not the loading
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM) to the current RSS
    prof = None
    if profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        prof = torch.profiler.profile(activities=acts, record_shapes=False)
        prof.__enter__()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if prof is not None:
        prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(profile).write_text(
            f"{steps} steps\n" + prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
        )
    return times, cpu


def peak_gib(device) -> float:
    """GPU: the most memory allocated by tensors during the timed steps. CPU: peak RSS of the process during the
    timed steps (Linux's VmHWM, reset after the warm-up), else of its whole life (loading included)."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def plain_step(a: argparse.Namespace, device) -> Callable[[], None]:
    """The reference loop: teacher forward without grad, student forward, loss, backward, clip, AdamW, zero_grad."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_distill import data, losses

    gpu = device.type == "cuda"
    tok = AutoTokenizer.from_pretrained(a.student)
    dataset = data.get_dataset(a.data, tok, seq_len=a.seq_len)
    stream = data.BatchStream(
        dataset, batch_size=a.micro_batch, rank=0, world_size=1, seed=42, pad_token_id=tok.pad_token_id
    )
    load = lambda path, dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(
        device
    )
    teacher = load(a.teacher, torch.bfloat16 if gpu else torch.float32).eval().requires_grad_(False)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if gpu else contextlib.nullcontext
    vocab = len(tok)
    if a.variant == "teacher_forward":

        def step() -> None:
            batch = next(stream).to(device).inputs
            with torch.no_grad(), autocast():
                teacher.lm_head(teacher.model(**batch, use_cache=False).last_hidden_state)

        return step

    student = load(a.student, torch.float32).train()  # fp32 master weights; autocast computes in bf16 on GPU
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=gpu)
    loss_kw = dict(loss="forward_kl", alpha=0.5, temperature=1.0, vocab_size=vocab)

    def step() -> None:
        micro = next(stream).to(device)
        batch, labels = micro.inputs, micro.labels.to(device, non_blocking=True)
        with autocast():
            with torch.no_grad():
                t_hidden = teacher.model(**batch, use_cache=False).last_hidden_state
            s_hidden = student.model(**batch, use_cache=False).last_hidden_state
            if a.variant in ("plain_chunked", "plain_fused"):
                head = losses.OutputHead(student.lm_head) if a.variant == "plain_fused" else student.lm_head
                out = losses.chunked_loss_sums(
                    s_hidden, head, t_hidden, teacher.lm_head, labels, chunk_size=a.chunk_size, **loss_kw
                )
            else:
                with torch.no_grad():
                    t_logits = teacher.lm_head(t_hidden)
                out = losses.loss_sums(student.lm_head(s_hidden), t_logits, labels, **loss_kw)
        (out.total / out.n_tokens.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def toolkit_step(a: argparse.Namespace, device) -> Callable[[], None]:
    """ds_distill's own path: build() from a RunConfig, then train_step over one optimizer step, as Trainer.fit does."""
    from ds_distill.config import RunConfig
    from ds_distill.core.build import build

    sds, tds, full = ds_configs(a.variant, Path(a.workdir), a.micro_batch, device.type == "cuda", a.zero_set)
    xtok = DS_VARIANT.match(a.variant).group(7) or ""  # --cross_tokenizer method: the teacher of another tokenizer
    if "_checkpointed" in a.variant:
        from ds_distill.losses import chunked

        chunked.fusable = lambda head: False  # experiment only: the chunked loss's previous (checkpointed) path
    cfg = RunConfig(
        teacher=[str(Path(a.workdir) / "xtok_teacher") if xtok else a.teacher],
        cross_tokenizer=xtok,
        student=a.student,
        data=a.data,
        output_dir=str(Path(a.workdir) / "runs" / a.variant),
        deepspeed_config=sds,
        teacher_deepspeed_config=tds,
        chunk_size=0 if full else a.chunk_size,
        seq_len=a.seq_len,
        eval_fraction=0.0,
        max_steps=a.warmup + a.steps,
        export=False,
        prefetch_batches=2 if "_prefetch" in a.variant else 0,
        lora_r=LORA_R if "_lora" in a.variant else 0,
        lora_alpha=2.0 * LORA_R if "_lora" in a.variant else 0.0,
        gradient_checkpointing=bool(DS_VARIANT.match(a.variant).group(6)),
    )
    trainer = build(cfg)
    if trainer.ds.grad_accum != 1:
        raise SystemExit(f"{sds}: gradient_accumulation_steps must be 1 for tokens per step = micro batch x seq_len")

    def step() -> None:
        micro_batches = [next(trainer.train) for _ in range(trainer.ds.grad_accum)]
        trainer.train_step(micro_batches, trainer.sync.plan([b.labels for b in micro_batches]))
        trainer.step += 1

    step.trainer = trainer  # for --checkpoint_size
    return step


def checkpoint_mib(trainer) -> float:
    """Size of one checkpoint tag of the trainer's state (DeepSpeed's files, RNG, hf/), written after the timed
    steps."""
    tag = trainer.ckpt_root / trainer.save()
    return sum(f.stat().st_size for f in tag.rglob("*") if f.is_file()) / 2**20


def worker(a: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process; returns its measurements (written to ``--result`` as JSON)."""
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    make = plain_step if a.variant in PLAIN else toolkit_step
    step = make(a, device)
    times, cpu = time_steps(step, device, a.warmup, a.steps, a.profile)
    peak = peak_gib(device)  # before the checkpoint: the training steps' peak
    return {
        "variant": a.variant,
        "step_s": times,
        "cpu_s": cpu,
        "peak_gib": peak,
        "device": _device_name(device),
        "checkpoint_mib": checkpoint_mib(step.trainer) if a.checkpoint_size and hasattr(step, "trainer") else None,
    }


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------------------------------------------- driver
def summarise(
    results: list[dict[str, Any]], *, tokens_per_step: int, n_student: int, n_teacher: int
) -> list[dict[str, Any]]:
    """Add tokens/s, median step, TFLOP/s, MFU and the ratio to the plain loop (plain_full, else plain_chunked)."""
    rows = []
    for r in results:
        times = r["step_s"]
        tps = tokens_per_step * len(times) / sum(times)
        flops = (
            2 * n_teacher if r["variant"] == "teacher_forward" else 6 * n_student + 2 * n_teacher
        ) * tokens_per_step
        tflops = flops * len(times) / sum(times) / 1e12
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in r["device"]), None)
        rows.append(
            {
                **r,
                "tokens_per_s": tps,
                "median_step_s": statistics.median(times),
                "median_cpu_s": statistics.median(r["cpu_s"]) if r.get("cpu_s") else None,
                "tflops": tflops,
                "mfu": tflops * 1e12 / peak if peak else None,
            }
        )
    by_name = {r["variant"]: r for r in rows}
    ref = by_name.get(REFERENCE) or by_name.get("plain_chunked")
    for r in rows:
        r["reference"] = ref["variant"] if ref else None
        r["vs_plain"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    return rows


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    ref = rows[0]["reference"] if rows else None
    lines = [
        header,
        "",
        f"| variant | tokens/s | median step (ms) | median CPU (ms) | peak GiB | TFLOP/s | MFU | vs {ref or 'plain'} "
        "| checkpoint MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['vs_plain']:.2f}x" if r["vs_plain"] is not None else "n/a"
        cpu = f"{1000 * r['median_cpu_s']:.1f}" if r.get("median_cpu_s") is not None else "n/a"
        ckpt = f"{r['checkpoint_mib']:.1f}" if r.get("checkpoint_mib") is not None else "n/a"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {1000 * r['median_step_s']:.1f} | {cpu} | "
            f"{r['peak_gib']:.2f} "
            f"| {r['tflops']:.3f} | {mfu} | {ratio} | {ckpt} |"
        )
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the models once, run every variant in its own process, print (and optionally write) the table."""
    a = parse_args(argv)
    preset = PRESETS[a.preset]
    for name in ("micro_batch", "seq_len", "warmup", "steps", "variants"):
        if getattr(a, name) is None:
            setattr(a, name, getattr(preset, name))
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in PLAIN and not DS_VARIANT.match(v)]
    if bad:
        raise SystemExit(
            f"error: unknown --variants {bad}: use {', '.join(PLAIN)} or "
            f"ds_z{{0,1,2,3}}[_teacher_zero3|_teacher_replicated][_full_logits|_checkpointed][_prefetch][_lora][_gc]"
            "[_xtok_alm|_xtok_vocab_map]"
        )

    import torch

    gpu = torch.cuda.is_available()
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="ds_distill_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data_file = Path(a.data_file) if a.data_file else workdir / "train.jsonl"
        if not a.data_file:
            rows_needed = (a.warmup + a.steps) * a.micro_batch + a.micro_batch
            make_data(data_file, preset.vocab, a.seq_len, rows_needed)
        if a.student_model:  # a real student: its weights and tokenizer; the teacher shares the tokenizer
            from transformers import AutoModelForCausalLM, AutoTokenizer

            student_dir, tok = Path(a.student_model), AutoTokenizer.from_pretrained(a.student_model)
            n_student = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(student_dir).parameters())
        else:
            student_dir, tok = workdir / "student", make_tokenizer(workdir / "tok", preset.vocab)
            n_student = make_model(student_dir, tok, preset.student, preset.vocab, a.seq_len, seed=2)
        n_teacher = make_model(workdir / "teacher", tok, preset.teacher, len(tok), a.seq_len, seed=1)
        xtok = ""
        if any(DS_VARIANT.match(v) and DS_VARIANT.match(v).group(7) for v in variants):
            from transformers import AutoTokenizer

            other = (
                AutoTokenizer.from_pretrained(a.xtok_tokenizer)
                if a.xtok_tokenizer
                else make_bpe_tokenizer(workdir / "xtok_tok", data_file, min(preset.vocab, 2048))
            )
            n_xtok = make_model(workdir / "xtok_teacher", other, preset.teacher, len(other), a.seq_len, seed=3)
            xtok = f", _xtok teacher {n_xtok / 1e6:.1f}M params (vocab {len(other)})"
        env = {**worker_env(sys.executable), **one_rank_env()}
        if not gpu:
            # One intra-op thread per worker unless told otherwise: on a small shared CPU, OpenMP threads waiting for
            # each other made the plain loop's step 12x slower (see docs/performance.md), which measures the neighbours.
            env["OMP_NUM_THREADS"] = str(a.cpu_threads)
            env.setdefault("DS_ACCELERATOR", "cpu")
            env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        results = []
        for v in variants:
            result, log = workdir / f"{v}.result.json", workdir / f"{v}.log"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--variant",
                v,
                "--workdir",
                str(workdir),
                "--teacher",
                str(workdir / "teacher"),
                "--student",
                str(student_dir),
                "--data",
                str(data_file),
                "--result",
                str(result),
                "--micro_batch",
                str(a.micro_batch),
                "--seq_len",
                str(a.seq_len),
                "--warmup",
                str(a.warmup),
                "--steps",
                str(a.steps),
                "--chunk_size",
                str(a.chunk_size),
                *(f"--zero_set={z}" for z in a.zero_set),
                *(["--checkpoint_size"] if a.checkpoint_size else []),
            ]
            if a.profile:
                Path(a.profile).mkdir(parents=True, exist_ok=True)
                cmd += ["--profile", str(Path(a.profile).resolve() / f"{v}.txt")]
            with open(log, "w") as fh:
                proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
                raise SystemExit(f"error: variant {v} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
            results.append(json.loads(result.read_text()))
        tokens_per_step = a.micro_batch * a.seq_len
        rows = summarise(results, tokens_per_step=tokens_per_step, n_student=n_student, n_teacher=n_teacher)
        device = rows[0]["device"] if rows else "?"
        header = (
            f"preset {a.preset}: teacher {n_teacher / 1e6:.1f}M params, student {n_student / 1e6:.1f}M, vocab "
            f"{len(tok)}{xtok}, "
            f"{a.micro_batch} x {a.seq_len} tokens per step, {a.warmup} warm-up + {a.steps} timed steps, {device}, "
            f"{time.strftime('%Y-%m-%d')}" + (f", zero_optimization overrides {a.zero_set}" if a.zero_set else "")
        )
        table = markdown(rows, header)
        print(table)
        report = {
            "preset": a.preset,
            "header": header,
            "n_student": n_student,
            "n_teacher": n_teacher,
            "tokens_per_step": tokens_per_step,
            "shapes": asdict(preset),
            "rows": rows,
        }
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2))
        if a.markdown:
            Path(a.markdown).write_text(table)
        return report
    finally:
        if not a.workdir and not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="Model shapes and defaults (see PRESETS).")
    p.add_argument("--variants", help="Comma-separated variants (see the module docstring). Default: the preset's.")
    p.add_argument("--micro_batch", type=int, help="Sequences per step (written into the DeepSpeed JSON copies).")
    p.add_argument("--seq_len", type=int, help="Tokens per sequence.")
    p.add_argument("--warmup", type=int, help="Untimed optimizer steps first.")
    p.add_argument("--steps", type=int, help="Timed optimizer steps.")
    p.add_argument(
        "--chunk_size",
        type=int,
        default=1024,
        help="Tokens per loss chunk of the chunked variants (RunConfig's default).",
    )
    p.add_argument(
        "--student_model", default="", help="A real student folder (weights and tokenizer) instead of a random one."
    )
    p.add_argument("--data_file", default="", help="A jsonl of texts instead of random words.")
    p.add_argument(
        "--xtok_tokenizer",
        default="",
        help="_xtok variants: the teacher's tokenizer folder (another than the student's). Default: a byte-level BPE "
        "trained on the corpus.",
    )
    p.add_argument("--cpu_threads", type=int, default=1, help="OMP_NUM_THREADS of each worker on CPU (ignored on GPU).")
    p.add_argument(
        "--zero_set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="Experiment: set zero_optimization.KEY in the ZeRO-3 copies, e.g. "
        "stage3_param_persistence_threshold=1e9 (repeatable).",
    )
    p.add_argument(
        "--checkpoint_size",
        action="store_true",
        help="ds_* variants: save one checkpoint after the timed steps and report its size (MiB).",
    )
    p.add_argument("--json", default="", help="Write the full results (per-step times included) to this JSON file.")
    p.add_argument("--markdown", default="", help="Write the table to this Markdown file.")
    p.add_argument(
        "--profile", default="", help="Folder for one torch.profiler op table per variant (timed steps only)."
    )
    p.add_argument(
        "--workdir", default="", help="Where models and data go (kept). Default: a temporary folder, removed."
    )
    p.add_argument("--keep", action="store_true", help="Keep the temporary folder (its path is in the header of logs).")
    # Internal: one variant in this process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("variant", "teacher", "student", "data", "result"):
        p.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker_env(python: str) -> dict[str, str]:
    """The environment of a worker run by ``python``: this one's, offline, ROOT importable, and the interpreter's folder
    first on PATH, as in an activated venv. torch JIT-builds DeepSpeed's ops (the CPU comm op every rank loads at
    start-up) with the first ``ninja`` on PATH, and the system's and the venv's ninja do not read each other's build
    log: a worker run as ``.venv/bin/python`` without the venv on PATH rebuilt the op (~60 s of CPU, minutes on a
    loaded machine) whenever the suite or the demo (venv first: scripts/test.sh, demo.sh) had built it last, and that
    rebuild was the start-up column's spread (docs/performance.md, issue 28's start-up split)."""
    return {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PATH": f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def one_rank_env() -> dict[str, str]:
    """The torch launcher variables of a worker that is a world of its own: rank 0 of 1 on a random port below the
    ephemeral range. Every one is set, none inherited: a parent that holds a process group (pytest's in-process
    tests, a launched job) exports its MASTER_PORT, and a worker binding it fails with EADDRINUSE; a port picked by
    binding to 0 can be taken by another process's connection before the rank listens (seen on the shared machine)."""
    return {
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(random.randrange(20000, 32768)),
    }


def dispatch(
    argv: list[str] | None,
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    run: Callable[[list[str] | None], Any],
    worker: Callable[[argparse.Namespace], dict[str, Any]],
) -> int:
    """The entry point of a bench script (this one and bench_peer.py): the parent (``run``) starts each measurement in
    its own process as ``--worker``, which writes ``worker(args)``'s result as JSON to ``--result``."""
    a = parse_args(argv)
    if a.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        Path(a.result).write_text(json.dumps(worker(a)))
    else:
        run(argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    return dispatch(argv, parse_args, run, worker)


if __name__ == "__main__":
    sys.exit(main())
