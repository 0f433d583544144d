"""Cross-tokenizer alignment (ds_distill.data.alignment) over random strings, checked against the tokenizers' own
decoding: a chunk's byte range is where decoding each side's tokens up to the chunk's ends gives the text up to there.

Tokenizers: byte-level BPE (tests/tiny.make_tokenizer), the same with trimmed offsets (GPT-2's ByteLevel
post-processor: a leading space is not in the offsets), and a SentencePiece-style Metaspace one with byte fallback.
"""

import random

import pytest

from ds_distill.data.alignment import Alignment, align, alignment_metrics, encode, join, position_chunks
from tests.tiny import CORPUS, make_metaspace_tokenizer, make_tokenizer

PIECES = (
    [w for line in CORPUS for w in line.split()]
    + ["é", "ü", "ß", "中文", "日本語", "한국어", "😀", "👩‍👩‍👧", "🇫🇷", "12345", "3.14159", "2026", "ñandú"]
    + [" ", "  ", "\n", "\t", "!", "?", "'s", "--"]
)


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        p = rng.choice(PIECES)
        parts.append(p if rng.random() < 0.3 else (" " + p if rng.random() < 0.6 else p))
    return "".join(parts)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("align")
    bpe = make_tokenizer(d / "bpe")
    tk = Tokenizer.from_str(bpe.backend_tokenizer.to_str())
    tk.post_processor = processors.ByteLevel(trim_offsets=True)  # what GPT-2 / Llama 3 / Qwen tokenizer.json hold
    trimmed = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    return {"bpe": bpe, "trimmed": trimmed, "metaspace": make_metaspace_tokenizer(d / "ms")}


def decoded_prefix(tok, ids, n) -> str:
    """The text the first ``n`` tokens decode to, leading spaces dropped (a SentencePiece decoder strips the space it
    prepends, and also spaces the text began with)."""
    ids = ids[1:n] if ids[:1] == [tok.bos_token_id] else ids[:n]  # a BOS is not in the text; other specials are
    return tok.decode(ids).lstrip(" ")


def text_prefix(text: str, n_bytes: int) -> str:
    return text.encode()[:n_bytes].decode().lstrip(" ")  # raises if a chunk starts inside a character


def check_chunks(text, tok_s, enc_s, tok_t, enc_t, al, regions):
    """Every property the loss relies on, checked against the tokenizers' decoding."""
    assert len(al.chunks) == len(al.chunk_bytes)
    region_of = {}
    for r, ((s0, s1), _) in enumerate(regions):
        for b in range(s0, s1):
            region_of[b] = r
    prev = (0, 0)
    for (a0, a1, b0, b1), nb in zip(al.chunks, al.chunk_bytes):
        assert a0 < a1 and b0 < b1 and nb > 0
        assert a0 >= prev[0] and b0 >= prev[1], "chunks are in order and disjoint"
        prev = (a1, b1)
        assert not any(enc_s.special[a0:a1]) and not any(enc_t.special[b0:b1]), "no chunk holds a special token"
        # The chunk's bytes: where each side's tokens before it end, and where its own tokens end (the sets of
        # character boundaries whose text prefix the tokens decode to; several where the text starts with spaces).
        bounds = [len(text[:c].encode()) for c in range(len(text) + 1)]
        at = lambda tok, enc, k: {n for n in bounds if decoded_prefix(tok, enc.ids, k) == text_prefix(text, n)}
        starts = at(tok_s, enc_s, a0) & at(tok_t, enc_t, b0)
        ends = at(tok_s, enc_s, a1) & at(tok_t, enc_t, b1)
        pairs = [(x, y) for x in starts for y in ends if y - x == nb]
        assert pairs, f"tokens [{a0}, {a1}) and [{b0}, {b1}) do not decode to the same {nb} bytes of {text!r}"
        start, end = max(pairs)
        assert region_of[start] == region_of[end - 1], "no chunk crosses a region (prompt/completion) boundary"
    assert sum(al.chunk_bytes) <= al.n_bytes


@pytest.mark.parametrize("pair", [("bpe", "metaspace"), ("metaspace", "trimmed"), ("trimmed", "bpe"), ("bpe", "bpe")])
def test_random_strings_partition_bytes_identically(toks, pair):
    rng = random.Random("-".join(pair))
    tok_s, tok_t = toks[pair[0]], toks[pair[1]]
    total = {"bytes": 0, "bytes_1to1": 0, "bytes_unaligned": 0, "chunks": 0, "chunk_tokens": 0}
    for _ in range(40):
        text = random_text(rng)
        enc_s, enc_t = encode(tok_s, text), encode(tok_t, text)
        al = align(enc_s, enc_t)
        n = len(text.encode())
        check_chunks(text, tok_s, enc_s, tok_t, enc_t, al, [((0, n), (0, n))])
        # Both sides tile the whole text, so the finest common partition covers every byte.
        assert sum(al.chunk_bytes) == n and al.report()["bytes_unaligned"] == 0, text
        assert [a1 for _, a1, _, _ in al.chunks][-1] == len(enc_s.ids)
        if pair[0] == pair[1]:  # one tokenizer: each chunk is the same tokens on both sides (1:1 but for characters
            # that byte-level BPE splits into several tokens)
            assert all((a0, a1) == (b0, b1) for a0, a1, b0, b1 in al.chunks)
            assert all(a1 - a0 == 1 or nb <= 4 for (a0, a1, _, _), nb in zip(al.chunks, al.chunk_bytes))
        for k, v in al.report().items():
            total[k] += v
    m = alignment_metrics(total)
    assert 0 < m["align/bytes_1to1"] <= 1 and m["align/chunk_tokens"] >= 2 and m["align/bytes_unaligned"] == 0
    if pair[0] != pair[1]:
        assert m["align/bytes_1to1"] < 1 and m["align/chunk_tokens"] > 2


def test_bos_on_one_side_and_regions(toks):
    """BOS on the student only, a prompt and a completion tokenized apart: chunks never hold the BOS or cross the
    prompt/completion boundary, and position_chunks drops a chunk whose first token has no position predicting it."""
    rng = random.Random(1)
    tok_s, tok_t = toks["bpe"], toks["metaspace"]
    for _ in range(40):
        prompt, completion = random_text(rng), random_text(rng)
        s_parts = [encode(tok_s, prompt, add_special_tokens=True), encode(tok_s, completion)]
        t_parts = [encode(tok_t, prompt), encode(tok_t, completion)]
        (enc_s, rs), (enc_t, rt) = join(s_parts), join(t_parts)
        assert enc_s.special[0] and not any(enc_t.special)
        regions = list(zip(rs, rt))
        al = align(enc_s, enc_t, regions)
        assert al.report()["bytes_unaligned"] == 0
        assert all(a0 >= 1 for a0, _, _, _ in al.chunks), "the student's BOS is in no chunk"
        n_prompt, t_prompt = len(s_parts[0].ids), len(t_parts[0].ids)
        for a0, a1, b0, b1 in al.chunks:
            assert (a1 <= n_prompt and b1 <= t_prompt) or (a0 >= n_prompt and b0 >= t_prompt), "crosses the boundary"
        # Each part against its own decoding (a SentencePiece tokenizer prepends a space to each part it encodes).
        for part, (ps, pt, ds, dt) in enumerate(
            ((s_parts[0], t_parts[0], 0, 0), (s_parts[1], t_parts[1], n_prompt, t_prompt))
        ):
            mine = [c for c in al.chunks if (c[0] >= n_prompt) == (part == 1)]
            sub = Alignment(
                [(a0 - ds, a1 - ds, b0 - dt, b1 - dt) for a0, a1, b0, b1 in mine],
                [nb for c, nb in zip(al.chunks, al.chunk_bytes) if c in mine],
                len(ps.text.encode()),
            )
            n = sub.n_bytes
            check_chunks(ps.text, tok_s, ps, tok_t, pt, sub, [((0, n), (0, n))])
            assert sum(sub.chunk_bytes) == n
        # The teacher has no BOS: its first chunk cannot be scored (no position predicts token 0) and is dropped.
        sup = [False] * n_prompt + [True] * len(s_parts[1].ids)
        s_pos, t_pos, kept = position_chunks(al, len(enc_s.ids), len(enc_t.ids), sup)
        assert 0 not in kept
        for k, c in enumerate(kept):
            a0, a1, b0, b1 = al.chunks[c]
            assert a0 >= n_prompt, "a kept chunk is supervised"
            assert [p for p, x in enumerate(s_pos) if x == k] == list(range(a0 - 1, a1 - 1))
            assert [p for p, x in enumerate(t_pos) if x == k] == list(range(b0 - 1, b1 - 1))


def test_special_token_inside_the_text_cuts(toks):
    """A special token in the text (one side knows it as special, the other splits it into plain tokens): no chunk
    holds it, so the bytes around it on the other side are left unaligned and reported."""
    tok_s, tok_t = toks["bpe"], toks["metaspace"]
    text = "hello world<|end|> the sea"
    enc_s, enc_t = encode(tok_s, text), encode(tok_t, text)
    assert sum(enc_s.special) == 1 and not any(enc_t.special)
    al = align(enc_s, enc_t)
    check_chunks(text, tok_s, enc_s, tok_t, enc_t, al, [((0, len(text)), (0, len(text)))])
    assert al.report()["bytes_unaligned"] == len("<|end|>")


def test_regions_must_hold_the_same_bytes(toks):
    enc_s, enc_t = encode(toks["bpe"], "the cat"), encode(toks["metaspace"], "the dog")
    with pytest.raises(ValueError, match="pass the regions"):
        align(enc_s, enc_t)
    with pytest.raises(ValueError, match="do not hold the same bytes"):
        align(enc_s, enc_t, [((0, 7), (0, 7))])
    assert align(enc_s, enc_t, [((0, 4), (0, 4))]).n_bytes == 4
