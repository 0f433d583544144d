"""Tiny tokenizers and random Llama models built in a temporary directory, for tests.

Everything is deterministic (fixed corpus, fixed seeds) and takes well under a second on one CPU core.

    tok = make_tokenizer(tmp_path / "tok")                     # byte-level BPE, bos/eos/pad, chat template
    path = make_model(tmp_path / "model", tok, layers=2)       # LlamaForCausalLM + the tokenizer beside it
    sp = make_sentencepiece_tokenizer(tmp_path / "sp")         # tokenizer.model only (no tokenizer.json)
    ms = make_metaspace_tokenizer(tmp_path / "ms")             # SentencePiece-style fast tokenizer, another vocabulary
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    _train_byte_bpe(tk, CORPUS, SPECIAL_TOKENS, vocab_size)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    return _saved(
        PreTrainedTokenizerFast(
            tokenizer_object=tk,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            additional_special_tokens=SPECIAL_TOKENS[4:],
        ),
        dir,
        CHAT_TEMPLATE,
    )


def _saved(tok, dir: Path, template: str | None):
    """``tok`` with ``template`` as its chat template (None: none), saved to ``dir``."""
    tok.chat_template = template
    tok.save_pretrained(dir)
    return tok


def _train_byte_bpe(tk, corpus: list[str], specials: list[str], vocab_size: int) -> None:
    """Train the byte-level BPE ``tk`` on ``corpus`` (every byte in the alphabet, ``specials`` first in the vocab)."""
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer=trainer)


def make_model(
    dir,
    tokenizer,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    vocab_pad: int = 0,
    tie: bool = True,
    seed: int = 0,
) -> str:
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


def make_metaspace_tokenizer(dir, vocab_size: int = 360, *, bos: bool = True):
    """Train a SentencePiece-style fast tokenizer (Metaspace "▁" pre-tokenizer, BPE with byte fallback <0xNN>, as
    Llama 2 / Mistral / Gemma tokenizer.json files are) on CORPUS, save it to `dir` and return it.

    A different vocabulary from make_tokenizer's (for cross-tokenizer tests). Ids: <unk>=0, <s>=1, </s>=2, <pad>=3,
    then the 256 byte tokens and merges. Adds bos when encoding with special tokens if ``bos``; its chat template
    uses plain-text role markers "[user]" / "[assistant]" and </s> ends a turn.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(CORPUS, trainer=trainer)
    # The byte tokens were listed as special only to get them into the vocabulary first; in real tokenizers they are
    # ordinary tokens (decode(skip_special_tokens=True) keeps them).
    spec = json.loads(tk.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    tk = Tokenizer.from_str(json.dumps(spec))
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]").replace("[end]", "</s>")
    tok.save_pretrained(dir)
    return tok


def make_gemma_tokenizer(dir, vocab_size: int = 380):
    """A Gemma-style fast tokenizer, as Gemma 3's tokenizer.json is: BPE with byte fallback, spaces made "▁" by the
    normalizer (no Metaspace pre-tokenizer), split after each "▁"; ids <pad>=0, <eos>=1, <bos>=2, <unk>=3."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)], show_progress=False
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    spec = json.loads(tk.to_str())  # the byte tokens are ordinary tokens, as in Gemma's file (see above)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.save_pretrained(dir)
    return tok


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
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    (dir / "tokenizer.model").write_bytes(buf.getvalue())
    (dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "add_eos_token": False,
                "chat_template": CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]").replace("[end]", "</s>"),
                "model_max_length": 512,
            }
        )
    )
    return AutoTokenizer.from_pretrained(dir)


# ----------------------------------------------------------------------------------------- chat-model tokenizers
# Chat corpora with the newlines real chat data has, so that the BPE learns "\n\n" merges (Qwen-style pre-tokenizer:
# "\n\n" is one pre-token, so a reply starting with "\n" merges with the "\n" that ends the assistant header).
CHAT_CORPUS = CORPUS + ["hello\n\nthe answer is paris.\n\nthank you\n\n", "sure\n\nhere is a poem\n\nthe sea\n"]
# The pre-tokenizer regex of Qwen2/Qwen3 (tokenizer.json of Qwen/Qwen3-0.6B); Llama 3's differs only in digit runs.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Qwen3's template, reduced to messages (no tools) but with its history rewrite kept verbatim: an assistant turn
# after the last user message is rendered with its <think> block (the reasoning from `reasoning_content` or from the
# content's <think>...</think>), an earlier one without it; content is lstripped of "\n" only in the think branch.
QWEN3_TEMPLATE = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system") %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 (verbatim: the template as the model ships it)

# Qwen2.5's ChatML (no history rewrite; the reply follows "assistant\n" verbatim).
CHATML_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ChatML with TRL-style {% generation %} blocks around each assistant reply and its <|im_end|>.
GENERATION_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5-Instruct's template (verbatim): with `tools` the system turn lists each tool's schema as JSON; an assistant
# turn with `tool_calls` writes each call as <tool_call> JSON; consecutive `tool` messages share one user turn.
QWEN25_TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim: the template as the model ships it)

# Meta Llama 3 Instruct's template (verbatim): contents are trimmed, bos before the first message.
# DeepSeek-R1-distill's template, simplified (no tools): earlier replies keep only the answer after </think>; the
# generation prompt opens the reasoning.
R1_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.system_prompt = m.content %}{% endif %}{% endfor %}"
    "{{ '<｜begin▁of▁sentence｜>' + ns.system_prompt }}{% for m in messages %}"
    "{% if m.role == 'user' %}{{ '<｜User｜>' + m.content }}{% elif m.role == 'assistant' %}"
    "{% set content = m.content %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _regex_bpe(specials: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    _train_byte_bpe(tk, CHAT_CORPUS, specials, vocab_size)
    return tk


def make_qwen_tokenizer(dir, template: str = QWEN3_TEMPLATE, vocab_size: int = 420):
    """A Qwen-style byte-level BPE (Qwen's pre-tokenizer regex; no bos; eos = <|im_end|>, pad = <|endoftext|>) with
    `template` (QWEN3_TEMPLATE, CHATML_TEMPLATE or GENERATION_TEMPLATE). "\\n\\n" is one token, so "assistant\\n" +
    "\\nhello" tokenised as one text merges across the boundary."""
    from transformers import PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = _regex_bpe(specials, vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:]
    )
    tok.add_tokens(["<think>", "</think>"])  # added, not special, as in Qwen3
    assert len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1
    return _saved(tok, dir, template)


def make_llama3_tokenizer(dir, template: str | None = LLAMA3_TEMPLATE, vocab_size: int = 420):
    """A Llama-3-style byte-level BPE: bos <|begin_of_text|> added when encoding, eos <|eot_id|>, NO pad token (as
    Meta ships it), LLAMA3_TEMPLATE (None: no chat template, as a base model)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = _regex_bpe(specials, vocab_size)
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        additional_special_tokens=specials[1:],
    )
    return _saved(tok, dir, template)
