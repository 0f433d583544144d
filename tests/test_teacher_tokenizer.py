"""A teacher of the student's vocabulary must also agree on its special tokens and, for chat data, on the chat format:
one check (``models.check_teacher_tokenizer``) for a live teacher and for a cache, refusing in the same line."""

import json
import shutil

import pytest

from ds_distill import cache_teacher
from ds_distill.common import UsageError
from ds_distill.config import parse_args
from ds_distill.ds_config import REPO_CONFIGS
from ds_distill.models.tokenizers import shared_vocab_size
from tests import tiny as tiny_mod
from tests.helpers import base_args, run_main


def variant(tiny, dest, **change):
    """A copy of the tiny teacher whose tokenizer differs from the student's only in ``change`` (attributes set on
    the loaded tokenizer, then saved over the copy's tokenizer files): the vocabulary stays the same."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny["teacher"], dest)
    tok = AutoTokenizer.from_pretrained(dest)
    for name, value in change.items():
        setattr(tok, name, value)
    tok.save_pretrained(dest)
    return str(dest)


def chat_data(path):
    words = "the quick brown fox jumps over the lazy dog".split()
    rows = [
        {"messages": [{"role": "user", "content": words[i % 9]}, {"role": "assistant", "content": words[(i + 3) % 9]}]}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_special_tokens_and_chat_format_are_compared(tiny, tmp_path):
    tok = tiny["tokenizer"]
    same = shared_vocab_size("student", tok, [tiny["teacher"]], chat_template=tok.chat_template)
    assert same == len(tok)
    eos = variant(tiny, tmp_path / "eos", eos_token="<|end|>")
    with pytest.raises(UsageError, match=r"special tokens: eos_token \['<\|end\|>', 7\] vs \['</s>', 2\]"):
        shared_vocab_size("student", tok, [eos])
    chatml = variant(tiny, tmp_path / "chatml", chat_template=tiny_mod.CHATML_TEMPLATE)
    assert shared_vocab_size("student", tok, [chatml]) == len(tok)  # not chat data: the template does not matter
    with pytest.raises(UsageError, match=r"renders chat data otherwise than the run .*'<\|im_start\|>system"):
        shared_vocab_size("student", tok, [chatml], chat_template=tok.chat_template)
    # The run's --chat_template FILE is what the teacher's own template is compared with.
    assert shared_vocab_size("student", tok, [chatml], chat_template=tiny_mod.CHATML_TEMPLATE) == len(tok)
    # A teacher without a chat template has no format of its own to compare.
    bare = variant(tiny, tmp_path / "bare", chat_template=None)
    assert shared_vocab_size("student", tok, [bare], chat_template=tok.chat_template) == len(tok)


@pytest.mark.parametrize("kind", ["eos", "chat"])
def test_live_and_cached_teacher_are_refused_in_the_same_line(
    tiny, dist_env, tmp_path, capsys, keep_process_group, kind
):
    """Before, the live teacher was accepted and the cache refused ("another tokenizer", "other --data tokens")."""
    if kind == "eos":
        teacher, data, split = variant(tiny, tmp_path / "t", eos_token="<|end|>"), tiny["data"], " and student "
    else:
        teacher = variant(tiny, tmp_path / "t", chat_template=tiny_mod.CHATML_TEMPLATE)
        data, split = chat_data(tmp_path / "chat.jsonl"), " renders chat data"
    args = base_args(tiny, tmp_path / "o")
    args[args.index(tiny["data"])] = data
    args[args.index("--seq_len") + 1] = seq_len = "96"  # room for ChatML's markers, spelt in bytes here
    live = args[:]
    live[live.index(tiny["teacher"])] = teacher
    code, errors = run_main(live, capsys)
    assert code == 2 and len(errors) == 1, errors
    cache = tmp_path / "cache"
    replicated = str(REPO_CONFIGS / "cpu_teacher_replicated.json")
    cache_args = ["--teacher", teacher, "--data", data, "--output_dir", str(cache), "--seq_len", seq_len]
    cache_teacher.run(parse_args([*cache_args, "--teacher_deepspeed_config", replicated], cache_teacher.CacheConfig))
    cached = args[:]
    at = cached.index("--teacher")
    cached[at : at + 2] = ["--teacher_cache", str(cache)]
    code, cache_errors = run_main(cached, capsys)
    assert code == 2 and len(cache_errors) == 1, cache_errors
    assert (
        f"teacher {teacher!r}{split}" in errors[0]
        and f"--teacher_cache {cache} (its teacher's tokenizer){split}" in (cache_errors[0])
    )
    assert errors[0].split(split, 1)[1] == cache_errors[0].split(split, 1)[1]


def test_a_template_that_refuses_a_system_turn_renders_the_sample_without_it(tiny):
    """Gemma-style templates raise on a system message: the sample is rendered without it, not a traceback."""
    from ds_distill.models.tokenizers import tokenizer_facts

    refuses = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    )
    chat = tokenizer_facts(tiny["tokenizer"], refuses)["chat"]
    assert chat == "<user>What is 2 + 2?<assistant>2 + 2 = 4.<user>And 3 + 3?"
