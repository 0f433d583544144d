"""The ground floor: what every module needs, importing nothing of ours.

- ``UsageError``: a mistake in the user's input; entry points print its one line and exit 2 (no traceback).
- ``IGNORE_INDEX``: the label of a position that is not supervised (PyTorch's and Hugging Face's -100).
- ``NON_MODEL_KEYS``: the batch keys that are not model inputs.
- ``write_atomic`` / ``write_json_atomic``: a file that readers only ever see complete (temp file, fsync, rename).
- ``atomic_folder`` / ``is_complete``: a folder that readers only ever see complete (temp folder, mark, rename).
- ``read_json``: a JSON file's content, or one ``UsageError`` naming the flag and the problem.
- ``sha256_file`` and ``file_fingerprint``: content fingerprints of local files and folders.
- ``disk_full``: whether a failed write ran out of space.
- ``run_cli``: an entry point's body, a ``UsageError`` printed as one line with exit code 2.
- ``print_error``: the ``error: ...`` line, written whole (ranks that share one stderr never split it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

IGNORE_INDEX = -100  # labels[:, t] == IGNORE_INDEX: position t is not scored
NON_MODEL_KEYS = ("labels", "example_ids")  # columns of data.collate that are not model inputs (data.Batch)
COMPLETE = ".complete"  # the mark atomic_folder writes into a folder once everything else in it is written
SHA256_MAX_BYTES = 1 << 30  # files above 1 GiB are fingerprinted by size and mtime only (hashing them costs minutes)


class UsageError(ValueError):
    """A mistake in the user's input; the message is one line that says what is wrong and how to fix it."""


def run_cli(body: Callable[[], int | None]) -> int:
    """An entry point's exit code: ``body()``'s (None: 0), or 2 after printing a ``UsageError`` as one ``error: ...``
    line on stderr (no traceback). Entry points that launch ranks use ``runtime.distributed.entry_point``."""
    try:
        return body() or 0
    except UsageError as exc:
        print_error(exc)
        return 2


def print_error(message: object) -> None:
    """Print ``error: {message}`` and its newline on stderr in one ``write(2)``.

    Every rank of a launch that hits the same bad input prints the same line into the one stderr the launcher gives
    them all, and the launcher runs Python unbuffered, where ``print`` writes the text and the newline separately:
    two ranks' lines then came out spliced (``...remove iterror: ...``, seen in CI). A single write of up to
    ``PIPE_BUF`` (4096) bytes to a pipe is atomic (POSIX ``write(2)``), so each rank's line arrives whole. Where
    stderr has no file descriptor (a captured stream), it is one ``write`` call to that stream.
    """
    line = f"error: {message}\n"
    stream = sys.stderr
    stream.flush()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both OSError and ValueError
        stream.write(line)
        stream.flush()
        return
    data = line.encode(stream.encoding or "utf-8", errors="backslashreplace")
    while data:
        data = data[os.write(fd, data) :]


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that readers only ever see a complete file: a temporary file beside it, flushed
    to disk (fsync), then renamed over ``path`` (``os.replace`` is atomic on POSIX). The temporary file never
    outlives the call, whatever fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (``str()`` of anything JSON cannot hold), written by ``write_atomic``."""
    write_atomic(path, json.dumps(obj, indent=2, default=str))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, mark: bool = True) -> Iterator[Path]:
    """Build the folder ``path`` so that it only ever appears complete: the block writes into ``<path>.tmp`` (yielded,
    emptied first: a crash of an earlier build may have left it), which gets the ``COMPLETE`` mark (with ``mark``)
    and then takes the place of ``path``. An exception in the block leaves ``path`` as it was and no temporary folder;
    a kill at any moment leaves ``path`` either as it was or complete (the old folder is moved aside to
    ``<path>.old`` before the new one is renamed in, then removed), so ``is_complete`` is the test of done."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if mark:
            write_atomic(tmp / COMPLETE, "complete\n")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: str | os.PathLike) -> bool:
    """The folder was built by ``atomic_folder`` to the end (it holds the ``COMPLETE`` mark)."""
    return (Path(folder) / COMPLETE).is_file()


def read_json(path: str | os.PathLike, where: str, hint: str) -> Any:
    """A JSON file's content, or one UsageError naming ``where`` (e.g. the flag) and the problem."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{where} {path!r} does not exist: {hint}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{where} {path!r} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): fix the file"
        ) from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
    """Size, mtime and (up to ``SHA256_MAX_BYTES``) sha256 of a local file; a folder lists its files (size, mtime);
    None when ``path`` is neither (a hub dataset: its ``datasets`` fingerprint identifies it)."""
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        out: dict[str, Any] = {"path": str(p.resolve()), "bytes": st.st_size, "mtime": st.st_mtime}
        if st.st_size <= SHA256_MAX_BYTES:
            out["sha256"] = sha256_file(p)
        return out
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {
            "path": str(p.resolve()),
            "files": {str(f.relative_to(p)): {"bytes": f.stat().st_size, "mtime": f.stat().st_mtime} for f in files},
        }
    return None


def disk_full(exc: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, or the same reported without an errno (pyarrow's
    OSError, torch.save's RuntimeError "file write failed" from its zip writer)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, (OSError, RuntimeError)) and any(
        m in str(exc) for m in ("No space left", "Disk quota exceeded", "file write failed")
    )
