"""The run config: one dataclass, read from an optional YAML/JSON run file and overridden by CLI flags.

DeepSpeed owns batch sizes, precision, ZeRO stage, optimizer, scheduler, clipping and monitors: those live only in the
JSON files of ``ds_configs/``, checked by ``ds_distill.ds_config`` and never rewritten.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ds_distill.common import UsageError, print_error
from ds_distill.data.loading import FORMATS, missing_paths
from ds_distill.losses.attention import RELATION_MAX_TOKENS
from ds_distill.losses.cross_tokenizer import CROSS_TOKENIZER
from ds_distill.losses.divergences import ENTROPY_THRESHOLD, LOSSES
from ds_distill.losses.hidden import HIDDEN_LOSSES
from ds_distill.losses.routing import ROUTERS

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager", "flex_attention")


def _names(names) -> str:
    """``a, b or c``: a registry's names as the help text and the errors list them."""
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def flag(default: Any, help: str, **kw: Any) -> Any:
    """A RunConfig field: its default (``list``/``dict`` for an empty one) and its help text, shown by ``--help``.

    A string literal right under a plain ``name: type = default`` documents a field too (``field_docs``). ``kw`` goes
    into the field's metadata: argparse keywords (``choices``, ``metavar``, ``aliases``...) reach the flag, other keys
    (``multi``: list fields are always repeatable) are kept for the reader only.
    """
    if default in (list, dict):  # a factory: each RunConfig gets its own empty list (not the `list` class itself)
        return field(default_factory=default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    """Everything about a distillation run that is not DeepSpeed's business."""

    # --- models and data
    teacher: list[str] = flag(
        list, "Teacher model directory (any AutoModelForCausalLM); repeat for an ensemble.", multi=True
    )
    student: str = flag("", "Student model directory (AutoModelForCausalLM), e.g. made by ds_distill.student_init.")
    data: str = flag(
        "", "Training data: .jsonl/.json/.parquet/.txt file or folder, a save_to_disk folder, or a hub name."
    )
    output_dir: str = flag("", "Where checkpoints, logs, metrics and the exported student go.")
    deepspeed_config: str = flag(
        "",
        "Student DeepSpeed JSON. Default, chosen by fit and logged: on one rank whose memory holds the student's "
        "training state twice over, ds_configs/zero1_bf16.json on GPU, cpu_zero0.json (no ZeRO) on CPU; else "
        "zero3_bf16.json on GPU, cpu_zero3.json on CPU.",
    )
    teacher_deepspeed_config: str = flag(
        "",
        "Teacher DeepSpeed JSON (inference, no optimizer). Default: chosen by fit: replicated on every rank (stage 0, "
        "no per-layer gathers) when the teachers take at most a quarter of a rank's memory or there is one rank, else "
        "ZeRO-3 sharded.",
    )
    teacher_cache: list[str] = flag(
        list,
        "Train from a teacher cache written by `python -m ds_distill.cache_teacher`: no teacher model is loaded for "
        "it. Repeat it for an ensemble (mixed by --teacher_weights or --router, as teachers); it mixes with --teacher "
        "and --teacher_url (README: ensembles across sources).",
        multi=True,
    )
    teacher_url: list[str] = flag(
        list,
        "A teacher behind an OpenAI-compatible server with prompt_logprobs (vLLM: README, serving a teacher with "
        "vLLM), e.g. http://127.0.0.1:8000: its top --teacher_top_k log-probs per supervised token plus a tail "
        "bucket, the loss of a cache. Repeat it for an ensemble; it mixes with --teacher and --teacher_cache (README: "
        "ensembles across sources).",
        multi=True,
    )
    teacher_top_k: int = flag(
        64, "With --teacher_url: log-probs asked per supervised token (at most the server's --max-logprobs)."
    )
    teacher_reference: list[str] = flag(
        list,
        "With --teacher_url: a local copy of each served teacher (same order); at connect its log-probs on a probe "
        "must agree with the server's within --teacher_reference_tolerance.",
        multi=True,
    )
    teacher_reference_tolerance: float = flag(
        1e-3, "Nats: largest |served - local| log-prob accepted by the --teacher_reference probe."
    )
    teacher_tokenizer: str = flag(
        "",
        "With --teacher_url and --cross_tokenizer alm: a folder with the served teacher's (fast) tokenizer; the data "
        "is aligned with it, and at connect it must tokenize a probe text as the server does.",
    )
    teacher_url_timeout: float = flag(
        120.0, "Seconds for one request to a --teacher_url (a stall counts as a failure)."
    )
    teacher_url_retries: int = flag(
        6,
        "Retries of a failed request to a --teacher_url (backoff 1, 2, 4, ... 30 s); then the run saves its last "
        "finished step and exits 75.",
    )
    teacher_url_wait: float = flag(600.0, "Seconds to wait at start for a --teacher_url to become ready.")
    teacher_weights: list[float] = flag(
        list,
        "Ensemble weights, one per --teacher, --teacher_cache and --teacher_url, in that order (every --teacher, then "
        "every --teacher_cache, then every --teacher_url; normalised). Default: uniform.",
        multi=True,
    )
    attn_implementation: str = flag(
        "auto",
        "Attention kernel of every model: auto (flash_attention_2 with a GPU and flash-attn installed, else sdpa "
        "where the model supports it, else eager), flash_attention_2, sdpa, eager or flex_attention.",
    )
    # --- loss
    loss: str = flag("forward_kl", f"Divergence: {_names(LOSSES)}.")
    alpha: float = flag(0.5, "Weight of the CE term; the KD term gets 1 - alpha. 1.0 = plain fine-tuning.")
    temperature: float = flag(1.0, "Softmax temperature of the KD term (the KD term is scaled by T^2).")
    beta: float = flag(0.5, "jsd mixture weight of the teacher (0 = forward KL, 1 = reverse KL).")
    skew: float = flag(0.1, "Skew of skew_forward_kl / skew_reverse_kl (DistiLLM).")
    entropy_threshold: float = flag(
        ENTROPY_THRESHOLD,
        "entropy_aware_kl: teacher entropy (nats, at --temperature) at and above which a token is all forward KL; "
        "below it the forward weight is entropy / threshold, the rest reverse KL. 0 = forward KL, inf = reverse KL.",
    )
    chunk_size: int = flag(
        1024, "Tokens per loss chunk: the lm_heads run per chunk so full logits never exist. 0 = full logits."
    )
    cross_tokenizer: str = flag(
        "",
        f"A teacher with another tokenizer ({_names(CROSS_TOKENIZER)}): alm (approximate likelihood matching of the "
        "chunks both tokenizations cover alike) or vocab_map (KL over the tokens that spell the same bytes, plus one "
        "tail bucket per side). Required when the tokenizers differ; see the README.",
    )
    # --- hidden-state distillation (ds_distill/teachers/hidden.py)
    hidden_loss: str = flag(
        "",
        f"Add a loss between decoder-layer outputs of student and teacher: {_names(HIDDEN_LOSSES)}; empty = off. "
        "Needs one live --teacher; a student of another hidden size gets learned projections (trained in its engine, "
        "saved beside the export).",
    )
    hidden_weight: float = flag(1.0, "Weight of the hidden-state loss (per supervised token, added to the logit loss).")
    hidden_layers: str = flag(
        "auto",
        "Layer pairs of the hidden-state loss: auto (each student layer to the teacher layer student_init copied it "
        "from, read from the student's distill_provenance.json), even (evenly spaced teacher layers) or pairs s:t,... "
        "(student:teacher).",
    )
    hidden_projection: str = flag(
        "pair",
        "A student of another hidden size: pair (one learned projection per layer pair, TinyBERT's W_h as DistillKit "
        "builds it) or shared (one projection for all pairs, as ModelOpt's).",
    )
    hidden_mode: str = flag(
        "output",
        "output: each student layer's output against its teacher layer's output, in the student's own forward. "
        "layerwise: block-local, each student layer i is fed the teacher's input to its layer t_i and matched to the "
        "teacher's input to t_(i+1) (the last to the teacher's last layer output), so it learns to replace the block "
        "it skipped; training steps only (eval runs the student's own forward).",
    )
    attention_relation_weight: float = flag(
        0.0,
        "Weight of MiniLMv2's attention relations (query-query, key-key, value-value KL of one teacher layer against "
        "the student's last layer, per supervised token); 0 = off. Needs one live --teacher and --seq_len <= "
        f"{RELATION_MAX_TOKENS}.",
    )
    attention_relation_layer: int = flag(-1, "The teacher layer of the attention relations (-1: its last).")
    attention_relation_heads: int = flag(
        0,
        "Relation heads the query/key/value vectors are split into (must divide every width of both models); "
        "0 = the student's key-value heads.",
    )
    router_aux_loss: bool = flag(
        True,
        "MoE students: add the router's load-balancing loss as the model computes it (its load_balancing_loss_func, "
        "weighed by its config's router_aux_loss_coef), logged as router_aux. No effect on dense students.",
    )
    # --- on-policy distillation (ds_distill/on_policy.py)
    on_policy_fraction: float = flag(
        0.0,
        "Fraction of micro-batches (seeded, GKD's lambda) whose completions the student samples for the example's "
        "prompt; the loss then covers the sampled tokens only. 0 = off-policy (the dataset's completions).",
    )
    on_policy_sampler: str = flag(
        "student",
        "On-policy: which model writes the completions: student (GKD, MiniLLM) or teacher (one live --teacher: the "
        "target's own samples, as DistillSpec distils a draft for speculative decoding; --recipe draft).",
    )
    max_new_tokens: int = flag(
        128, "On-policy: most tokens sampled per prompt (the sequence still stops at --seq_len)."
    )
    generation_temperature: float = flag(
        1.0, "On-policy: sampling temperature of the student (not the KD --temperature)."
    )
    top_p: float = flag(1.0, "On-policy: nucleus sampling threshold (1 = off).")
    top_k: int = flag(0, "On-policy: sample from the k most likely tokens only (0 = off).")
    on_policy_anchor: float = flag(
        0.0,
        "On-policy: weight W of the student's CE on the dataset's own completions of the sampled micro-batches' "
        "prompts, added to their loss (MiniLLM's LM loss; normalised like the rest, by the step's supervised tokens). "
        "0 = off (today's run).",
    )
    collapse_distinct2_floor: float = flag(
        0.5,
        "On-policy: warn (one line) when distinct-2 of the student's samples in a log window falls below this "
        "(healthy text: ~0.95 over 32 tokens). 0 = off.",
    )
    collapse_self_nll_fraction: float = flag(
        0.75,
        "On-policy: warn (one line) when the student's NLL of its own samples falls below this fraction of its first "
        "logged value (issue 29's collapsed run: 0.73). 0 = off.",
    )
    generation_gather: str = flag(
        "auto",
        "On-policy under ZeRO-3: whole (gather the student once per optimizer step into a plain copy), layered "
        "(gather per layer per token), or auto (whole when it fits in a quarter of a rank's memory).",
    )
    # --- memory
    gradient_checkpointing: bool = flag(
        False,
        "Recompute the student's layer activations in the backward instead of keeping them (Hugging Face's "
        "gradient_checkpointing_enable, non-reentrant): less activation memory for about one more forward per step. "
        "DeepSpeed's activation_checkpointing JSON block does not reach Hugging Face models and is refused.",
    )
    # --- data
    seq_len: int = flag(512, "Tokens per sequence (longer examples are truncated, or dropped with --drop_long).")
    data_format: str = flag("auto", f"{_names(('auto', *FORMATS))}.")
    data_split: str = flag("train", "Split to read from a hub dataset or a multi-split save_to_disk folder.")
    eval_data: str = flag("", "Held-out data (same forms as --data). Default: --eval_fraction of --data.")
    eval_fraction: float = flag(
        0.05, "Fraction of --data held out for eval when --eval_data is not given (0 = no eval)."
    )
    max_samples: int = flag(0, "Use only the first N training examples (0 = all).")
    packing: bool = flag(False, "Pack several examples per sequence (documents never attend to each other).")
    train_on_prompt: bool = flag(False, "Also supervise prompt / non-assistant tokens.")
    chat_template: str = flag(
        "",
        "Jinja file replacing the student tokenizer's chat template for 'messages' data in this run (the saved "
        "tokenizer keeps its own).",
    )
    drop_long: bool = flag(False, "Drop examples longer than --seq_len instead of truncating them.")
    prefetch_batches: int = flag(
        0,
        "Micro-batches prepared ahead on a background thread, into pinned memory when a GPU is present "
        "(ds_distill/prefetch.py); 0 = collated on the training thread.",
    )
    # --- schedule
    max_steps: int = flag(100, "Optimizer steps to run.")
    eval_steps: int = flag(0, "Evaluate every N optimizer steps (0 = only at the end).")
    eval_batches: int = flag(8, "Micro-batches per rank in each evaluation (0 = the whole eval set).")
    log_steps: int = flag(10, "Log metrics every N optimizer steps.")
    save_steps: int = flag(0, "Save a checkpoint every N optimizer steps (0 = only at the end).")
    keep_last: int = flag(2, "Keep only the newest N checkpoints (0 = keep all).")
    resume: bool = flag(False, "Continue from output_dir/checkpoints/latest.")
    resume_allow_changes: str = flag(
        "",
        "With --resume: comma-separated settings that may differ from the recorded run although they change its "
        "meaning (run-config fields, DeepSpeed entries such as optimizer or global_batch, data_content), e.g. "
        "alpha,optimizer. Schedule, logging, eval and save settings may always change.",
    )
    seed: int = flag(42, "Seed of data order and initialisation.")
    export: bool = flag(True, "Export the student as a Hugging Face directory (output_dir/final) at the end.")
    # --- extras (each one Callback or entry-level wrapper; all off by default except the manifest)
    track_examples: bool = flag(
        False, "Record CE, KD and tokens of every training example per step in output_dir/examples.csv."
    )
    early_stopping_patience: int = flag(
        0,
        "Stop after N evaluations in a row without a better eval loss; the best is exported to output_dir/best. 0 = "
        "off.",
    )
    early_stopping_min_delta: float = flag(
        0.0, "An eval loss counts as better only if it is lower than the best by more than this."
    )
    router: str = flag(
        "fixed",
        "How an ensemble's teachers are mixed per token: "
        + "; ".join(f"{k} ({doc})" for k, (_, doc) in ROUTERS.items()),
    )
    rounds: int = flag(1, "Distillation rounds in one job: round k trains output_dir/round_k from round k-1's export.")
    round_overrides: str = flag(
        "", "JSON file: a list of --rounds objects of run-config fields applied to that round (e.g. temperature, data)."
    )
    # --- LoRA student (ds_distill/models/lora.py)
    lora_r: int = flag(
        0,
        "LoRA rank: train PEFT low-rank adapters on the frozen student instead of every weight; checkpoints hold the "
        "adapters only and the export is the merged model plus output_dir/final/adapter. 0 = full training.",
    )
    lora_alpha: float = flag(0.0, "LoRA: the adapters' update is scaled by lora_alpha / lora_r. 0 = 2 * lora_r.")
    lora_dropout: float = flag(0.0, "LoRA: dropout on the adapters' input.")
    lora_target_modules: list[str] = flag(
        list,
        "LoRA: names of the decoder's linear layers that get adapters, e.g. q_proj v_proj. Default: every linear "
        "layer of the decoder (never the lm_head).",
        multi=True,
    )
    lora_dora: bool = flag(
        False, "LoRA: DoRA (PEFT's use_dora): a trained magnitude per output row besides the adapters."
    )
    lora_fp32: bool = flag(
        False,
        "LoRA: adapters in fp32 on a bf16/fp16 base (needs ZeRO-3 there: below it DeepSpeed casts every parameter). "
        "Default: the base's dtype.",
    )

    def validate(self) -> None:
        """Collect every problem and raise one UsageError that lists them all."""
        problems: list[str] = []
        if not self.teacher and not self.teacher_cache and not self.teacher_url:
            problems.append(
                "--teacher is required (a model directory; repeat it for an ensemble), or --teacher_cache, or "
                "--teacher_url"
            )
        for name in ("student", "data", "output_dir"):
            if not getattr(self, name):
                problems.append(f"--{name} is required")
        for flag, path in [*(("--teacher", t) for t in self.teacher), ("--student", self.student)]:
            if path and Path(path).is_file():
                problems.append(f"{flag} {path!r} is a file: pass the model's folder (the one with config.json)")
            elif path and not Path(path).is_dir():
                problems.append(f"{flag}: model directory {path!r} does not exist: pass a folder with config.json")
            elif path and not (Path(path) / "config.json").is_file():
                problems.append(f"{flag} {path!r} has no config.json: pass a Hugging Face model folder")
        problems += missing_paths(self.data, self.eval_data)
        for name in ("deepspeed_config", "teacher_deepspeed_config", "chat_template"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                hint = "pass a Jinja file" if name == "chat_template" else "pick a file from ds_configs/"
                problems.append(f"--{name} {value!r} does not exist: {hint}")
        if self.loss not in LOSSES:
            problems.append(f"--loss {self.loss!r} is unknown: use one of {', '.join(sorted(LOSSES))}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"--alpha {self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            problems.append(f"--temperature {self.temperature} must be > 0")
        for name in ("beta", "skew"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"--{name} {getattr(self, name)} must be in [0, 1]")
        if not self.entropy_threshold >= 0:
            problems.append(f"--entropy_threshold {self.entropy_threshold} must be >= 0 nats (inf = reverse KL)")
        if self.cross_tokenizer:
            problems.extend(_cross_tokenizer_problems(self))
        if self.hidden_loss:
            problems.extend(_hidden_problems(self))
        else:
            for name, default in (("hidden_mode", "output"), ("hidden_projection", "pair")):
                if getattr(self, name) != default:  # would be ignored: said, not silently dropped
                    problems.append(f"--{name} {getattr(self, name)} needs --hidden_loss: pass one, or drop --{name}")
        if self.attention_relation_weight or self.attention_relation_heads < 0:
            problems.extend(_relation_problems(self))
        else:
            for name, default in (("attention_relation_layer", -1), ("attention_relation_heads", 0)):
                if getattr(self, name) != default:
                    problems.append(
                        f"--{name} {getattr(self, name)} needs --attention_relation_weight > 0: pass one, or drop "
                        f"--{name}"
                    )
        if self.teacher_tokenizer and not (self.teacher_url and self.cross_tokenizer):
            problems.append(
                "--teacher_tokenizer names a served teacher's tokenizer for --cross_tokenizer alm with --teacher_url: "
                "drop it, or pass both"
            )
        if self.teacher_url:
            problems.extend(_served_problems(self))
        elif self.teacher_cache:
            problems.extend(_teacher_cache_problems(self))
        n_teachers = len(self.teacher) + len(self.teacher_cache) + len(self.teacher_url)
        if self.teacher_weights and len(self.teacher_weights) != n_teachers:
            problems.append(
                f"--teacher_weights has {len(self.teacher_weights)} values for {n_teachers} teachers (--teacher "
                f"{len(self.teacher)}, then --teacher_cache {len(self.teacher_cache)}, then --teacher_url "
                f"{len(self.teacher_url)}): one weight per teacher, in that order"
            )
        if any(w < 0 for w in self.teacher_weights) or (self.teacher_weights and sum(self.teacher_weights) <= 0):
            problems.append("--teacher_weights must be >= 0 with a positive sum")
        for name in ("seq_len", "max_steps", "log_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} {getattr(self, name)} must be >= 1")
        for name in (
            "chunk_size",
            "eval_steps",
            "eval_batches",
            "save_steps",
            "keep_last",
            "max_samples",
            "prefetch_batches",
        ):
            if getattr(self, name) < 0:
                problems.append(f"--{name} {getattr(self, name)} must be >= 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"--eval_fraction {self.eval_fraction} must be in [0, 1)")
        if self.data_format not in ("auto", *FORMATS):
            problems.append(f"--data_format {self.data_format!r} must be {_names(('auto', *FORMATS))}")
        if self.early_stopping_patience < 0 or self.early_stopping_min_delta < 0:
            problems.append("--early_stopping_patience and --early_stopping_min_delta must be >= 0")
        if self.early_stopping_patience and self.eval_fraction == 0 and not self.eval_data:
            problems.append("--early_stopping_patience needs an eval set: pass --eval_data or --eval_fraction > 0")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            problems.append(
                f"--attn_implementation {self.attn_implementation!r} must be one of {', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        if self.router not in ROUTERS:
            problems.append(f"--router {self.router!r} must be {_names(ROUTERS)}")
        if self.router == "lowest_ce" and self.teacher_weights:
            problems.append(
                "--router lowest_ce picks the teacher per token: drop --teacher_weights (used only by --router fixed)"
            )
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            problems.append(f"--on_policy_fraction {self.on_policy_fraction} must be in [0, 1]")
        if self.on_policy_fraction and (self.packing or self.train_on_prompt):
            problems.append(
                "--on_policy_fraction needs one example per sequence whose prompt is unsupervised: drop --packing / "
                "--train_on_prompt"
            )
        problems.extend(_sampler_problems(self))
        if self.max_new_tokens < 1 or self.generation_temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            problems.append(
                f"generation flags out of range (--max_new_tokens {self.max_new_tokens} >= 1, --generation_temperature "
                f"{self.generation_temperature} > 0, --top_p {self.top_p} in (0, 1], --top_k {self.top_k} >= 0)"
            )
        if self.on_policy_anchor < 0 or (self.on_policy_anchor and not self.on_policy_fraction):
            problems.append(
                f"--on_policy_anchor {self.on_policy_anchor} must be >= 0 and needs --on_policy_fraction > 0 (it "
                "anchors the sampled micro-batches)"
            )
        for name in ("collapse_distinct2_floor", "collapse_self_nll_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"--{name} {getattr(self, name)} must be in [0, 1] (0 = no warning)")
        if self.generation_gather not in ("auto", "whole", "layered"):
            problems.append(f"--generation_gather {self.generation_gather!r} must be auto, whole or layered")
        if self.rounds < 1:
            problems.append(f"--rounds {self.rounds} must be >= 1")
        if self.rounds > 1 and not self.export:
            problems.append("--rounds > 1 needs --export true: each round starts from the previous round's export")
        if self.round_overrides and self.rounds < 2:
            problems.append("--round_overrides applies only with --rounds > 1")
        problems.extend(_lora_problems(self))
        if problems:
            raise UsageError("invalid run config: " + "; ".join(problems))

    def is_log_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) logs its metrics: every ``log_steps`` steps, and the last step."""
        return step % self.log_steps == 0 or step == self.max_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cross_tokenizer_problems(cfg: RunConfig) -> list[str]:
    if cfg.cross_tokenizer not in CROSS_TOKENIZER:
        return [f"--cross_tokenizer {cfg.cross_tokenizer!r} is unknown: use one of {', '.join(CROSS_TOKENIZER)}"]
    problems = []
    if cfg.teacher_cache and cfg.cross_tokenizer == "vocab_map":
        problems.append(
            "--cross_tokenizer vocab_map needs the teacher's whole distribution at every chunk start, which no cache "
            "stores: pass --teacher instead of --teacher_cache, or use --cross_tokenizer alm with a cache written "
            "for it"
        )
    if len(cfg.teacher) + len(cfg.teacher_cache) + len(cfg.teacher_url) > 1:
        problems.append(
            "--cross_tokenizer takes one --teacher, --teacher_cache or --teacher_url (ensembles across tokenizers are "
            "not supported)"
        )
    if cfg.teacher_url:
        problems.extend(_served_cross_problems(cfg))
    if cfg.on_policy_fraction:
        problems.append(
            "--cross_tokenizer aligns the dataset's texts once: drop --on_policy_fraction (sampled text is not aligned)"
        )
    if cfg.router != "fixed":
        problems.append("--router mixes an ensemble: it does not apply to --cross_tokenizer")
    return problems


def _served_cross_problems(cfg: RunConfig) -> list[str]:
    """A served teacher of another tokenizer: ALM from the server's log-prob of each of its own tokens."""
    problems = []
    if cfg.cross_tokenizer == "vocab_map":
        problems.append(
            "--cross_tokenizer vocab_map needs the teacher's whole distribution at every chunk start, which a server's "
            "top-K does not give: use --cross_tokenizer alm with --teacher_url, or vocab_map with the live --teacher"
        )
    if not (Path(cfg.teacher_tokenizer) / "tokenizer_config.json").is_file():
        problems.append(
            f"--cross_tokenizer with --teacher_url needs --teacher_tokenizer: a folder with the served teacher's "
            f"tokenizer (got {cfg.teacher_tokenizer!r}), to align the data with"
        )
    if cfg.temperature != 1.0:
        problems.append(
            f"--cross_tokenizer alm with --teacher_url needs --temperature 1 (got {cfg.temperature}): the server's "
            "log-prob of a token is at temperature 1 and does not fix it at another; use a teacher cache or --teacher"
        )
    return problems


def _hidden_problems(cfg: RunConfig) -> list[str]:
    if cfg.hidden_loss not in HIDDEN_LOSSES:
        return [f"--hidden_loss {cfg.hidden_loss!r} is unknown: use {_names(HIDDEN_LOSSES)}"]
    problems = []
    if cfg.hidden_weight < 0:
        problems.append(f"--hidden_weight {cfg.hidden_weight} must be >= 0")
    if cfg.hidden_projection not in ("pair", "shared"):
        problems.append(f"--hidden_projection {cfg.hidden_projection!r} is unknown: use pair or shared")
    if cfg.hidden_mode not in ("output", "layerwise"):
        problems.append(f"--hidden_mode {cfg.hidden_mode!r} is unknown: use output or layerwise")
    if cfg.hidden_mode == "layerwise" and cfg.gradient_checkpointing:
        problems.append(
            "--hidden_mode layerwise replaces layer inputs with forward hooks, which a recomputed layer would not see "
            "again: drop --gradient_checkpointing"
        )
    if cfg.teacher_cache:
        problems.append(
            "--hidden_loss needs the teacher's hidden states, which a teacher cache does not store: pass --teacher "
            "alone (no --teacher_cache)"
        )
    if cfg.teacher_url:
        problems.append(
            "--hidden_loss needs the teacher's hidden states, which a served teacher does not send: pass --teacher "
            "alone (no --teacher_url)"
        )
    if len(cfg.teacher) > 1:
        problems.append(
            f"--hidden_loss with {len(cfg.teacher)} teachers: a student layer's teacher layer is ambiguous in an "
            "ensemble; pass one --teacher"
        )
    if cfg.alpha == 1.0:
        problems.append("--hidden_loss needs the teacher forward, which --alpha 1 skips: use --alpha < 1")
    if cfg.cross_tokenizer:
        problems.append(
            "--hidden_loss compares states token by token: a teacher with another tokenizer (--cross_tokenizer) has "
            "other tokens; drop one of them"
        )
    return problems


def _relation_problems(cfg: RunConfig) -> list[str]:
    if cfg.attention_relation_weight < 0 or cfg.attention_relation_heads < 0:
        return [
            f"--attention_relation_weight {cfg.attention_relation_weight} and --attention_relation_heads "
            f"{cfg.attention_relation_heads} must be >= 0"
        ]
    problems = []
    if cfg.seq_len > RELATION_MAX_TOKENS:
        problems.append(
            f"--attention_relation_weight relates every pair of tokens ([batch, heads, T, T] per kind and model): "
            f"--seq_len {cfg.seq_len} is above its budget of {RELATION_MAX_TOKENS} tokens; lower --seq_len"
        )
    if len(cfg.teacher) != 1 or cfg.teacher_cache or cfg.teacher_url or cfg.alpha == 1.0 or cfg.cross_tokenizer:
        problems.append(
            "--attention_relation_weight needs one live --teacher of the student's tokenizer, run at --alpha < 1 "
            "(no ensemble, --teacher_cache, --teacher_url or --cross_tokenizer: attention is not stored or served)"
        )
    if cfg.packing:
        problems.append(
            "--attention_relation_weight relates every earlier token of a row, across the documents of a packed "
            "row: drop --packing"
        )
    return problems


def _sampler_problems(cfg: RunConfig) -> list[str]:
    if cfg.on_policy_sampler not in ("student", "teacher"):
        return [f"--on_policy_sampler {cfg.on_policy_sampler!r} must be student or teacher"]
    if cfg.on_policy_sampler == "student":
        return []
    problems = []
    if not cfg.on_policy_fraction:
        problems.append("--on_policy_sampler teacher needs --on_policy_fraction > 0 (the micro-batches it samples)")
    if len(cfg.teacher) != 1 or cfg.teacher_cache or cfg.teacher_url:
        problems.append(
            "--on_policy_sampler teacher samples from one live model: pass exactly one --teacher (no ensemble, "
            "--teacher_cache or --teacher_url)"
        )
    if cfg.alpha == 1.0:
        problems.append(
            "--on_policy_sampler teacher needs the teacher loaded, which --alpha 1 skips: use --alpha < 1 (or write "
            "the teacher's samples once with python -m ds_distill.generate and train on them)"
        )
    return problems


def _teacher_cache_problems(cfg: RunConfig) -> list[str]:
    problems = []
    if cfg.router != "fixed" and cfg.temperature != 1.0:
        problems.append(
            f"--router {cfg.router} scores labels at temperature 1 but teacher caches hold log-probs at --temperature "
            f"{cfg.temperature}: use --temperature 1 (caches written at 1), or --router fixed"
        )
    if cfg.on_policy_fraction:
        problems.append(
            "--on_policy_fraction samples new tokens that a teacher cache cannot score: train on-policy with --teacher"
        )
    return problems


def _served_problems(cfg: RunConfig) -> list[str]:
    problems = []
    if cfg.router != "fixed" and cfg.temperature != 1.0:
        problems.append(f"--router {cfg.router} scores labels at temperature 1: use --temperature 1, or --router fixed")
    if cfg.on_policy_fraction:
        problems.append(
            "--on_policy_fraction with --teacher_url is not supported yet (the server would score tokens the student "
            "samples during the step): train on-policy with --teacher"
        )
    if cfg.teacher_top_k < 1 or cfg.teacher_url_timeout <= 0 or cfg.teacher_url_retries < 0 or cfg.teacher_url_wait < 0:
        problems.append(
            f"served-teacher flags out of range (--teacher_top_k {cfg.teacher_top_k} >= 1, --teacher_url_timeout "
            f"{cfg.teacher_url_timeout} > 0, --teacher_url_retries {cfg.teacher_url_retries} >= 0, --teacher_url_wait "
            f"{cfg.teacher_url_wait} >= 0)"
        )
    return problems


def _lora_problems(cfg: RunConfig) -> list[str]:
    problems = []
    if cfg.lora_r < 0 or cfg.lora_alpha < 0 or not 0.0 <= cfg.lora_dropout < 1.0:
        problems.append(
            f"LoRA flags out of range (--lora_r {cfg.lora_r} >= 0, --lora_alpha {cfg.lora_alpha} >= 0, --lora_dropout "
            f"{cfg.lora_dropout} in [0, 1))"
        )
    given = [
        f"--{n}"
        for n in ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_dora", "lora_fp32")
        if getattr(cfg, n)
    ]
    if given and not cfg.lora_r:
        problems.append(f"{' '.join(given)} given without --lora_r: pass --lora_r R to train LoRA adapters")
    return problems


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def field_docs(cls: type) -> dict[str, str]:
    """Help text of each field of dataclass ``cls``: ``flag(default, "help")``, else the field's attribute docstring.

    Both forms document a field; the parser shows whichever is present (``flag`` wins when both are)::

        alpha: float = flag(0.5, "Weight of the CE term.")   # the help string of _f
        beta: float = 0.5
        \"\"\"jsd mixture weight of the teacher.\"\"\"      # a string literal right under the field

    Attribute docstrings are not kept by Python at run time, so they are read from the class source with ``ast``.
    """
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError, IndexError, AttributeError):  # no source (frozen app, REPL): flag help only
        body = []
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = f.metadata["help"]
    return docs


class _Repeatable(argparse.Action):
    """A list flag given as ``--teacher a --teacher b`` (or ``--teacher a b``): CLI values replace a run file's list."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        current = getattr(namespace, self.dest, None)
        kept = [] if current is None or current is self.default else list(current)  # first use drops the default
        setattr(namespace, self.dest, kept + list(values))


# Flags of the Hugging Face Trainer, TRL and DistillKit that a user brings along, and where ds-distill takes each.
# What DeepSpeed owns lives in the JSON (one truth); the rest is a flag of ours under another name.
_DEEPSPEED_OWNS = {
    **dict.fromkeys(("learning_rate", "lr"), "optimizer.params.lr"),
    **dict.fromkeys(("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim"), "the optimizer block"),
    **dict.fromkeys(
        ("per_device_train_batch_size", "batch_size", "micro_batch_size", "train_micro_batch_size_per_gpu"),
        "train_micro_batch_size_per_gpu",
    ),
    "train_batch_size": "train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    **dict.fromkeys(("warmup_steps", "warmup_ratio", "lr_scheduler_type"), "the scheduler block"),
    "max_grad_norm": "gradient_clipping",
    **dict.fromkeys(("bf16", "fp16"), "the bf16 / fp16 block"),
    **dict.fromkeys(("zero_stage", "stage"), "zero_optimization.stage"),
}
_RENAMED = {
    **dict.fromkeys(("model_name_or_path", "model", "student_model"), "student"),
    **dict.fromkeys(("teacher_model_name_or_path", "teacher_model"), "teacher"),
    **dict.fromkeys(("max_length", "max_seq_length", "block_size"), "seq_len"),
    **dict.fromkeys(("dataset_name", "dataset", "train_file"), "data"),
    **dict.fromkeys(("max_completion_length", "max_new_tokens_per_prompt"), "max_new_tokens"),
    "lmbda": "on_policy_fraction",
    "logging_steps": "log_steps",
    "save_total_limit": "keep_last",
    "resume_from_checkpoint": "resume",
    "num_train_epochs": "max_steps (optimizer steps, not epochs)",
    "deepspeed": "deepspeed_config",
}


def familiar_flag_hint(flag: str, known: Any) -> str:
    """Where ds-distill takes a Hugging Face / TRL flag that it does not have (``flag`` as typed, ``known``: the
    parser's option strings), or "" when it is not one of those. A DeepSpeed-owned setting points at the JSON only
    where the parser has ``--deepspeed_config``; a renamed flag only where the parser has the new name."""
    typed = flag.split("=")[0]
    name = typed.lstrip("-").replace("-", "_")
    if name in _DEEPSPEED_OWNS and "--deepspeed_config" in known:
        return (
            f"{typed} is not a ds-distill flag: DeepSpeed owns it; set {_DEEPSPEED_OWNS[name]} in the JSON you pass "
            "as --deepspeed_config (copy one from ds_configs/)"
        )
    if name in _RENAMED and f"--{_RENAMED[name].split()[0]}" in known:
        return f"{typed} is not a ds-distill flag: use --{_RENAMED[name]} (see --help)"
    return ""


# add_argument's keywords: any other key in a field's metadata (e.g. `multi`) is ours, not argparse's.
_ARGPARSE_KEYS = frozenset("action nargs const default type choices required help metavar aliases".split())


def dataclass_parser(dtype: type, **kwargs: Any) -> argparse.ArgumentParser:
    """transformers' ``HfArgumentParser`` over dataclass ``dtype`` with ds_distill's flag forms (``_parser_class``).
    No abbreviations: argparse would take ``--max_step 3`` as ``--max_steps`` and ``--temp`` as ``--temperature``, so a
    mistyped flag could set another field without a word; a flag is spelt out or refused with the nearest one."""
    kwargs.setdefault("allow_abbrev", False)
    return _parser_class()(dtype, **kwargs)


@functools.cache
def _parser_class() -> type:
    from transformers import (
        HfArgumentParser,
    )  # importing transformers takes seconds: only when a command line is parsed

    class RunParser(HfArgumentParser):
        """transformers' HfArgumentParser over one dataclass, with ds_distill's flag forms.

        HfArgumentParser makes one ``--name`` flag per field (plus ``--name-with-dashes`` and ``--no_<bool>`` for
        booleans that default to True), typed from the annotations; bool flags take ``--flag`` or ``--flag true/false``.
        What we change: list fields are repeatable (``_Repeatable``), help comes from ``field_docs``, and metadata keys
        that argparse does not know are dropped before they reach ``add_argument``.
        """

        def error(self, message: str) -> NoReturn:
            """argparse's error in one line (no usage block above it), with the nearest flag when one is misspelt."""
            hint = "; see --help"
            unknown = re.search(r"unrecognized arguments: (\S+)", message)
            if unknown:
                familiar = familiar_flag_hint(unknown.group(1), self._option_string_actions)
                if familiar:
                    message, hint = familiar, ""
                else:
                    typed = unknown.group(1).split("=")[0]
                    flags = list(self._option_string_actions)
                    # A prefix (argparse's abbreviations are off) names the flags it starts; else the nearest spelling.
                    near = sorted(f for f in flags if f.startswith(typed) and "-" not in f[2:])[:3]
                    near = near or difflib.get_close_matches(typed, flags, 1)
                    hint = f"; did you mean {' or '.join(near)}? (see --help)" if near else hint
            print_error(f"{message}{hint}")
            self.exit(2)

        def _add_dataclass_arguments(self, dtype: Any) -> None:
            self._docs = field_docs(dtype)
            super()._add_dataclass_arguments(dtype)

        def _parse_dataclass_field(self, parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:  # type: ignore[override]
            meta = {k: v for k, v in f.metadata.items() if k in _ARGPARSE_KEYS}
            meta["help"] = self._docs.get(f.name, "")
            if isinstance(getattr(f.type, "__origin__", None), type) and issubclass(f.type.__origin__, list):
                meta["action"] = _Repeatable
            f = copy.copy(f)  # HfArgumentParser reads the metadata; RunConfig's own field keeps its metadata
            f.metadata = types.MappingProxyType(meta)
            HfArgumentParser._parse_dataclass_field(parser, f)
            if f.type is bool:  # keep our spellings (on/off too) rather than transformers' string_to_bool
                parser._option_string_actions[f"--{f.name}"].type = _parse_bool

    return RunParser


TRAIN_HELP = (
    "Distil one or more teachers into a student that trains in a DeepSpeed engine. Learning rate, batch size, "
    "gradient accumulation, ZeRO stage, precision, schedule and clipping are DeepSpeed's: set them in the JSON passed "
    "as --deepspeed_config (copy one from ds_configs/); without one, a shipped JSON is chosen by fit and logged."
)


def build_parser(cls: type = RunConfig, prog: str = "ds_distill.train") -> argparse.ArgumentParser:
    """One flag per field of ``cls`` (same name), plus --config for a YAML/JSON run file with the same keys."""
    about = TRAIN_HELP if cls is RunConfig else __doc__.splitlines()[0]
    parser = dataclass_parser(cls, prog=prog, description=about)
    parser.add_argument(
        "--config", default="", help=f"YAML or JSON run file whose keys are {cls.__name__} fields; flags override it."
    )
    if cls is RunConfig:  # the shipped run files are training runs
        parser.add_argument(
            "--recipe",
            default="",
            choices=["", *recipes()],
            help="A run file shipped with ds_distill (ds_distill/recipes/NAME.yaml), used as --config; flags override "
            "it.",
        )
    # The deepspeed launcher passes --local_rank=N unless told not to (--no_local_rank): accepted and ignored, the
    # rank comes from the environment (runtime.distributed).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


RECIPES = Path(__file__).parent / "recipes"


def recipes() -> list[str]:
    """Names of the shipped run files (``ds_distill/recipes/NAME.yaml``), for ``--recipe NAME``."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_run_file(path: str, cls: type = RunConfig) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path!r} does not exist: pass a YAML or JSON run file")
    import yaml  # JSON is a subset of YAML: one parser for both

    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path!r} could not be parsed: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path!r} must hold a mapping of RunConfig fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(
            f"--config {path!r} has unknown keys {unknown}: valid keys are the flags of `python -m ds_distill.train "
            "--help`"
        )
    return data


def parse_args(argv: list[str] | None = None, cls: type = RunConfig, prog: str = "ds_distill.train") -> Any:
    """Run file first, then CLI flags on top; lists from the CLI replace the file's lists. Returns a ``cls``.

    The run file's values become the parser's defaults (the usual HfArgumentParser pattern), so a flag overrides
    its key and every other field keeps the file's value or the dataclass default. Unknown flags and bad values
    exit 2 with argparse's one-line error; file problems raise UsageError.
    """
    parser = build_parser(cls, prog)
    first = parser.parse_known_args(argv)[0]  # --config first: its keys are the defaults of the real parse
    recipe = getattr(first, "recipe", "")
    if first.config and recipe:
        raise UsageError(f"--config {first.config!r} and --recipe {recipe!r}: pass one run file, not both")
    config = first.config or (str(RECIPES / f"{recipe}.yaml") if recipe else "")
    if config:
        values = load_run_file(config, cls)
        for name in ("teacher", "teacher_weights", "teacher_cache", "teacher_url", "teacher_reference"):  # one: a value
            if isinstance(values.get(name), (str, int, float)):
                values[name] = [values[name]]
        parser.set_defaults(**values)
    cfg, _, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return cfg
