"""Aligning two tokenizations of the same text by the bytes their tokens cover (cross-tokenizer distillation).

Both tokenizers must be fast ones (``return_offsets_mapping``). Their character offsets become UTF-8 byte spans, and one
shared conversion (``units``) turns each side's spans into a tiling of the text, whatever the tokenizer's kind:

- byte-level BPE pieces of one multi-byte character (``'Ã', '©'``) and SentencePiece byte-fallback tokens
  (``<0xC3>``, ``<0xA9>``) all report the whole character: overlapping spans are glued into one unit;
- a marker whose offsets leave out its space (``'Ġw'`` with ``trim_offsets``, a bare ``'Ġ'`` of width 0) or a
  SentencePiece ``'▁'`` prepended to the text (it overlaps the next token) is handled by the same two rules: bytes
  that no token reports belong to the token after them, and a token of width 0 joins its neighbour.

A chunk is a smallest group of consecutive student tokens and consecutive teacher tokens that cover exactly the same
bytes (1:1 when both groups are single tokens): the chunks are cut where both sides have a unit boundary at the same
byte. Special tokens (BOS on one side only, EOS, chat markup) belong to no chunk and no chunk crosses them, nor the
end of a region: the caller aligns a list of regions, pairs of byte ranges holding the same bytes on both sides (the
prompt and the completion apart, each message's content in a rendered chat), so no chunk crosses the supervision
boundary. Documents are aligned one by one before packing, so no chunk crosses a document boundary either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ds_distill.common import UsageError

Span = tuple[int, int]


@dataclass(frozen=True)
class Encoded:
    """One tokenization of a text: ``ids``, each token's byte span ``[start, end)`` in ``text.encode()``, and whether
    it is a special token (BOS, EOS, chat markers: in no chunk, and no chunk crosses it)."""

    text: str
    ids: list[int]
    spans: list[Span]
    special: list[bool]


def byte_offsets(text: str) -> list[int]:
    """``out[c]`` = the byte offset of character ``c`` in ``text.encode()``; ``len(text) + 1`` entries."""
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode("utf-8", "surrogatepass")))
    return out


def require_fast(tokenizer) -> None:
    """Alignment reads byte offsets: a slow tokenizer stops in one line."""
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer: cross-tokenizer alignment needs byte "
            "offsets (return_offsets_mapping); save it with a tokenizer.json"
        )


def encoded(tokenizer, text: str, ids: list[int], offsets: list[Span]) -> Encoded:
    """``Encoded`` from a tokenization of ``text`` whose tokens have the character ``offsets``."""
    to_byte = byte_offsets(text)
    special = set(tokenizer.all_special_ids)
    return Encoded(text, list(ids), [(to_byte[a], to_byte[b]) for a, b in offsets], [tid in special for tid in ids])


def encode(tokenizer, text: str, *, add_special_tokens: bool = False) -> Encoded:
    """Tokenize ``text`` with a fast tokenizer and give each token its byte span."""
    require_fast(tokenizer)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return encoded(tokenizer, text, enc["input_ids"], enc["offset_mapping"])


def join(parts: list[Encoded]) -> tuple[Encoded, list[Span]]:
    """Encodings of consecutive texts (a prompt then its completion, tokenized apart as the pipeline does) -> one
    encoding of the joined text, and each part's byte range in it (the regions to align, so no chunk crosses them)."""
    ids, spans, special, ranges, at = [], [], [], [], 0
    for p in parts:
        n = len(p.text.encode("utf-8", "surrogatepass"))
        ids += p.ids
        spans += [(s + at, e + at) for s, e in p.spans]
        special += p.special
        ranges.append((at, at + n))
        at += n
    return Encoded("".join(p.text for p in parts), ids, spans, special), ranges


@dataclass(frozen=True)
class Unit:
    """Consecutive tokens ``[lo, hi)`` of one side that together cover the bytes ``[start, end)`` of region
    ``region`` (byte offsets relative to the region's start); only whole units can be cut apart."""

    start: int
    end: int
    lo: int
    hi: int
    region: int


def units(enc: Encoded, regions: list[Span]) -> list[Unit]:
    """The shared conversion: one side's token spans -> units tiling each region (see the module docstring).

    A token belongs to the region holding its whole span; special tokens and tokens outside every region are in no
    unit (the units around them are not contiguous). Units come sorted by region, then by byte.
    """
    out: list[Unit] = []
    for r, (lo, hi) in enumerate(regions):
        cur: list[int] | None = None  # [start, end, first token, last token + 1] of the open unit (absolute bytes)
        pending: int | None = None  # the first of a run of width-0 tokens: they join the next token
        prev_end = lo  # the end of the bytes reported so far: what lies between it and a token is that token's

        def close() -> None:
            if cur is not None:
                out.append(Unit(cur[0] - lo, cur[1] - lo, cur[2], cur[3], r))

        for i, ((s, e), special) in enumerate(zip(enc.spans, enc.special)):
            if special or not (lo <= s and e <= hi):
                close()
                cur, pending, prev_end = None, None, max(prev_end, e)
                continue
            if cur is not None and cur[3] == i and s < cur[1]:  # overlaps the open unit (one character): glue
                cur[1], cur[3], prev_end = max(cur[1], e), i + 1, max(prev_end, e)
                continue
            start = min(prev_end, s)
            prev_end = max(prev_end, e)
            if e <= start:
                pending = i if pending is None else pending
                continue
            close()
            cur, pending = [start, e, i if pending is None else pending, i + 1], None
        close()
    return out


@dataclass
class Alignment:
    """Chunks of one example: ``chunks[c] = (s_lo, s_hi, t_lo, t_hi)``, student tokens ``[s_lo, s_hi)`` and teacher
    tokens ``[t_lo, t_hi)`` covering the same ``chunk_bytes[c]`` bytes; ``n_bytes`` = the bytes of all regions."""

    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)
    chunk_bytes: list[int] = field(default_factory=list)
    n_bytes: int = 0

    def report(self) -> dict[str, int]:
        """Sums that add up over examples and steps (``alignment_metrics`` turns them into the logged fractions)."""
        one = sum(b for (a0, a1, b0, b1), b in zip(self.chunks, self.chunk_bytes) if a1 - a0 == 1 and b1 - b0 == 1)
        return {
            "bytes": self.n_bytes,
            "bytes_1to1": one,
            "bytes_unaligned": self.n_bytes - sum(self.chunk_bytes),
            "chunks": len(self.chunks),
            "chunk_tokens": sum(a1 - a0 + b1 - b0 for a0, a1, b0, b1 in self.chunks),
        }


def alignment_metrics(report: dict[str, int]) -> dict[str, float]:
    """The logged alignment report: fraction of bytes in 1:1 chunks, mean chunk length (student plus teacher tokens
    per chunk, 2 when all are 1:1), fraction of bytes in no chunk."""
    n, c = max(report["bytes"], 1), max(report["chunks"], 1)
    return {
        "align/bytes_1to1": report["bytes_1to1"] / n,
        "align/chunk_tokens": report["chunk_tokens"] / c,
        "align/bytes_unaligned": report["bytes_unaligned"] / n,
    }


def align(student: Encoded, teacher: Encoded, regions: list[tuple[Span, Span]] | None = None) -> Alignment:
    """Chunks of two tokenizations over ``regions``: pairs ``(student byte range, teacher byte range)`` holding the
    same bytes (default: the whole texts, which must then be equal). Raises ValueError on regions of unequal bytes."""
    if regions is None:
        if student.text != teacher.text:
            raise ValueError("the two texts differ: pass the regions that hold the same bytes")
        n = len(student.text.encode("utf-8", "surrogatepass"))
        regions = [((0, n), (0, n))]
    s_bytes, t_bytes = student.text.encode("utf-8", "surrogatepass"), teacher.text.encode("utf-8", "surrogatepass")
    for (s0, s1), (t0, t1) in regions:
        if s_bytes[s0:s1] != t_bytes[t0:t1]:
            raise ValueError(f"regions {(s0, s1)} and {(t0, t1)} do not hold the same bytes")
    us = units(student, [r[0] for r in regions])
    ut = units(teacher, [r[1] for r in regions])
    out = Alignment(n_bytes=sum(s1 - s0 for (s0, s1), _ in regions))
    i = j = 0
    while i < len(us) and j < len(ut):
        a, b = us[i], ut[j]
        if (a.region, a.start) != (b.region, b.start):  # open a chunk only where both sides start a unit
            if (a.region, a.start) < (b.region, b.start):
                i += 1
            else:
                j += 1
            continue
        i0, j0 = i, j
        while us[i].end != ut[j].end:  # grow the side that ends first, while it stays contiguous
            side, k = (us, i) if us[i].end < ut[j].end else (ut, j)
            nxt = k + 1
            if nxt == len(side) or side[nxt].region != side[k].region or side[nxt].lo != side[k].hi:
                break
            if side is us:
                i = nxt
            else:
                j = nxt
        if us[i].end == ut[j].end:
            out.chunks.append((us[i0].lo, us[i].hi, ut[j0].lo, ut[j].hi))
            out.chunk_bytes.append(us[i].end - a.start)
            i, j = i + 1, j + 1
        elif us[i].end < ut[j].end:
            i += 1
        else:
            j += 1
    return out


def position_chunks(
    alignment: Alignment, n_student: int, n_teacher: int, student_supervised: list[bool] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """Per-label-position chunk ids for the loss (labels are shifted: position ``t`` predicts token ``t + 1``).

    Returns ``(student [n_student], teacher [n_teacher], kept)``: position ``t`` holds the id (0, 1, ... in order) of
    the chunk of token ``t + 1``, or -1. A chunk is kept only when every token of it has a position that predicts it
    (not token 0: a side without BOS cannot score its first token) and, if ``student_supervised`` (per token) is
    given, every student token of it is supervised. ``kept`` lists the alignment's indices of the kept chunks.
    """
    s, t, kept = [-1] * n_student, [-1] * n_teacher, []
    for c, (a0, a1, b0, b1) in enumerate(alignment.chunks):
        if a0 < 1 or b0 < 1 or (student_supervised is not None and not all(student_supervised[a0:a1])):
            continue
        k = len(kept)
        kept.append(c)
        for p in range(a0 - 1, a1 - 1):
            s[p] = k
        for p in range(b0 - 1, b1 - 1):
            t[p] = k
    return s, t, kept


# ------------------------------------------------------------------------------------------ in the data pipeline
# An example is poorly aligned when its chunks cover less than MIN_ALIGNED of its bytes; a dataset with more than
# MAX_POORLY_ALIGNED of its examples poorly aligned stops the run (a tokenizer pair this method cannot serve).
MIN_ALIGNED = 0.9
MAX_POORLY_ALIGNED = 0.1
# The alignment report of one example, in this order (sums over examples and steps): see Alignment.report.
REPORT_KEYS = ("bytes", "bytes_1to1", "bytes_unaligned", "chunks", "chunk_tokens")


def encode_parts(tokenizer, texts: list[str], eos: int | None) -> tuple[Encoded, list[Span]]:
    """One example as the pipeline tokenises it: the first part with the tokenizer's special tokens (its BOS, and
    its EOS if it adds one, dropped when more parts follow: the EOS belongs at the end), the others without, then
    ``eos`` appended unless already there. Returns the joined encoding and each part's byte range."""
    parts = []
    for k, text in enumerate(texts):
        enc = encode(tokenizer, text, add_special_tokens=k == 0)
        if k == 0 and len(texts) > 1 and eos is not None and enc.ids[-1:] == [eos]:
            enc = Encoded(enc.text, enc.ids[:-1], enc.spans[:-1], enc.special[:-1])
        parts.append(enc)
    joined, ranges = join(parts)
    if eos is not None and joined.ids[-1:] != [eos]:
        n = len(joined.text.encode("utf-8", "surrogatepass"))
        joined = Encoded(joined.text, joined.ids + [eos], joined.spans + [(n, n)], joined.special + [True])
    return joined, ranges


def content_regions(
    student: Encoded, s_spans: list[Span | None], teacher: Encoded, t_spans: list[Span | None]
) -> list[tuple[Span, Span]]:
    """Chat data: the regions to align (byte ranges, ``align``) from each side's character span of every message's
    content in its own rendering (``chat.ChatEncoder.content_spans``; None: not shown). A content both show alike is
    one region; one shown as a part of the other (trimmed, or only the answer after ``</think>``) is that part on
    both sides; a content one side does not show, or that the two show otherwise, is in no region."""
    s_bytes, t_bytes = byte_offsets(student.text), byte_offsets(teacher.text)
    out: list[tuple[Span, Span]] = []
    for s, t in zip(s_spans, t_spans):
        if s is None or t is None:
            continue
        a, b = student.text[s[0] : s[1]], teacher.text[t[0] : t[1]]
        if b in a:  # the teacher shows a part: its place in the student's (a suffix, a prefix, else the first)
            at = len(a) - len(b) if a.endswith(b) else a.find(b)
            s, a = (s[0] + at, s[0] + at + len(b)), b
        elif a in b:
            at = len(b) - len(a) if b.endswith(a) else b.find(a)
            t = (t[0] + at, t[0] + at + len(a))
        else:
            continue
        region = ((s_bytes[s[0]], s_bytes[s[1]]), (t_bytes[t[0]], t_bytes[t[1]]))
        # In message order on both sides (a template that moves a message breaks the order: that one is left out).
        if a and (not out or (region[0][0] >= out[-1][0][1] and region[1][0] >= out[-1][1][1])):
            out.append(region)
    return out


def cross_columns(
    student: Encoded,
    teacher: Encoded,
    regions: list[tuple[Span, Span]],
    supervised: list[bool],
    seq_len: int,
    *,
    n_bytes: int | None = None,
    pair_eos: bool = True,
) -> dict[str, list[int]]:
    """The columns the loss needs for one example: ``teacher_input_ids`` (cut at ``seq_len``), ``chunk_ids`` and
    ``teacher_chunk_ids`` per label position (``position_chunks``, chunks past either cut dropped), ``alignment``
    (the report, ``REPORT_KEYS``; ``n_bytes``: the bytes it counts, default those of the regions). With
    ``pair_eos``, when both sides end with EOS, the two EOS tokens form one more chunk (of no bytes): each model's
    probability of ending the text there is compared as any other chunk's."""
    al = align(student, teacher, regions)
    al.n_bytes = al.n_bytes if n_bytes is None else n_bytes
    report = al.report()
    if pair_eos and student.special[-1:] == [True] and teacher.special[-1:] == [True]:  # encode_parts' EOS
        al.chunks.append((len(student.ids) - 1, len(student.ids), len(teacher.ids) - 1, len(teacher.ids)))
        al.chunk_bytes.append(0)
    n_s, n_t = min(len(student.ids), seq_len), min(len(teacher.ids), seq_len)
    kept = [k for k, c in enumerate(al.chunks) if c[1] <= n_s and c[3] <= n_t]
    al.chunks, al.chunk_bytes = [al.chunks[k] for k in kept], [al.chunk_bytes[k] for k in kept]
    s_pos, t_pos, _ = position_chunks(al, n_s, n_t, supervised[:n_s])
    return {
        "teacher_input_ids": teacher.ids[:n_t],
        "chunk_ids": s_pos,
        "teacher_chunk_ids": t_pos,
        "alignment": [report[k] for k in REPORT_KEYS],
    }


def collate_teacher(rows: dict[str, list], pad_token_id: int) -> dict:
    """The teacher's side of a micro-batch (columns of ``cross_columns``, B rows), right-padded like the student's:

    teacher_input_ids ``[B, T']``, teacher_attention_mask ``[B, T']`` (or teacher_position_ids restarting per
    document for packed rows), teacher_labels ``[B, T']`` (its next token where a chunk is scored, else -100),
    chunk_ids ``[B, T]`` and teacher_chunk_ids ``[B, T']`` renumbered to be unique in the batch (row b's after row
    b-1's; -1 none), n_chunks (int) and alignment ``[len(REPORT_KEYS)]`` int64, the batch's report sums.
    """
    import torch

    t_ids = rows["teacher_input_ids"]
    b, t_len = len(t_ids), max(len(x) for x in t_ids)
    s_len = max(len(x) for x in rows["chunk_ids"])
    out = {
        "teacher_input_ids": torch.full((b, t_len), pad_token_id, dtype=torch.long),
        "teacher_labels": torch.full((b, t_len), -100, dtype=torch.long),
        "chunk_ids": torch.full((b, s_len), -1, dtype=torch.long),
        "teacher_chunk_ids": torch.full((b, t_len), -1, dtype=torch.long),
    }
    base = 0
    for r in range(b):
        ids, s_ch, t_ch = (
            torch.tensor(rows[k][r], dtype=torch.long) for k in ("teacher_input_ids", "chunk_ids", "teacher_chunk_ids")
        )
        n = len(ids)
        out["teacher_input_ids"][r, :n] = ids
        out["chunk_ids"][r, : len(s_ch)] = torch.where(s_ch >= 0, s_ch + base, -1)
        out["teacher_chunk_ids"][r, :n] = torch.where(t_ch >= 0, t_ch + base, -1)
        scored = t_ch[: n - 1] >= 0
        out["teacher_labels"][r, : n - 1] = torch.where(scored, ids[1:], -100)
        base += int(s_ch.max()) + 1 if len(s_ch) else 0
    if "teacher_position_ids" in rows:
        pos = torch.zeros((b, t_len), dtype=torch.long)
        for r, p in enumerate(rows["teacher_position_ids"]):
            pos[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            pos[r, len(p) :] = torch.arange(t_len - len(p))
        out["teacher_position_ids"] = pos
    else:
        lengths = torch.tensor([len(x) for x in t_ids])
        out["teacher_attention_mask"] = (torch.arange(t_len)[None, :] < lengths[:, None]).long()
    out["n_chunks"] = base
    out["alignment"] = torch.tensor(rows["alignment"], dtype=torch.long).sum(0)
    return out
