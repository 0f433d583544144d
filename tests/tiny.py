"""Tiny tokenizers and random Llama models built in a temporary directory, for tests.

Everything is deterministic (fixed corpus, fixed seeds) and takes well under a second on one CPU core.

    tok = make_tokenizer(tmp_path / "tok")                     # byte-level BPE, bos/eos/pad, chat template
    path = make_model(tmp_path / "model", tok, layers=2)       # LlamaForCausalLM + the tokenizer beside it
    sp = make_sentencepiece_tokenizer(tmp_path / "sp")         # tokenizer.model only (no tokenizer.json)
"""
from __future__ import annotations

from pathlib import Path

# The corpus the tokenizers are trained on; words outside it still tokenize (byte-level BPE / byte fallback).
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a small cat sleeps in the warm sun while the dog barks",
    "what is the capital of france? the capital of france is paris.",
    "write a short poem about the sea and the wind",
    "hello, how are you today? i am fine, thank you.",
    "distillation trains a small student model to imitate a large teacher model",
    "def add(a, b):\n    return a + b\n",
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9",
]

# A chat template with one special marker per role and one end-of-turn token, so assistant spans are easy to read in
# tests. No newline after <|end|>: the end-of-turn token is the last token of a turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_tokenizer(dir, vocab_size: int = 400):
    """Train a byte-level BPE fast tokenizer on CORPUS, save it to `dir` and return it.

    Ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then the chat markers, then 256 byte tokens and merges. Like Llama it adds
    bos (not eos) when encoding with special tokens. `apply_chat_template` works (CHAT_TEMPLATE).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(dir)
    return tok


def make_model(dir, tokenizer, *, layers: int = 2, hidden: int = 32, heads: int = 4, vocab_pad: int = 0,
               tie: bool = True, seed: int = 0) -> str:
    """Save a random LlamaForCausalLM (fp32, eager-compatible) plus `tokenizer` to `dir`; return the path as str.

    The embedding / lm_head have len(tokenizer) + vocab_pad rows (padding rows mimic real checkpoints whose
    vocabulary is rounded up). Two KV heads (GQA when heads > 2), intermediate size 2 * hidden.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_pad,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2 if heads % 2 == 0 else heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return str(dir)


def make_sentencepiece_tokenizer(dir, vocab_size: int = 400):
    """Train a tiny SentencePiece BPE model, save it as a Llama tokenizer directory and return the loaded tokenizer.

    The directory holds only tokenizer.model + tokenizer_config.json (no tokenizer.json), as old Llama checkpoints do:
    transformers loads it as LlamaTokenizer from the SentencePiece file. Ids: <unk>=0, <s>=1, </s>=2, <pad>=3.
    The chat template uses plain-text role markers "[user]" / "[assistant]" and </s> as the end-of-turn token.
    transformers 5 needs `protobuf` to read tokenizer.model; tests call pytest.importorskip("google.protobuf").
    """
    import io
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    (dir / "tokenizer.model").write_bytes(buf.getvalue())
    (dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]").replace("[end]", "</s>"),
        "model_max_length": 512,
    }))
    return AutoTokenizer.from_pretrained(dir)
