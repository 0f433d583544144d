"""Tokenizers: loading one, copying its files as given, and the vocabulary the student and teachers share."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ds_distill.common import UsageError
from ds_distill.data.chat import SAMPLE_CONVERSATION

log = logging.getLogger("ds_distill.models")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer exactly as saved (no pad token added: it is written back into checkpoints and exports, where a
    pad = eos would make standard collators mask every eos label; batching picks its own pad id, data.BatchStream)."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"could not load the tokenizer of {path!r}: {str(exc).splitlines()[0]}; save one with "
            "tokenizer.save_pretrained"
        ) from None


GENERATION_CONFIG = "generation_config.json"  # transformers' GenerationConfig of a model folder
# The files a Hugging Face tokenizer folder may hold (tokenization_utils_base and the slow tokenizers' vocab files).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copy a model folder's tokenizer files byte for byte into ``dst``: checkpoints and exports hold the student's
    tokenizer exactly as given (a load + save_pretrained round trip rewrites tokenizer_config.json, e.g. adding
    ``is_local``, and would write back anything set on the loaded object)."""

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = [shutil.copy2(src / name, dst / name) for name in TOKENIZER_FILES if (src / name).is_file()]
    if (src / "additional_chat_templates").is_dir():
        shutil.copytree(src / "additional_chat_templates", dst / "additional_chat_templates", dirs_exist_ok=True)
    if not copied:
        raise UsageError(
            f"{src} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save one with "
            "tokenizer.save_pretrained"
        )


def copy_generation_config(src: str | Path, dst: str | Path) -> None:
    """Copy a model folder's ``generation_config.json`` byte for byte into ``dst`` (nothing when it has none), over
    whatever ``save_pretrained`` wrote there: that one is rebuilt from config.json and loses what only the generation
    config says (extra eos ids such as an end-of-turn token, the sampling defaults)."""
    src, dst = Path(src), Path(dst)
    if (src / GENERATION_CONFIG).is_file():
        shutil.copy2(src / GENERATION_CONFIG, dst / GENERATION_CONFIG)


def shared_vocab_size(
    student_path: str,
    student_tok,
    teacher_paths: list[str],
    cross_tokenizer: str = "",
    chat_template: str | None = None,
) -> int:
    """The vocabulary distilled over: the tokenizer's real vocabulary, which every model must share.

    Models may pad their embedding matrices beyond the tokenizer (e.g. 49152 vs 49280 rows): those rows are ignored
    (see ``check_output_rows``). Different tokenizers cannot be distilled token by token: they need
    ``cross_tokenizer`` (a method of ``losses.CROSS_TOKENIZER``), and then the student's vocabulary is scored.
    A teacher of the same vocabulary must also agree on the special tokens and, for chat data, on the chat format
    (``check_teacher_tokenizer``; ``chat_template``: the Jinja text the data is rendered with, None for other data).
    """
    from ds_distill.losses import CROSS_TOKENIZER

    vocab = student_tok.get_vocab()
    student = tokenizer_facts(student_tok, chat_template) if teacher_paths and not cross_tokenizer else None
    for path in teacher_paths:
        teacher_tok = load_tokenizer(path)
        other = teacher_tok.get_vocab()
        if cross_tokenizer:
            continue
        if other != vocab:
            diff = sorted(set(other.items()) ^ set(vocab.items()))[:3]
            raise UsageError(
                f"teacher {path!r} and student {student_path!r} have different tokenizers "
                f"({len(other)} vs {len(vocab)} tokens; e.g. {diff}): pass --cross_tokenizer METHOD "
                f"({' or '.join(CROSS_TOKENIZER)}; see the README), or build the student with the teacher's tokenizer "
                "(python -m ds_distill.student_init)"
            )
        teacher = tokenizer_facts(teacher_tok, own=chat_template is not None)
        check_teacher_tokenizer(f"teacher {path!r}", teacher, student_path, student)
    return len(student_tok)


SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def tokenizer_facts(tok, chat_template: str | None = None, own: bool = False) -> dict:
    """What a teacher must share with the student beyond the vocabulary, as JSON (a teacher cache stores it):
    ``specials``: each role of ``SPECIAL_ROLES`` as ``[token, id]`` (None when unset) and ``other``, the remaining
    special tokens as sorted ``[token, id]`` pairs; ``chat``: ``SAMPLE_CONVERSATION`` rendered with ``chat_template``
    (``own``: the tokenizer's own template; without its system turn when the template refuses one), None without a
    template, when neither is asked or when the template renders neither."""
    specials: dict = {}
    for role in SPECIAL_ROLES:
        token = getattr(tok, role, None)
        specials[role] = None if token is None else [str(token), tok.convert_tokens_to_ids(str(token))]
    named = {v[0] for v in specials.values() if v is not None}
    specials["other"] = sorted([t, tok.convert_tokens_to_ids(t)] for t in set(tok.all_special_tokens) - named)
    template = tok.chat_template if own else chat_template
    chat = None
    # Templates that refuse a system turn (e.g. Gemma's raise on one) render the conversation without it.
    for conversation in (SAMPLE_CONVERSATION, SAMPLE_CONVERSATION[1:]) if isinstance(template, str) else ():
        try:
            chat = tok.apply_chat_template(list(conversation), chat_template=template, tokenize=False)
            break
        except TemplateError:  # a template's raise_exception (transformers raises it as jinja's TemplateError)
            continue
    return {"specials": specials, "chat": chat}


def check_teacher_tokenizer(teacher_name: str, teacher: dict, student_name: str, student: dict) -> None:
    """One UsageError when a teacher of the student's vocabulary (live, cached or served: ``tokenizer_facts`` of
    each) names other special tokens, or renders chat data otherwise than the run does (checked when both facts
    hold a rendering: the teacher has a chat template and the data is chat). The same check on every teacher path."""
    for role in (*SPECIAL_ROLES, "other"):
        t, s = teacher["specials"].get(role), student["specials"].get(role)
        if t != s:
            raise UsageError(
                f"{teacher_name} and student {student_name!r} have different special tokens: {role} {t} vs {s} "
                "([token, id]; the supervised end of every example is the student's eos, which the teacher must "
                "predict as its own): give both the same tokenizer files (copy the teacher's tokenizer_config.json "
                "and special_tokens_map.json into the student's folder, or build the student with "
                "python -m ds_distill.student_init)"
            )
    t, s = teacher.get("chat"), student.get("chat")
    if t is not None and s is not None and t != s:
        at = next((i for i, (a, b) in enumerate(zip(t, s)) if a != b), min(len(t), len(s)))
        lo = max(0, at - 10)  # a little of what both share, then where they part
        raise UsageError(
            f"{teacher_name} renders chat data otherwise than the run (a sample conversation, differing at character "
            f"{at}: {t[lo : at + 30]!r} vs {s[lo : at + 30]!r}): the teacher would read the student's data in a format "
            "it was not trained on; pass the teacher's template with --chat_template FILE (its chat_template.jinja "
            "or tokenizer_config.json's chat_template), or give the student the teacher's template"
        )


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each id's bytes as it spells them in text, ``[len(tokenizer)]``; None for special and added tokens.

    Byte-level BPE (GPT-2's alphabet of printable stand-ins for bytes) and SentencePiece-style vocabularies ("▁" for
    a space, from a Metaspace step or the normalizer as in Gemma's; ``<0xNN>`` byte-fallback tokens) are read; any
    other kind stops in one line.
    """
    import json

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # Gemma's tokenizer.json writes "▁" in its normalizer (Replace " " -> "▁") and decoder, with no Metaspace step.
    kinds = json.dumps([spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")], ensure_ascii=False)
    added = {t["id"] for t in spec.get("added_tokens", [])} | set(tokenizer.all_special_ids)
    out: list[bytes | None] = [None] * len(tokenizer)
    if '"ByteLevel"' in kinds:
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        for token, i in tokenizer.get_vocab().items():
            if i not in added and all(c in to_byte for c in token):
                out[i] = bytes(to_byte[c] for c in token)
    elif '"Metaspace"' in kinds or "▁" in kinds:
        for token, i in tokenizer.get_vocab().items():
            if i in added:
                continue
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                out[i] = bytes([int(token[3:5], 16)])
            else:
                out[i] = token.replace("▁", " ").encode()
    else:
        raise UsageError(
            f"tokenizer {tokenizer.name_or_path!r} is neither byte-level BPE nor SentencePiece-style (Metaspace): "
            "--cross_tokenizer vocab_map cannot read its tokens' bytes; use --cross_tokenizer alm"
        )
    return out


def vocab_map(student_tok, teacher_tok) -> tuple[list[int], list[int]]:
    """The token pairs that spell the same bytes (each token in at most one pair: a byte string spelt by two tokens
    of one vocabulary, e.g. "A" and <0x41>, is left out), special tokens of the same text, and BOS with BOS and EOS
    with EOS. With one tokenizer on both sides every token is mapped (the method is then today's loss). Returns
    ``(student ids, teacher ids)``, ``[M]`` each, in the student's id order."""

    def unique(tok) -> dict[bytes, int]:
        seen: dict[bytes, int] = {}
        twice: set[bytes] = set()
        for i, b in enumerate(token_bytes(tok)):
            if b is not None:
                (twice.add(b) if b in seen else seen.__setitem__(b, i))
        return {b: i for b, i in seen.items() if b not in twice}

    s, t = unique(student_tok), unique(teacher_tok)
    pairs = {s[b]: t[b] for b in s.keys() & t.keys()}
    # Special and added tokens have no bytes: the same text is the same token (a shared tokenizer maps whole).
    added = lambda tok: {str(v): k for k, v in tok.added_tokens_decoder.items() if k < len(tok)}
    s_added, t_added = added(student_tok), added(teacher_tok)
    pairs.update({s_added[c]: t_added[c] for c in s_added.keys() & t_added.keys()})
    for role in ("bos_token_id", "eos_token_id"):
        a, b = getattr(student_tok, role), getattr(teacher_tok, role)
        if a is not None and b is not None:
            pairs[a] = b
    ids = [i for i in sorted(pairs) if list(pairs.values()).count(pairs[i]) == 1]  # one pair per teacher token too
    return ids, [pairs[i] for i in ids]
