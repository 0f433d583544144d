"""Tokenising loaded rows into examples with exact supervision masks (labels already shifted), optional packing,
and holding out an eval split."""

from __future__ import annotations

import logging
from typing import Callable

import datasets
import pyarrow.compute as pc
import torch

from ds_distill.common import IGNORE_INDEX, UsageError
from ds_distill.data.alignment import (
    MAX_POORLY_ALIGNED,
    MIN_ALIGNED,
    REPORT_KEYS,
    content_regions,
    cross_columns,
    encode_parts,
    encoded,
    require_fast,
)
from ds_distill.data.chat import ChatEncoder, content_probe
from ds_distill.data.loading import (
    check_rows,
    decode_tools,
    detect_format,
    drop_nulls,
    load_raw,
    null_filled,
    warn_once,
    with_ids,
)
from ds_distill.runtime import distributed

logger = logging.getLogger("ds_distill.data")

# Rows per packing chunk: packing is greedy within a chunk, so blocks never depend on rows far away (cacheable, and
# `num_proc` workers pack independently); the cost is at most one partly filled block per chunk.
_PACK_CHUNK = 1000


def _shift(ids: list[int], supervised: list[bool]) -> list[int]:
    """labels[t] = ids[t + 1] where token t + 1 is supervised, else -100; the last position is always -100."""
    return [ids[t + 1] if supervised[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


class _Tokenise:
    """The batched `datasets.map` function: raw rows -> input_ids, labels (shifted), _truncated. A class (not a
    closure) so the `datasets` fingerprint, hence the cache, depends only on these settings and the tokenizer."""

    def __init__(
        self,
        tokenizer,
        fmt: str,
        seq_len: int,
        train_on_prompt: bool,
        chat_template: str | None = None,
        null_filled: tuple[str, ...] = (),
        teacher_tokenizer=None,
    ):
        self.tokenizer, self.fmt, self.seq_len, self.train_on_prompt = tokenizer, fmt, seq_len, train_on_prompt
        self.null_filled = null_filled  # chat columns whose nulls mean "absent" (loading.null_filled)
        self.teacher = teacher_tokenizer
        if teacher_tokenizer is not None and teacher_tokenizer.eos_token_id is None:
            raise UsageError(
                f"teacher tokenizer {teacher_tokenizer.name_or_path!r} has no eos token: set eos_token in its "
                "tokenizer_config.json"
            )
        eos = tokenizer.eos_token_id
        if fmt != "messages" and eos is None:
            raise UsageError(
                f"tokenizer {tokenizer.name_or_path!r} has no eos token: set eos_token in its tokenizer_config.json"
            )
        self.chat = ChatEncoder(tokenizer, chat_template, train_on_prompt) if fmt == "messages" else None
        self.teacher_chat = None  # cross-tokenizer chat data: the teacher renders with its own template
        if self.chat is not None and teacher_tokenizer is not None:
            if not teacher_tokenizer.chat_template:
                raise UsageError(
                    f"teacher tokenizer {teacher_tokenizer.name_or_path!r} has no chat template but the data has "
                    "'messages' and --cross_tokenizer renders each conversation with each model's own template: "
                    "give the teacher its chat template (tokenizer_config.json) or use prompt/completion data"
                )
            for tok in (tokenizer, teacher_tokenizer):
                require_fast(tok)
            self.teacher_chat = ChatEncoder(teacher_tokenizer, None, train_on_prompt)
            content_probe(
                self.chat,
                self.teacher_chat,
                f"student {tokenizer.name_or_path!r}",
                f"teacher {teacher_tokenizer.name_or_path!r}",
            )
        # Does encoding with special tokens already append eos (some tokenizers do, Llama's do not)?
        probe = tokenizer("a")["input_ids"]
        self.adds_eos = eos is not None and len(probe) > 0 and probe[-1] == eos
        self.eos = eos

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.fmt == "text":
            rows = [
                [(ids if self.adds_eos else ids + [self.eos], None)]
                for ids in self.tokenizer(batch["text"])["input_ids"]
            ]
        elif self.fmt == "prompt_completion":
            prompts = self.tokenizer(batch["prompt"])["input_ids"]
            completions = self.tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
            rows = []
            for p, c in zip(prompts, completions):
                p = p[:-1] if self.adds_eos else p  # the eos belongs after the completion, not the prompt
                rows.append([(p + c + [self.eos], [self.train_on_prompt] * len(p) + [True] * (len(c) + 1))])
        else:
            tools = batch.get("tools") or [None] * len(batch["id"])
            rows = [self._messages(m, t, i) for m, t, i in zip(batch["messages"], tools, batch["id"])]
        # A conversation may give several examples (one per assistant turn): each keeps the row's id and row number.
        out: dict[str, list] = {"id": [], "row": [], "input_ids": [], "labels": [], "_truncated": []}
        texts = zip(batch["prompt"], batch["completion"]) if self.fmt == "prompt_completion" else None
        texts = [[t] for t in batch["text"]] if self.fmt == "text" else texts
        for example_id, row, examples, parts in zip(batch["id"], batch["row"], rows, texts or rows):
            for ids, sup, *cross in examples:  # chat data across tokenizers: aligned already (_cross_chat)
                sup = sup if sup is not None else [True] * len(ids)
                if self.teacher is not None:
                    for key, value in (cross[0] if cross else self._cross(list(parts), ids, sup)).items():
                        out.setdefault(key, []).append(value)
                out["id"].append(example_id)
                out["row"].append(row)
                out["_truncated"].append(len(ids) > self.seq_len)
                ids, sup = ids[: self.seq_len], sup[: self.seq_len]
                out["input_ids"].append(ids)
                out["labels"].append(_shift(ids, sup))
        return out

    def _cross(self, parts: list[str], ids: list[int], sup: list[bool]) -> dict[str, list[int]]:
        """The teacher's columns of one example (``cross_columns``): both sides tokenised by parts (prompt,
        completion) as above, each with its own special tokens, and aligned part by part."""
        student, s_ranges = encode_parts(self.tokenizer, parts, self.eos)
        if student.ids != ids:  # one definition of the student's tokens: the ones above
            raise AssertionError("cross-tokenizer alignment tokenised the student's text differently")
        teacher, t_ranges = encode_parts(self.teacher, parts, self.teacher.eos_token_id)
        return cross_columns(student, teacher, list(zip(s_ranges, t_ranges)), sup, self.seq_len)

    def _messages(self, messages: list[dict], tools, example_id) -> list[tuple[list[int], list[bool]]]:
        """One example for the conversation (with its ``tools``), or one per assistant turn: see
        ``chat.ChatEncoder``."""
        # A template must see each message and tool as written: the nulls `datasets` fills into struct columns for
        # keys a row did not write are dropped (nested too: tool calls, schemas); top-level None keys as before.
        if "messages" in self.null_filled:
            messages = drop_nulls(messages)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        tools = decode_tools(tools)
        if "tools" in self.null_filled:
            tools = drop_nulls(tools)
        if self.teacher_chat is not None:
            return self._cross_chat(messages, tools, f"example id {example_id!r}")
        return self.chat(messages, f"example id {example_id!r}", tools)

    def _cross_chat(self, messages: list[dict], tools, where: str) -> list[tuple[list[int], list[bool], dict]]:
        """Chat data across tokenizers: each side renders the conversation with its own template into the same
        examples (one, or one per assistant turn when either template needs that), tokenised as without a teacher,
        and the two renderings are aligned on the messages' contents (``content_regions``): the templates' markup
        is in no chunk, and no chunk crosses a message. The report counts the contents' bytes as the student's
        rendering shows them."""
        student = self.chat.examples(messages, where, tools, offsets=True)
        teacher = self.teacher_chat.examples(messages, f"{where} (teacher's template)", tools, offsets=True)
        if [e.n_messages for e in student] != [e.n_messages for e in teacher]:
            student = self.chat.examples(messages, where, tools, per_turn=True, offsets=True)
            teacher = self.teacher_chat.examples(messages, f"{where} (teacher's template)", tools, True, True)
        out = []
        for s, t in zip(student, teacher):
            shown = messages[: s.n_messages]
            s_spans = self.chat.content_spans(shown, s.text, where)
            t_spans = self.teacher_chat.content_spans(shown, t.text, where)
            s_enc = encoded(self.tokenizer, s.text, s.ids, s.offsets)
            t_enc = encoded(self.teacher, t.text, t.ids, t.offsets)
            n_bytes = sum(len(s.text[a:b].encode("utf-8", "surrogatepass")) for a, b in filter(None, s_spans))
            regions = content_regions(s_enc, s_spans, t_enc, t_spans)
            cols = cross_columns(s_enc, t_enc, regions, s.supervised, self.seq_len, n_bytes=n_bytes, pair_eos=False)
            out.append((s.ids, s.supervised, cols))
        return out


class _Pack:
    """Batched `datasets.map` function: greedy next-fit packing of whole documents into blocks of <= seq_len."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"id": [], "row": [], "input_ids": [], "labels": [], "position_ids": [], "doc_ids": []}
        for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"])):
            if not out["input_ids"] or len(out["input_ids"][-1]) + len(ids) > self.seq_len:
                out["id"].append(batch["id"][i])
                out["row"].append(batch["row"][i])
                for k in ("input_ids", "labels", "position_ids", "doc_ids"):
                    out[k].append([])
            # Each document's labels already end in -100, so no target crosses a document boundary.
            out["input_ids"][-1].extend(ids)
            out["labels"][-1].extend(labels)
            out["position_ids"][-1].extend(range(len(ids)))
            out["doc_ids"][-1].append(batch["id"][i])
            if "teacher_input_ids" in batch:
                self._teacher(out, batch, i)
        return out

    @staticmethod
    def _teacher(out: dict[str, list], batch: dict[str, list], i: int) -> None:
        """The teacher's side of document i joins the block beside the student's: its ids and positions restart per
        document, its chunk ids (0, 1, ... per document) are renumbered after the block's chunks so far, and the
        alignment reports add up. Documents are aligned apart, so no chunk crosses a document boundary."""
        if len(out["input_ids"][-1]) == len(batch["input_ids"][i]):  # a new block
            for k in ("teacher_input_ids", "teacher_position_ids", "chunk_ids", "teacher_chunk_ids", "alignment"):
                out.setdefault(k, []).append([] if k != "alignment" else [0] * len(REPORT_KEYS))
        base = 1 + max(out["chunk_ids"][-1], default=-1)
        shift = lambda ids: [c + base if c >= 0 else -1 for c in ids]
        out["teacher_input_ids"][-1].extend(batch["teacher_input_ids"][i])
        out["teacher_position_ids"][-1].extend(range(len(batch["teacher_input_ids"][i])))
        out["chunk_ids"][-1].extend(shift(batch["chunk_ids"][i]))
        out["teacher_chunk_ids"][-1].extend(shift(batch["teacher_chunk_ids"][i]))
        out["alignment"][-1] = [a + b for a, b in zip(out["alignment"][-1], batch["alignment"][i])]


def _drop_empty(raw: datasets.Dataset, fmt: str, path: str) -> datasets.Dataset:
    """Drop rows with nothing to learn: a blank ``text``, or a blank ``completion`` (they would train on
    ``<s></s>`` / prompt-then-eos pairs). Counted in a warning; a corpus of nothing else is refused in one line. Row
    numbers (``row``) are kept, so the survivors still name their lines. Blank .txt lines never become rows."""
    field = {"text": "text", "prompt_completion": "completion"}.get(fmt)
    if field is None:  # a conversation's empty reply is the chat template's business (ChatEncoder)
        return raw
    kept = raw.filter(lambda b: [bool(t.strip()) for t in b[field]], batched=True)
    if len(kept) == 0:
        raise UsageError(
            f"data {path!r}: every row's {field!r} is empty, so there is nothing to supervise: check the file "
            "(or --data_format / the column names)"
        )
    if len(kept) < len(raw):
        warn_once(f"dropped {len(raw) - len(kept)} of {len(raw)} rows whose {field!r} is empty (nothing to supervise)")
    return kept


def get_dataset(
    path: str,
    tokenizer,
    *,
    seq_len: int,
    data_format: str = "auto",
    split: str = "train",
    max_samples: int | None = None,
    packing: bool = False,
    train_on_prompt: bool = False,
    drop_long: bool = False,
    example_filter: Callable[[dict], bool] | None = None,
    num_proc: int | None = None,
    chat_template: str | None = None,
    teacher_tokenizer=None,
) -> datasets.Dataset:
    """Load and tokenise a corpus.

    Sources: a .jsonl/.json/.parquet/.txt (one example per non-empty line)/.md (one example per file) file or a folder
    of one kind of them, a `Dataset.save_to_disk` folder, or a hub dataset name (``load_dataset(path, split=split)``;
    ``split`` also picks from a saved DatasetDict, and is ignored for plain files, which form one split).
    Formats (``data_format="auto"`` picks from the columns): ``text``; ``prompt`` + ``completion`` (only completion
    tokens and the appended eos are targets unless ``train_on_prompt``); ``messages`` (list of {role, content},
    rendered with the chat template, or the Jinja text ``chat_template`` instead; only assistant replies and their
    end-of-turn tokens are targets, each given its context as inference renders it: see ``chat.py``). Text fields
    must be strings: a null or other value stops with the file, line and field (``check_rows``). A BOM is dropped.

    Returns a Dataset with ``id`` (the data's ``id`` as given, integers or strings, else the row number) and ``row``
    (int64 row number; see the module docstring), both kept through filtering and packing, ``input_ids`` and ``labels``
    (lists of the same length <= seq_len; labels already shifted, -100 where
    not supervised), and with ``packing`` also ``position_ids`` (restarting at 0 per document) and ``doc_ids``
    (the ids of the documents in the block; ``id`` is the first of them). Examples longer than ``seq_len`` are
    truncated (or dropped with ``drop_long``); examples left with no target are dropped; both are counted in a warning.
    ``max_samples`` keeps the first N rows, ``example_filter`` (raw row -> keep?) runs before tokenising.

    ``teacher_tokenizer`` (a teacher with another tokenizer, ``--cross_tokenizer``): each example is also tokenised
    by the teacher and aligned (``cross_columns``), adding ``teacher_input_ids``, ``chunk_ids``,
    ``teacher_chunk_ids`` and ``alignment`` (with packing also ``teacher_position_ids``); cached with the rest.
    Examples whose chunks cover less than ``MIN_ALIGNED`` of their bytes are counted in a warning; more
    than ``MAX_POORLY_ALIGNED`` of them stop the run.
    """
    if seq_len < 2:
        raise UsageError(f"seq_len {seq_len} is too small: a training example needs at least 2 tokens")
    with distributed.main_process_first():
        raw, files = load_raw(path, split)
        if max_samples is not None:
            raw = raw.select(range(min(max_samples, len(raw))))
        if len(raw) == 0:
            raise UsageError(f"data {path!r} has no examples: check the file or the split")
        fmt = detect_format(list(raw.column_names), data_format, path)
        check_rows(raw, fmt, files)
        raw = with_ids(raw, path, files)
        raw = _drop_empty(raw, fmt, path)
        if example_filter is not None:
            raw = raw.filter(example_filter, num_proc=num_proc)
            if len(raw) == 0:
                raise UsageError(f"example_filter removed every example of {path!r}: loosen the filter")

        tokenise = _Tokenise(
            tokenizer, fmt, seq_len, train_on_prompt, chat_template, null_filled(raw.features), teacher_tokenizer
        )
        ds = raw.map(tokenise, batched=True, remove_columns=raw.column_names, num_proc=num_proc, desc="tokenising")
        if teacher_tokenizer is not None:
            _check_alignment(ds, path, tokenizer, teacher_tokenizer)

        n_long, n_all = pc.sum(ds.with_format("arrow")["_truncated"]).as_py() or 0, len(ds)
        if n_long and drop_long:
            ds = ds.filter(lambda b: [not t for t in b["_truncated"]], batched=True, num_proc=num_proc)
            warn_once(f"dropped {n_long} of {n_all} examples longer than seq_len={seq_len} tokens (drop_long)")
        elif n_long:
            warn_once(f"truncated {n_long} of {n_all} examples longer than seq_len={seq_len} tokens")
        ds = ds.remove_columns("_truncated")

        n_before = len(ds)
        ds = ds.filter(
            lambda b: [any(x != IGNORE_INDEX for x in lab) for lab in b["labels"]], batched=True, num_proc=num_proc
        )
        if len(ds) < n_before:
            warn_once(
                f"dropped {n_before - len(ds)} examples with no supervised token (e.g. the prompt fills "
                f"seq_len={seq_len})"
            )
        if len(ds) == 0:
            raise UsageError(
                f"data {path!r} has no example with a supervised token left: raise seq_len or check the data"
            )

        if packing:
            ds = ds.map(
                _Pack(seq_len),
                batched=True,
                batch_size=_PACK_CHUNK,
                remove_columns=ds.column_names,
                num_proc=num_proc,
                desc="packing",
            )
    return ds


def _check_alignment(ds: datasets.Dataset, path: str, student, teacher) -> None:
    """Count the poorly aligned examples (see ``get_dataset``); too many stop the run in one line."""
    rep = ds["alignment"]
    b, u = REPORT_KEYS.index("bytes"), REPORT_KEYS.index("bytes_unaligned")
    poor = sum(1 for r in rep if r[b] and (r[b] - r[u]) / r[b] < MIN_ALIGNED)
    if poor > MAX_POORLY_ALIGNED * len(rep):
        raise UsageError(
            f"{poor} of {len(rep)} examples of {path!r} align less than {MIN_ALIGNED:.0%} of their bytes "
            f"between the student's tokenizer ({student.name_or_path!r}) and the teacher's ({teacher.name_or_path!r}) "
            f"(limit: {MAX_POORLY_ALIGNED:.0%} of the examples): this pair cannot be distilled across tokenizers"
        )
    if poor:
        warn_once(f"{poor} of {len(rep)} examples align less than {MIN_ALIGNED:.0%} of their bytes")


def split_eval(
    dataset: datasets.Dataset, eval_fraction: float, seed: int, min_eval: int = 1
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split off a held-out slice: round(len * eval_fraction) rows, at least ``min_eval`` (one micro-batch per rank),
    chosen by a permutation seeded with `seed`; both parts keep the dataset order. Returns (train, eval).

    Data too small to leave ``min_eval`` rows on both sides gives (dataset, None), evaluation off, in one logged line.
    """
    n = len(dataset)
    if not 0 < eval_fraction < 1:
        raise UsageError(
            f"eval_fraction {eval_fraction} leaves no training or no eval examples out of {n}: use a value in (0, 1)"
        )
    if n < 2 * min_eval:
        if distributed.rank_or_none() in (None, 0):
            logger.info(
                f"evaluation off: {n} examples are too few to hold out one micro-batch per rank ({min_eval}) "
                f"and train on the rest; pass --eval_data to evaluate"
            )
        return dataset, None
    n_eval = min(max(min_eval, round(n * eval_fraction)), n - min_eval)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    eval_idx = sorted(perm[:n_eval])
    train_idx = sorted(perm[n_eval:])
    return dataset.select(train_idx), dataset.select(eval_idx)
