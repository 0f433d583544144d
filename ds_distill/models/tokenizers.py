"""Tokenizers: loading one, copying its files as given, and the vocabulary the student and teachers share."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ds_distill.common import UsageError

log = logging.getLogger("ds_distill.models")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer exactly as saved (no pad token added: it is written back into checkpoints and exports, where a
    pad = eos would make standard collators mask every eos label; batching picks its own pad id, data.BatchStream)."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"could not load the tokenizer of {path!r}: {str(exc).splitlines()[0]}; save one with tokenizer.save_pretrained"
        ) from None


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
            f"{src} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save one with tokenizer.save_pretrained"
        )


def shared_vocab_size(student_path: str, student_tok, teacher_paths: list[str]) -> int:
    """The vocabulary distilled over: the tokenizer's real vocabulary, which every model must share.

    Models may pad their embedding matrices beyond the tokenizer (e.g. 49152 vs 49280 rows): those rows are ignored
    (see ``check_output_rows``). Different tokenizers cannot be distilled token by token, so they stop the run.
    """
    vocab = student_tok.get_vocab()
    for path in teacher_paths:
        other = load_tokenizer(path).get_vocab()
        if other != vocab:
            diff = sorted(set(other.items()) ^ set(vocab.items()))[:3]
            raise UsageError(
                f"teacher {path!r} and student {student_path!r} have different tokenizers "
                f"({len(other)} vs {len(vocab)} tokens; e.g. {diff}): distillation needs a shared vocabulary, "
                "so build the student with the teacher's tokenizer (python -m ds_distill.student_init)"
            )
    return len(student_tok)
