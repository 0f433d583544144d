"""Training data: load a corpus, tokenise it with supervision masks, optionally pack it, and stream sharded batches.

    ds = get_dataset("train.jsonl", tokenizer, seq_len=1024)          # columns: id, row, input_ids, labels
    train, held_out = split_eval(ds, 0.05, seed=0)
    stream = BatchStream(train, batch_size=8, rank=r, world_size=w, seed=0, pad_token_id=tokenizer.pad_token_id)
    batch = next(stream)    # input_ids, attention_mask, [position_ids], labels, example_ids

Labels are stored *already shifted*: ``labels[t]`` is the target of position ``t`` (token ``t + 1``) or -100, so a
loss never shifts again and the last position of every document is -100.

Example ids. ``id`` is the data's own id as given (an ``id`` column of integers or of strings, unique, never null),
else the row number; ``row`` is the example's row number in the loaded data (int64, 0-based, after ``max_samples``).
Batches carry ``example_ids`` = ``row`` as an int64 tensor (strings cannot travel in tensors or collectives); where
ids are written for people (``examples.csv``), ``SourceIds`` maps rows back to the ``id`` as given. A conversation
split into one example per assistant turn (``chat.py``) gives several examples with the same ``id`` and ``row``.
"""
from __future__ import annotations

import codecs
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from ds_distill.chat import ChatEncoder
from ds_distill.config import UsageError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("text", "prompt_completion", "messages")
# Columns each format needs, in the order they are checked by "auto".
_REQUIRED = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
# File suffix -> `datasets` builder. .txt is one example per non-empty line, .md one example per file.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}
# Rows per packing chunk: packing is greedy within a chunk, so blocks never depend on rows far away (cacheable, and
# `num_proc` workers pack independently); the cost is at most one partly filled block per chunk.
_PACK_CHUNK = 1000


def _dist_rank() -> int | None:
    """This process's rank if torch.distributed is initialised, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return None


@contextmanager
def main_process_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (which then hit the `datasets` cache).

    Without torch.distributed this is a no-op. If rank 0 fails inside the body it still reaches the barrier, so the
    other ranks do not hang: they run the body themselves and fail with the same error.
    """
    rank = _dist_rank()
    if rank is not None and rank != 0:
        torch.distributed.barrier()
    try:
        yield
    finally:
        if rank == 0:
            torch.distributed.barrier()


def _warn(msg: str) -> None:
    # Every rank computes the same counts; say it once.
    if _dist_rank() in (None, 0):
        logger.warning(msg)


# ----------------------------------------------------------------------------------------------------- loading


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix in _BUILDERS


def _data_files(root: Path) -> tuple[str, list[Path]]:
    """The builder name and the files of a file or a folder of files (all of one kind, searched recursively)."""
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _BUILDERS
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise UsageError(f"data folder {str(root)!r} holds no {'/'.join(_BUILDERS)} files: point --data at a file or a folder of them")
    if files[0].suffix not in _BUILDERS:
        raise UsageError(f"data file {str(root)!r} has an unknown suffix {files[0].suffix!r}: use one of {', '.join(_BUILDERS)}")
    kinds = {_BUILDERS[p.suffix] for p in files}
    if len(kinds) > 1 or len({p.suffix for p in files} & {".txt", ".md"}) > 1:
        raise UsageError(f"data folder {str(root)!r} mixes file kinds {sorted({p.suffix for p in files})}: keep one kind per folder")
    for p in files:
        if p.stat().st_size == 0:
            raise UsageError(f"data file {str(p)!r} is empty: remove it or fill it")
    return kinds.pop(), files


def _check_utf8(p: Path) -> None:
    """Raise a UsageError naming the line of the first invalid UTF-8 byte. Streams the file in 16 MiB chunks.

    Needed up front: pyarrow's JSON reader accepts invalid UTF-8 and the error would only surface later, far from the
    file, when a row is read.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(p, "rb") as fh:
        while True:
            chunk = fh.read(1 << 24)
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = max(exc.start - pending, 0)
                line += chunk[:at].count(b"\n")
                raise UsageError(f"data file {str(p)!r} line {line} is not valid UTF-8 "
                                 f"(byte {offset + at}): re-encode the file as UTF-8") from None
            if not chunk:
                return
            line += chunk.count(b"\n")
            offset += len(chunk)


def _json_rows(p: Path) -> tuple[str, list[int]] | None:
    """How a JSON data file numbers its rows: ("line", [line number of row 0, row 1, ...]) for JSON lines (blank lines
    skipped, as the reader does) or ("entry", [1, 2, ...]) for a whole-file array; None if it is neither."""
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
            if isinstance(rows, list):
                return "entry", list(range(1, len(rows) + 1))
        except json.JSONDecodeError:
            pass
    return "line", [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _where(files: list[Path] | None, index: int) -> str:
    """'data file 'x.jsonl' line 7' for row ``index`` of the loaded data. Only called to report a bad row, so the files
    are re-read here rather than tracked while loading."""
    for p in files or []:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            kind, numbers = "row", list(range(1, pq.ParquetFile(p).metadata.num_rows + 1))
        else:
            kind, numbers = _json_rows(p) or ("row", [])
        if index < len(numbers):
            return f"data file {str(p)!r} {kind} {numbers[index]}"
        index -= len(numbers)
    return f"data row {index + 1}"


def _first_bad_string(column) -> tuple[int, str] | None:
    """(index, what it is) of the first value of an Arrow column that is not a string, or None.

    Mixed-type JSON fields are loaded by `datasets` as its Json extension type (JSON text per value): a value is a
    string there iff its JSON text starts with a quote.
    """
    import pyarrow as pa

    kind = column.type
    if isinstance(kind, pa.BaseExtensionType):
        column, kind = (column.storage if isinstance(column, pa.Array) else
                        pa.chunked_array([c.storage for c in column.chunks], kind.storage_type)), kind.storage_type
        bad = pc.invert(pc.fill_null(pc.starts_with(column, '"'), False))
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        bad = pc.is_null(column)
    elif pa.types.is_null(kind):
        return 0, "null"
    else:
        return 0, f"of type {kind}"
    found = pc.index(bad, True).as_py()
    if found < 0:
        return None
    value = column[found].as_py()
    return found, "null" if value is None else f"a {type(value).__name__ if not isinstance(value, str) else 'JSON ' + value[:20]}"


def check_rows(raw: datasets.Dataset, fmt: str, files: list[Path] | None) -> None:
    """Refuse a null or non-string text / prompt / completion / message role or content, in one line naming the file,
    the line and the field, before any tokenising. Vectorised (pyarrow compute) over the loaded columns."""
    import pyarrow as pa

    table = raw.with_format("arrow")[:]
    fields = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ()}[fmt]
    for name in fields:
        bad = _first_bad_string(table.column(name))
        if bad:
            raise UsageError(f"{_where(files, bad[0])}: field {name!r} is {bad[1]}, not a string: fix or remove that row")
    if fmt != "messages":
        return
    column = table.column("messages")
    if not pa.types.is_list(column.type) or not pa.types.is_struct(column.type.value_type):
        raise UsageError(f"{_where(files, 0)}: field 'messages' is {column.type}, not a list of {{role, content}} objects: "
                         f"write each conversation as [{{\"role\": ..., \"content\": ...}}, ...]")
    for key in ("role", "content"):
        if column.type.value_type.get_field_index(key) < 0:
            raise UsageError(f"{_where(files, 0)}: the messages have no {key!r} field: each message needs 'role' and 'content'")
    start = 0  # row of the chunk's first conversation (chunk by chunk: a column is never copied whole)
    for chunk in column.chunks:
        null_row = pc.index(pc.is_null(chunk), True).as_py()
        if null_row >= 0:
            raise UsageError(f"{_where(files, start + null_row)}: field 'messages' is null: fix or remove that row")
        flat, parent = pc.list_flatten(chunk), pc.list_parent_indices(chunk)
        for key in ("role", "content"):
            bad = _first_bad_string(pc.struct_field(flat, key))
            if bad:
                row = parent[bad[0]].as_py()
                turn = bad[0] - pc.index(parent, row).as_py()
                raise UsageError(f"{_where(files, start + row)}: field 'messages[{turn}].{key}' is {bad[1]}, not a string: "
                                 f"fix or remove that message")
        start += len(chunk)


def with_ids(raw: datasets.Dataset, path: str, files: list[Path] | None) -> datasets.Dataset:
    """Add ``row`` (int64 row number) and, when the data has no ``id`` column, ``id`` = ``row``.

    A data ``id`` column is kept as given when it holds integers or strings: null ids, mixed types and duplicates are
    refused in one line naming the file and line.
    """
    import pyarrow as pa

    if "id" in raw.column_names:
        column = raw.with_format("arrow")[:].column("id")
        kind = column.type
        null = pc.index(pc.is_null(column), True).as_py() if not isinstance(kind, pa.BaseExtensionType) else -1
        if null >= 0:
            raise UsageError(f"{_where(files, null)}: field 'id' is null: give every row an id, or drop the 'id' column")
        if isinstance(kind, pa.BaseExtensionType):  # `datasets` Json (JSON text per value): the file mixes id types
            values = [None if v is None else json.loads(v) for v in column.combine_chunks().storage.to_pylist()]
            odd = next(i for i, v in enumerate(values) if v is None or type(v) is not type(values[0]))
            if values[odd] is None:
                raise UsageError(f"{_where(files, odd)}: field 'id' is null: give every row an id, or drop the 'id' column")
            raise UsageError(f"{_where(files, odd)}: field 'id' is {values[odd]!r} but the first row's id is "
                             f"{values[0]!r}: use one id type (all integers or all strings)")
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UsageError(f"data {path!r}: its 'id' column holds {kind} values: ids must be integers or strings")
        if pc.count_distinct(column).as_py() != len(raw):
            raise UsageError(f"data {path!r} has duplicate values in its 'id' column: make them unique or drop the column")
        if pa.types.is_integer(kind) and kind != pa.int64():
            raw = raw.cast_column("id", datasets.Value("int64"))
    else:
        raw = raw.add_column("id", np.arange(len(raw), dtype=np.int64))
    if "row" in raw.column_names:  # a column of the data named like ours: training never reads it
        raw = raw.remove_columns("row")
    return raw.add_column("row", np.arange(len(raw), dtype=np.int64))


class SourceIds:
    """Rows -> the data's ids as given, for a tokenised dataset (columns ``row`` and ``id``; packed blocks too).

    ``ids([3, 0])`` -> e.g. ``["conv-3", "conv-0"]``. The lookup table is built on the first call (two columns of
    the dataset), so a run that never writes ids never pays for it.
    """

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset
        self._rows: np.ndarray | None = None

    def __call__(self, rows: list[int]) -> list[int | str]:
        if self._rows is None:
            table = self.dataset.select_columns(["row", "id"]).with_format("arrow")[:]
            rows_col = table.column("row").to_numpy()
            self._order = np.argsort(rows_col, kind="stable")
            self._rows, self._ids = rows_col[self._order], table.column("id").to_pylist()
        at = self._order[np.searchsorted(self._rows, np.asarray(rows, dtype=np.int64))]
        return [self._ids[i] for i in at]


def _diagnose_json(files: list[Path]) -> None:
    """Raise a UsageError naming the file and line of a malformed JSON line.

    Called only after `datasets` failed, so valid corpora are parsed once (by `datasets`, in Arrow) and not twice.
    """
    for p in files:
        text = p.read_text(encoding="utf-8-sig")
        if p.suffix == ".json":
            try:  # a whole-file JSON array is fine; otherwise it must be JSON lines
                json.loads(text)
                continue
            except json.JSONDecodeError:
                pass
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"data file {str(p)!r} line {n} is not valid JSON ({exc.msg}, column {exc.colno}): fix or remove that line") from None
            if not isinstance(row, dict):
                raise UsageError(f"data file {str(p)!r} line {n} is a JSON {type(row).__name__}, not an object: write one {{...}} per line")


def _load_raw(path: str, split: str) -> tuple[datasets.Dataset, list[Path] | None]:
    """The raw rows and, for local files, the files they came from, in order (to name the line of a bad row)."""
    p = Path(path).expanduser()
    if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UsageError(f"saved dataset {path!r} has splits {sorted(ds)}, not {split!r}: pick one of them")
            ds = ds[split]
        return ds, None
    if p.exists():
        builder, files = _data_files(p)
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" and files[0].suffix == ".md" else {}
        if builder == "text":
            kwargs["encoding"] = "utf-8-sig"  # drops a BOM (pyarrow's JSON reader already skips one)
        if builder != "parquet":
            for f in files:
                _check_utf8(f)
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
        except Exception:  # noqa: BLE001 - find the offending file and line for the user, else re-raise as is
            if builder == "json":
                _diagnose_json(files)
            raise
        if builder == "text" and files[0].suffix == ".txt":
            ds = ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
        if builder == "text":
            files = None  # rows no longer follow lines; a text row is never null anyway
        return ds, files
    if _looks_local(path):
        raise UsageError(f"data path {path!r} does not exist: pass a .jsonl/.json/.parquet/.txt/.md file or folder, a save_to_disk folder, or a hub dataset name")
    try:
        return datasets.load_dataset(path, split=split), None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as exc:
        raise UsageError(f"data {path!r} is neither a local path nor a loadable hub dataset ({str(exc).splitlines()[0]}): check the name or the path") from None


def _detect_format(columns: list[str], data_format: str, path: str) -> str:
    if data_format not in ("auto", *FORMATS):
        raise UsageError(f"data_format {data_format!r} is unknown: use auto, {', '.join(FORMATS)}")
    if data_format == "auto":
        for fmt, cols in _REQUIRED.items():
            if all(c in columns for c in cols):
                return fmt
        raise UsageError(f"data {path!r} has columns {columns}; expected 'text', or 'prompt' + 'completion', or 'messages': rename the columns")
    missing = [c for c in _REQUIRED[data_format] if c not in columns]
    if missing:
        raise UsageError(f"data {path!r} has columns {columns} but data_format {data_format!r} needs {list(_REQUIRED[data_format])}: "
                         f"rename the columns or change data_format")
    return data_format


# ---------------------------------------------------------------------------------------------------- tokenising


def _shift(ids: list[int], supervised: list[bool]) -> list[int]:
    """labels[t] = ids[t + 1] where token t + 1 is supervised, else -100; the last position is always -100."""
    return [ids[t + 1] if supervised[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


class _Tokenise:
    """The batched `datasets.map` function: raw rows -> input_ids, labels (shifted), _truncated. A class (not a
    closure) so the `datasets` fingerprint, hence the cache, depends only on these settings and the tokenizer."""

    def __init__(self, tokenizer, fmt: str, seq_len: int, train_on_prompt: bool, chat_template: str | None = None):
        self.tokenizer, self.fmt, self.seq_len, self.train_on_prompt = tokenizer, fmt, seq_len, train_on_prompt
        eos = tokenizer.eos_token_id
        if fmt != "messages" and eos is None:
            raise UsageError(f"tokenizer {tokenizer.name_or_path!r} has no eos token: set eos_token in its tokenizer_config.json")
        self.chat = ChatEncoder(tokenizer, chat_template, train_on_prompt) if fmt == "messages" else None
        # Does encoding with special tokens already append eos (some tokenizers do, Llama's do not)?
        probe = tokenizer("a")["input_ids"]
        self.adds_eos = eos is not None and len(probe) > 0 and probe[-1] == eos
        self.eos = eos

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.fmt == "text":
            rows = [[(ids if self.adds_eos else ids + [self.eos], None)]
                    for ids in self.tokenizer(batch["text"])["input_ids"]]
        elif self.fmt == "prompt_completion":
            prompts = self.tokenizer(batch["prompt"])["input_ids"]
            completions = self.tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
            rows = []
            for p, c in zip(prompts, completions):
                p = p[:-1] if self.adds_eos else p  # the eos belongs after the completion, not the prompt
                rows.append([(p + c + [self.eos], [self.train_on_prompt] * len(p) + [True] * (len(c) + 1))])
        else:
            rows = [self._messages(m, i) for m, i in zip(batch["messages"], batch["id"])]
        # A conversation may give several examples (one per assistant turn): each keeps the row's id and row number.
        out: dict[str, list] = {"id": [], "row": [], "input_ids": [], "labels": [], "_truncated": []}
        for example_id, row, examples in zip(batch["id"], batch["row"], rows):
            for ids, sup in examples:
                sup = sup if sup is not None else [True] * len(ids)
                out["id"].append(example_id)
                out["row"].append(row)
                out["_truncated"].append(len(ids) > self.seq_len)
                ids, sup = ids[: self.seq_len], sup[: self.seq_len]
                out["input_ids"].append(ids)
                out["labels"].append(_shift(ids, sup))
        return out

    def _messages(self, messages: list[dict], example_id) -> list[tuple[list[int], list[bool]]]:
        """One example for the conversation, or one per assistant turn: see ``chat.ChatEncoder``."""
        # `datasets` gives every message every key seen in the file (None where absent); a template must see the
        # message as written, as apply_chat_template does (it drops None values too).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self.chat(messages, f"example id {example_id!r}")


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
        return out


def get_dataset(path: str, tokenizer, *, seq_len: int, data_format: str = "auto", split: str = "train",
                max_samples: int | None = None, packing: bool = False, train_on_prompt: bool = False,
                drop_long: bool = False, example_filter: Callable[[dict], bool] | None = None,
                num_proc: int | None = None, chat_template: str | None = None) -> datasets.Dataset:
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
    (int64 row number; see the module docstring), both kept through filtering and packing, ``input_ids`` and ``labels`` (lists of the same length <= seq_len; labels already shifted, -100 where
    not supervised), and with ``packing`` also ``position_ids`` (restarting at 0 per document) and ``doc_ids``
    (the ids of the documents in the block; ``id`` is the first of them). Examples longer than ``seq_len`` are
    truncated (or dropped with ``drop_long``); examples left with no target are dropped; both are counted in a warning.
    ``max_samples`` keeps the first N rows, ``example_filter`` (raw row -> keep?) runs before tokenising.
    """
    if seq_len < 2:
        raise UsageError(f"seq_len {seq_len} is too small: a training example needs at least 2 tokens")
    with main_process_first():
        raw, files = _load_raw(path, split)
        if max_samples is not None:
            raw = raw.select(range(min(max_samples, len(raw))))
        if len(raw) == 0:
            raise UsageError(f"data {path!r} has no examples: check the file or the split")
        fmt = _detect_format(list(raw.column_names), data_format, path)
        check_rows(raw, fmt, files)
        raw = with_ids(raw, path, files)
        if example_filter is not None:
            raw = raw.filter(example_filter, num_proc=num_proc)
            if len(raw) == 0:
                raise UsageError(f"example_filter removed every example of {path!r}: loosen the filter")

        tokenise = _Tokenise(tokenizer, fmt, seq_len, train_on_prompt, chat_template)
        ds = raw.map(tokenise, batched=True, remove_columns=raw.column_names, num_proc=num_proc, desc="tokenising")

        n_long, n_all = pc.sum(ds.with_format("arrow")["_truncated"]).as_py() or 0, len(ds)
        if n_long and drop_long:
            ds = ds.filter(lambda b: [not t for t in b["_truncated"]], batched=True, num_proc=num_proc)
            _warn(f"dropped {n_long} of {n_all} examples longer than seq_len={seq_len} tokens (drop_long)")
        elif n_long:
            _warn(f"truncated {n_long} of {n_all} examples longer than seq_len={seq_len} tokens")
        ds = ds.remove_columns("_truncated")

        n_before = len(ds)
        ds = ds.filter(lambda b: [any(x != IGNORE_INDEX for x in lab) for lab in b["labels"]], batched=True, num_proc=num_proc)
        if len(ds) < n_before:
            _warn(f"dropped {n_before - len(ds)} examples with no supervised token (e.g. the prompt fills seq_len={seq_len})")
        if len(ds) == 0:
            raise UsageError(f"data {path!r} has no example with a supervised token left: raise seq_len or check the data")

        if packing:
            ds = ds.map(_Pack(seq_len), batched=True, batch_size=_PACK_CHUNK, remove_columns=ds.column_names,
                        num_proc=num_proc, desc="packing")
    return ds


def split_eval(dataset: datasets.Dataset, eval_fraction: float, seed: int,
               min_eval: int = 1) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Split off a held-out slice: round(len * eval_fraction) rows, at least ``min_eval`` (one micro-batch per rank),
    chosen by a permutation seeded with `seed`; both parts keep the dataset order. Returns (train, eval).

    Data too small to leave ``min_eval`` rows on both sides gives (dataset, None), evaluation off, in one logged line.
    """
    n = len(dataset)
    if not 0 < eval_fraction < 1:
        raise UsageError(f"eval_fraction {eval_fraction} leaves no training or no eval examples out of {n}: use a value in (0, 1)")
    if n < 2 * min_eval:
        if _dist_rank() in (None, 0):
            logger.info(f"evaluation off: {n} examples are too few to hold out one micro-batch per rank ({min_eval}) "
                        f"and train on the rest; pass --eval_data to evaluate")
        return dataset, None
    n_eval = min(max(min_eval, round(n * eval_fraction)), n - min_eval)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    eval_idx = sorted(perm[:n_eval])
    train_idx = sorted(perm[n_eval:])
    return dataset.select(train_idx), dataset.select(eval_idx)


# ---------------------------------------------------------------------------------------------------- batching


def collate(rows: dict[str, list], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Columns of B examples -> a right-padded batch, padded to the longest example (T).

    Returns input_ids [B, T] long, labels [B, T] long (-100 on pads), example_ids [B] int64 (``row``) and either
    attention_mask [B, T] long (1 = token, 0 = pad) or, for packed rows, position_ids [B, T] long restarting at 0 per
    document and no attention mask: transformers then builds per-document causal attention from the positions
    (masking_utils.find_packed_sequence_indices; varlen kernels with flash attention), keeping each model's own
    sliding windows and attention variants. Pads restart at 0 too, so they form one extra block of their own.
    The model must run with ``use_cache=False`` (as ``models.HiddenStatesLM`` does): with a cache, transformers
    ignores packed position_ids.
    """
    lengths = [len(x) for x in rows["input_ids"]]
    B, T = len(lengths), max(lengths)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"])):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    batch = {"input_ids": input_ids}
    if "position_ids" in rows:
        position_ids = torch.zeros((B, T), dtype=torch.long)
        for b, pos in enumerate(rows["position_ids"]):
            position_ids[b, : len(pos)] = torch.tensor(pos, dtype=torch.long)
            position_ids[b, len(pos):] = torch.arange(T - len(pos))  # the pad block restarts at 0 too
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch["labels"] = labels
    batch["example_ids"] = torch.tensor(rows["row"], dtype=torch.int64)  # row numbers: see the module docstring
    return batch


class BatchStream:
    """Endless, seeded, resumable micro-batches of one rank, in one global order whatever the number of ranks.

    Each epoch draws a permutation of the dataset seeded with (seed, epoch). Micro-step k of the epoch covers the
    global examples perm[k*B*W : (k+1)*B*W] (B = batch_size, W = world_size) and rank r takes the r-th B of them: the
    ranks' batches are disjoint, and W ranks x B read the same examples per micro-step as 1 rank x W*B. An epoch ends
    when fewer than B*W examples are left (they are dropped). The position is the count of the epoch's examples read
    by all ranks together, so a checkpoint resumes on any number of ranks with no example skipped or read twice.
    """

    def __init__(self, dataset, *, batch_size: int, rank: int, world_size: int, seed: int, pad_token_id: int | None,
                 shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        # Tokenizers without a pad token (Llama 3) are common; the pad id's value never matters because pads are
        # masked out of attention and carry label -100, so any valid id will do.
        self.seed, self.pad_token_id, self.shuffle = seed, 0 if pad_token_id is None else pad_token_id, shuffle
        if len(dataset) // world_size < batch_size:
            raise UsageError(f"the dataset has {len(dataset)} examples, which gives each of {world_size} ranks "
                             f"{len(dataset) // world_size}, fewer than the micro-batch size {batch_size}: use more data or a smaller batch")
        self.epoch = 0
        self.consumed = 0  # examples of this epoch read by all ranks together
        self._order: list[int] | None = None  # cached global order of `self.epoch`

    @property
    def index(self) -> int:
        """Examples of this epoch read by this rank."""
        return self.consumed // self.world_size

    def _order_of(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        # One generator seed per (seed, epoch) pair; the large odd multiplier keeps pairs apart.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _shard_of(self, epoch: int) -> list[int]:
        """This rank's positions of ``epoch``, in the order it reads them."""
        order, step = self._order_of(epoch), self.batch_size * self.world_size
        start = self.rank * self.batch_size
        return [i for k in range(0, len(order) - step + 1, step) for i in order[k + start: k + start + self.batch_size]]

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.consumed + self.batch_size * self.world_size > len(self.dataset):
            self.epoch, self.consumed, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._order_of(self.epoch)
        start = self.consumed + self.rank * self.batch_size
        rows = self.dataset[self._order[start: start + self.batch_size]]
        self.consumed += self.batch_size * self.world_size
        return collate(rows, self.pad_token_id)

    def state_dict(self) -> dict:
        """{"epoch": int, "consumed": int}: examples of the epoch already read by all ranks together."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        # "index" (per-rank examples) is the position checkpoints of earlier versions saved (same world size).
        consumed = state["consumed"] if "consumed" in state else int(state["index"]) * self.world_size
        self.epoch, self.consumed, self._order = int(state["epoch"]), int(consumed), None
