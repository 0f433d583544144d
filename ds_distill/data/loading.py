"""Loading a corpus: local files and folders laid out as `datasets` and the Hub lay them out, or a hub dataset;
row checks with the file and line of the first bad row; example ids (``id`` as given, ``row`` numbers)."""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from ds_distill.common import UsageError
from ds_distill.runtime import distributed

logger = logging.getLogger("ds_distill.data")

FORMATS = ("text", "prompt_completion", "messages")
# Columns each format needs, in the order they are checked by "auto".
_REQUIRED = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}
# File suffix -> `datasets` builder. .txt is one example per non-empty line, .md one example per file.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}
# Rows per packing chunk: packing is greedy within a chunk, so blocks never depend on rows far away (cacheable, and
# `num_proc` workers pack independently); the cost is at most one partly filled block per chunk.


def warn_once(msg: str) -> None:
    # Every rank computes the same counts; say it once.
    if distributed.rank_or_none() in (None, 0):
        logger.warning(msg)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix in _BUILDERS


def missing_paths(*paths: str) -> list[str]:
    """One line for each of ``paths`` (--data, --eval_data; "" = not given) that names a local file or folder that
    does not exist; a path that reads as a hub dataset name is tried when loading. The configs' checks ask (before the
    process group starts, so the line comes first), and so does ``load_raw``."""
    return [
        f"data path {p!r} does not exist: pass a .jsonl/.json/.parquet/.txt/.md file or folder, a save_to_disk folder, "
        "or a hub dataset name"
        for p in paths
        if p and not Path(p).expanduser().exists() and _looks_local(p)
    ]


def _split_files(root: Path, split: str) -> list[Path] | None:
    """The files of ``split`` in a folder laid out as the Hub lays out a dataset (``data/train-00000-of-00001.parquet``,
    ``train.jsonl`` + ``test.jsonl``, ``train/`` ...), found by `datasets`' own split patterns; None for a folder
    whose file names name no split (all of it is the one split)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(root))
    except datasets.exceptions.DataFilesNotFoundError:
        return None
    if list(patterns) == ["train"] and patterns["train"] == ["**"]:  # no split in any name
        return None
    if split not in patterns:
        raise UsageError(
            f"data folder {str(root)!r} has splits {sorted(patterns)}, not {split!r}: pick one with --data_split"
        )
    resolved = DataFilesDict.from_patterns({split: patterns[split]}, base_path=str(root))[split]
    return sorted(Path(f) for f in resolved if Path(f).suffix in _BUILDERS)


def _data_files(root: Path, split: str = "train") -> tuple[str, list[Path]]:
    """The builder name and the files of a file or a folder of files (all of one kind, searched recursively; in a
    folder whose file names name splits, those of ``split``)."""
    if root.is_file():
        files = [root]
    elif (in_split := _split_files(root, split)) is not None:
        files = in_split
    else:
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix in _BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    if not files:
        raise UsageError(
            f"data folder {str(root)!r} holds no {'/'.join(_BUILDERS)} files: point --data at a file or a folder of "
            "them"
        )
    if files[0].suffix not in _BUILDERS:
        raise UsageError(
            f"data file {str(root)!r} has an unknown suffix {files[0].suffix!r}: use one of {', '.join(_BUILDERS)}"
        )
    kinds = {_BUILDERS[p.suffix] for p in files}
    if len(kinds) > 1 or len({p.suffix for p in files} & {".txt", ".md"}) > 1:
        raise UsageError(
            f"data folder {str(root)!r} mixes file kinds {sorted({p.suffix for p in files})}: keep one kind per folder"
        )
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
                raise UsageError(
                    f"data file {str(p)!r} line {line} is not valid UTF-8 "
                    f"(byte {offset + at}): re-encode the file as UTF-8"
                ) from None
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
        column, kind = (
            (
                column.storage
                if isinstance(column, pa.Array)
                else pa.chunked_array([c.storage for c in column.chunks], kind.storage_type)
            ),
            kind.storage_type,
        )
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
    return (
        found,
        "null"
        if value is None
        else f"a {type(value).__name__ if not isinstance(value, str) else 'JSON ' + value[:20]}",
    )


def check_rows(raw: datasets.Dataset, fmt: str, files: list[Path] | None) -> None:
    """Refuse a null or non-string text / prompt / completion / message role or content, in one line naming the file,
    the line and the field, before any tokenising. Vectorised (pyarrow compute) over the loaded columns."""
    import pyarrow as pa

    table = raw.with_format("arrow")[:]
    fields = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ()}[fmt]
    for name in fields:
        bad = _first_bad_string(table.column(name))
        if bad:
            raise UsageError(
                f"{_where(files, bad[0])}: field {name!r} is {bad[1]}, not a string: fix or remove that row"
            )
    if fmt != "messages":
        return
    column = table.column("messages")
    value_type = column.type.value_type if pa.types.is_list(column.type) else None
    if (
        isinstance(value_type, pa.BaseExtensionType)
        or (value_type is not None and pa.types.is_struct(value_type) and value_type.get_field_index("tool_calls") >= 0)
        or "tools" in table.column_names
    ):
        # Tool-calling chats: messages of different keys (`datasets` loads them as JSON per message), tool calls,
        # a tools column. Checked row by row in Python: the nesting is the data's own.
        _check_tool_rows(raw, files)
        return
    if value_type is None or not pa.types.is_struct(value_type):
        raise UsageError(
            f"{_where(files, 0)}: field 'messages' is {column.type}, not a list of {{role, content}} objects: "
            f'write each conversation as [{{"role": ..., "content": ...}}, ...]'
        )
    for key in ("role", "content"):
        if column.type.value_type.get_field_index(key) < 0:
            raise UsageError(
                f"{_where(files, 0)}: the messages have no {key!r} field: each message needs 'role' and 'content'"
            )
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
                raise UsageError(
                    f"{_where(files, start + row)}: field 'messages[{turn}].{key}' is {bad[1]}, not a string: "
                    f"fix or remove that message"
                )
        start += len(chunk)


_CALL_FORMAT = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
_TOOL_FORMAT = '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'


def decode_tools(value: Any) -> Any:
    """A row's ``tools`` as the template takes them: a list of tool schemas. Hub datasets often store them as one
    JSON string per row (xlam, hermes-function-calling); ``None`` or an empty list means no tools."""
    return json.loads(value) if isinstance(value, str) else value


def _named(item: Any) -> bool:
    """A tool call or tool schema names its function: ``{"function": {"name": str}}`` or the flat ``{"name": str}``."""
    fn = item.get("function", item) if isinstance(item, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str)


def _message_problem(turn: int, m: Any) -> str | None:
    """What is wrong with message ``turn`` of a conversation, as 'field ...: the fix', or None."""
    if not isinstance(m, dict):
        return (
            f'field \'messages[{turn}]\' is a {type(m).__name__}: write each message as {{"role": ..., "content": ...}}'
        )
    if not isinstance(m.get("role"), str):
        return f"field 'messages[{turn}].role' is {m.get('role')!r}, not a string: give every message a role"
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant" or not isinstance(calls, list):
            return (
                f"field 'messages[{turn}].tool_calls' is not a list of tool calls of an assistant message: write "
                f"it as [{_CALL_FORMAT}, ...] on an assistant message"
            )
        for k, call in enumerate(calls):
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not _named(call) or not isinstance(fn.get("arguments"), (dict, str)):
                return (
                    f"field 'messages[{turn}].tool_calls[{k}]' has no function name or arguments: write each tool "
                    f"call as {_CALL_FORMAT}"
                )
    content = m.get("content")
    if not isinstance(content, str) and not (content is None and calls):
        what = "null" if content is None else f"a {type(content).__name__}"
        return f"field 'messages[{turn}].content' is {what}, not a string: fix or remove that message"
    return None


def null_filled(features: datasets.Features) -> tuple[str, ...]:
    """The chat columns (``messages``, ``tools``) that `datasets` holds as Arrow structs: every object there has every
    key seen in the column, null where the row did not write it (parquet from the Hub, or rows of one shape). Their
    nulls mean "absent" and are dropped before rendering; a column of JSON values (``datasets.Json``, which `datasets`
    uses when rows differ in shape) keeps each object exactly as written."""
    return tuple(
        c
        for c in ("messages", "tools")
        if isinstance(features.get(c), datasets.List) and isinstance(features[c].feature, dict)
    )


def drop_nulls(value: Any) -> Any:
    """``value`` with every null-valued key of every nested object removed (see ``null_filled``)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _check_tool_rows(raw: datasets.Dataset, files: list[Path] | None) -> None:
    """check_rows for conversations with tool calls or a ``tools`` column, row by row (decoded by `datasets`)."""
    columns = ["messages"] + (["tools"] if "tools" in raw.column_names else [])
    for start in range(0, len(raw), 1000):
        batch = raw.select_columns(columns)[start : start + 1000]
        for n, messages in enumerate(batch["messages"]):
            if not isinstance(messages, list):
                raise UsageError(
                    f"{_where(files, start + n)}: field 'messages' is "
                    f"{'null' if messages is None else type(messages).__name__}, "
                    f'not a list of messages: write each conversation as [{{"role": ..., "content": ...}}, ...]'
                )
            for turn, m in enumerate(messages):
                problem = _message_problem(turn, m)
                if problem:
                    raise UsageError(f"{_where(files, start + n)}: {problem}")
            if "tools" not in batch:
                continue
            try:
                tools = decode_tools(batch["tools"][n])
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"{_where(files, start + n)}: field 'tools' is a string but not JSON ({exc.msg}): write it as a "
                    f"JSON list of tools [{_TOOL_FORMAT}, ...]"
                ) from None
            if tools is not None and not isinstance(tools, list):
                raise UsageError(
                    f"{_where(files, start + n)}: field 'tools' is a {type(tools).__name__}: write it as a list of "
                    f"tools [{_TOOL_FORMAT}, ...]"
                )
            for k, tool in enumerate(tools or []):
                if not _named(tool):
                    raise UsageError(
                        f"{_where(files, start + n)}: field 'tools[{k}]' has no function name: write each tool as "
                        f"{_TOOL_FORMAT}"
                    )


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
            raise UsageError(
                f"{_where(files, null)}: field 'id' is null: give every row an id, or drop the 'id' column"
            )
        if isinstance(kind, pa.BaseExtensionType):  # `datasets` Json (JSON text per value): the file mixes id types
            values = [None if v is None else json.loads(v) for v in column.combine_chunks().storage.to_pylist()]
            odd = next(i for i, v in enumerate(values) if v is None or type(v) is not type(values[0]))
            if values[odd] is None:
                raise UsageError(
                    f"{_where(files, odd)}: field 'id' is null: give every row an id, or drop the 'id' column"
                )
            raise UsageError(
                f"{_where(files, odd)}: field 'id' is {values[odd]!r} but the first row's id is "
                f"{values[0]!r}: use one id type (all integers or all strings)"
            )
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UsageError(f"data {path!r}: its 'id' column holds {kind} values: ids must be integers or strings")
        if pc.count_distinct(column).as_py() != len(raw):
            raise UsageError(
                f"data {path!r} has duplicate values in its 'id' column: make them unique or drop the column"
            )
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
                raise UsageError(
                    f"data file {str(p)!r} line {n} is not valid JSON ({exc.msg}, column {exc.colno}): fix or remove "
                    "that line"
                ) from None
            if not isinstance(row, dict):
                raise UsageError(
                    f"data file {str(p)!r} line {n} is a JSON {type(row).__name__}, not an object: write one {{...}} "
                    "per line"
                )


def load_raw(path: str, split: str) -> tuple[datasets.Dataset, list[Path] | None]:
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
        builder, files = _data_files(p, split)
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
    if problems := missing_paths(path):
        raise UsageError(problems[0])
    try:
        return datasets.load_dataset(path, split=split), None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as exc:
        raise UsageError(
            f"data {path!r} is neither a local path nor a loadable hub dataset ({str(exc).splitlines()[0]}): check "
            "the name or the path"
        ) from None


def format_of(path: str, split: str, data_format: str = "auto") -> str:
    """The format ``get_dataset`` reads ``path`` in (``detect_format`` of its columns); cheap after ``get_dataset``,
    whose load ``datasets`` has cached."""
    return detect_format(list(load_raw(path, split)[0].column_names), data_format, path)


def detect_format(columns: list[str], data_format: str, path: str) -> str:
    if data_format not in ("auto", *FORMATS):
        raise UsageError(f"data_format {data_format!r} is unknown: use auto, {', '.join(FORMATS)}")
    if data_format == "auto":
        for fmt, cols in _REQUIRED.items():
            if all(c in columns for c in cols):
                return fmt
        raise UsageError(
            f"data {path!r} has columns {columns}; expected 'text', or 'prompt' + 'completion', or 'messages': rename "
            "the columns"
        )
    missing = [c for c in _REQUIRED[data_format] if c not in columns]
    if missing:
        raise UsageError(
            f"data {path!r} has columns {columns} but data_format {data_format!r} needs "
            f"{list(_REQUIRED[data_format])}: "
            f"rename the columns or change data_format"
        )
    return data_format
