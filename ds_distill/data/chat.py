"""Chat supervision: the tokens of a conversation and which of them are targets, as the model sees them at inference.

An assistant turn i is supervised given its context rendered exactly as inference renders it: the conversation up
to turn i with the generation prompt, ``render(messages[:i], add_generation_prompt=True)``, tokenised as one text.
The supervised reply is what the template writes after that context when it renders ``messages[:i + 1]``: the content
and the end-of-turn token(s) (so the student learns to stop). Templates with ``{% generation %}`` blocks mark the
reply themselves (transformers' ``return_assistant_tokens_mask`` spans); the text after the block is not supervised.

Templates that rewrite history (Qwen3 drops the ``<think>`` block of assistant turns before the last user message)
render turn i differently in its own context than in the contexts of later turns. So:
  - if every turn's inference context is a token prefix of the whole rendered conversation, the conversation is ONE
    training example (ordinary templates: Llama 3, ChatML, ...), supervised on every assistant reply;
  - otherwise it becomes ONE EXAMPLE PER ASSISTANT TURN: ``tokens(context_i) + tokens(reply_i)``.
Either way every supervised token is predicted from exactly the tokens inference would give the model.

Templates whose rendered turn does not extend the context at all (DeepSeek-R1 distill: the generation prompt writes
``<｜Assistant｜><think>\\n``, a rendered turn ``<｜Assistant｜>`` + the answer after ``</think>``, reasoning cut) are
supervised on what the model generates after the generation prompt: the content as written in the data minus what the
prompt already wrote after the turn header (``<think>\\n``), then the end-of-turn text the template writes after a reply
(found by rendering a sentinel reply). The answer and end-of-turn are checked against the template's own rendering.

Tool calling: the conversation's ``tools`` go to every rendering (the template writes their schemas, typically in the
system turn); an assistant turn with ``tool_calls`` is located and supervised as any reply (the calls as the template
writes them, then end-of-turn); ``tool`` messages, like user turns, are context only.

Tokenising by segments: context and reply are tokenised as one text when the reply's first token does not merge with
the context's last one (then the ids are the tokenizer's own for the whole text); when it does (a reply starting with
"\\n" under a Qwen-style BPE), the reply is tokenised on its own, as generation produces it after a prompt, and its
decoded text is checked against the rendered reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ds_distill.common import UsageError

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the test transformers uses
_SENTINEL = "DS_DISTILL_REPLY_SENTINEL"  # a reply no template rewrites (no markup, no surrounding whitespace)
# Each message's content stands in for itself as DS_DISTILL_CONTENT_<k>_ to find where a template writes contents.
_CONTENT = re.compile(r"DS_DISTILL_CONTENT_(\d+)_")

# Rendered by two chat templates to compare them: a system turn, a user turn, an assistant reply, then the next user
# turn, as most templates vary (the same-tokenizer teacher check and the cross-tokenizer content probe).
SAMPLE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
)

Span = tuple[int, int]


@dataclass(frozen=True)
class ChatExample:
    """One training example of a conversation: ``ids`` and ``supervised`` per token; ``text``, the rendered text the
    ids spell (its pieces joined); ``offsets``, each token's character span in ``text`` (asked for: fast tokenizers
    only, else None); ``n_messages``, how many of the conversation's messages it renders (all, or up to its turn)."""

    ids: list[int]
    supervised: list[bool]
    text: str
    offsets: list[Span] | None
    n_messages: int


class ChatEncoder:
    """Conversation -> training examples ``[(input_ids, supervised)]`` (one, or one per assistant turn).

    Args:
        tokenizer: a Hugging Face tokenizer (its ``chat_template`` unless ``chat_template`` is given).
        chat_template: Jinja text replacing the tokenizer's template (``--chat_template FILE``); the tokenizer itself
            is not modified.
        train_on_prompt: supervise every token of the whole rendered conversation (one example).
    Errors: UsageError naming the example when the template fails, renders a turn's context so that it is not a
    text prefix of the turn and no reply can be located after it either (``reply_after_prompt``), or the generation
    prompt writes text the reply does not start with.
    """

    def __init__(self, tokenizer, chat_template: str | None = None, train_on_prompt: bool = False):
        self.tokenizer, self.train_on_prompt = tokenizer, train_on_prompt
        self.template = chat_template or tokenizer.chat_template
        if not self.template:
            raise UsageError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template but the data has 'messages': "
                f"pass --chat_template FILE, use a tokenizer with a chat_template, or prompt/completion data"
            )
        self.generation_blocks = bool(_GENERATION_BLOCK.search(self.template))
        self.tools: list[dict] | None = None  # the current conversation's tools (set per call)

    # -------------------------------------------------------------------------------------------- rendering
    def render(self, messages: list[dict], where: str, generation: bool = False) -> str:
        """The text inference renders: ``apply_chat_template(messages, tools=self.tools, ...)``."""
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=self.tools,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation,
            )
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise UsageError(f"chat template failed on {where}: {exc}: fix the conversation or the template") from None

    def generation_span(self, messages: list[dict], where: str) -> tuple[str, int, int]:
        """(text, start, end) of the last {% generation %} block of ``render(messages)``, in characters."""
        from transformers.utils.chat_template_utils import render_jinja_template

        text = self.render(messages, where)
        # transformers' own renderer, as apply_chat_template(return_assistant_tokens_mask=True) calls it; it must give
        # the same text as apply_chat_template (checked), else the offsets would point into another string.
        (rendered,), (spans,) = render_jinja_template(
            conversations=[messages],
            tools=self.tools,
            chat_template=self.template,
            return_assistant_tokens_mask=True,
            **self.tokenizer.special_tokens_map,
        )
        if rendered != text or not spans:
            raise UsageError(
                f"{where}: the chat template's {{% generation %}} block does not mark the last assistant "
                f"turn: wrap every assistant reply in {{% generation %}}...{{% endgeneration %}}"
            )
        start, end = spans[-1]
        return text, start, end

    def turn(self, messages: list[dict], i: int, where: str) -> tuple[str, str, str]:
        """(context, reply, after) of assistant turn i: context as inference renders it, the supervised reply, and
        any text the template writes after the reply's generation block (not supervised)."""
        context = self.render(messages[:i], where, generation=True)
        if self.generation_blocks:
            text, start, end = self.generation_span(messages[: i + 1], where)
            if text[:start] != context:
                raise UsageError(
                    f"{where}, turn {i}: the chat template's {{% generation %}} block does not start where "
                    f"its generation prompt ends: put {{% generation %}} right after the assistant header"
                )
            return context, text[start:end], text[end:]
        text = self.render(messages[: i + 1], where)
        if text.startswith(context):
            return context, text[len(context) :], ""
        reply = self.reply_after_prompt(messages, i, context, text, where)
        if reply is None:
            k = next(k for k, (a, b) in enumerate(zip(context + "\0", text + "\0")) if a != b)  # first difference
            raise UsageError(
                f"{where}, turn {i}: the chat template renders the context of this reply (with the "
                f"generation prompt) differently from the conversation up to it ({context[k : k + 30]!r} vs "
                f"{text[k : k + 30]!r} at character {k}), so the reply cannot be located: pass a training "
                f"template with --chat_template FILE"
            )
        return context, reply, ""

    def reply_after_prompt(self, messages: list[dict], i: int, context: str, text: str, where: str) -> str | None:
        """The reply of assistant turn i when the rendered turn ``text`` does not extend its ``context`` (DeepSeek-R1
        distill: the generation prompt writes ``<｜Assistant｜><think>\\n``, a rendered turn ``<｜Assistant｜>`` and
        only the answer after ``</think>``), or None when the template's structure cannot be determined.

        The reply is what the model generates after the generation prompt: the content as written in the data, minus
        what the prompt already wrote after the turn header (``<think>\\n``), plus the end-of-turn text. Header and
        end-of-turn come from the template itself: the conversation rendered with a sentinel reply. Checked against
        the template's rendering of the turn: header, then a suffix of the reply (the answer) ending in end-of-turn.
        Errors: UsageError when a reply does not start with what the generation prompt already wrote.
        """
        base = self.render(messages[:i], where)
        probe = self.render(messages[:i] + [{"role": "assistant", "content": _SENTINEL}], where)
        if probe.count(_SENTINEL) != 1 or not probe.startswith(base) or not context.startswith(base):
            return None
        header, end = probe[len(base) :].split(_SENTINEL)
        prompt = context[len(base) :]  # the generation prompt
        if not prompt.startswith(header) or not text.startswith(base + header):
            return None
        opened, content = prompt[len(header) :], messages[i].get("content") or ""
        if not content.startswith(opened):
            raise UsageError(
                f"{where}, turn {i}: the chat template's generation prompt already writes {opened!r}, "
                f"but the reply does not start with it, so what the model says after the prompt is "
                f"unknown: write each assistant reply as generated from the header on (starting "
                f"{opened!r}), or pass a template with --chat_template FILE"
            )
        reply, shown = content[len(opened) :] + end, text[len(base + header) :]
        return reply if shown.endswith(end) and reply.endswith(shown) else None

    # ------------------------------------------------------------------------------------------- tokenising
    def _encode(self, text: str, offsets: bool = False) -> list[int] | tuple[list[int], list[Span]]:
        # The template writes bos and every marker itself; adding special tokens again would double bos.
        if not offsets:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def encode_pieces(
        self, pieces: list[tuple[str, bool]], where: str, offsets: bool = False
    ) -> tuple[list[int], list[bool]] | tuple[list[int], list[bool], list[Span]]:
        """Concatenated (text, supervised) pieces -> (ids, supervised per token); see the module docstring. With
        ``offsets`` (a fast tokenizer) also each token's character span in the joined text."""
        ids: list[int] = []
        sup: list[bool] = []
        spans: list[Span] = []
        window, start, at = "", 0, 0  # text tokenised as one string since the last cut, where its ids/chars begin
        for text, supervised in pieces:
            if not text:
                continue
            whole, whole_spans = self._encode(window + text, True) if offsets else (self._encode(window + text), [])
            head = ids[start:]
            if whole[: len(head)] == head:
                new, new_spans = whole[len(head) :], whole_spans[len(head) :]
                window += text
            else:  # the piece's first token merges with the previous piece's last: cut here, as generation does
                new, new_spans = self._encode(text, True) if offsets else (self._encode(text), [])
                decoded = self.tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                if decoded != text:
                    raise UsageError(
                        f"{where}: the text {text[:40]!r} does not survive tokenising on its own "
                        f"(decodes as {decoded[:40]!r}): check the tokenizer or the template"
                    )
                at += len(window)
                window, start = text, len(ids)
            ids += new
            sup += [supervised] * len(new)
            spans += [(at + a, at + b) for a, b in new_spans]
        return (ids, sup, spans) if offsets else (ids, sup)

    # ------------------------------------------------------------------------------------------------- main
    def __call__(
        self, messages: list[dict[str, Any]], where: str, tools: list[dict] | None = None
    ) -> list[tuple[list[int], list[bool]]]:
        """``tools``: the conversation's tool schemas (JSON-schema dicts), rendered by the template as at inference
        (``apply_chat_template(messages, tools=tools)``); an assistant turn with ``tool_calls`` is a reply like any
        other (the calls as the template writes them are supervised), ``tool`` results are context."""
        return [(e.ids, e.supervised) for e in self.examples(messages, where, tools)]

    def examples(
        self,
        messages: list[dict[str, Any]],
        where: str,
        tools: list[dict] | None = None,
        per_turn: bool = False,
        offsets: bool = False,
    ) -> list[ChatExample]:
        """The conversation's examples (see ``__call__``); ``per_turn``: one per assistant turn even when one would
        do (a cross-tokenizer teacher whose template needs them); ``offsets``: each token's character span."""
        self.tools = tools or None
        full = self.render(messages, where)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

        def example(pieces: list[tuple[str, bool]], here: str, n: int) -> ChatExample:
            ids, sup, *spans = self.encode_pieces(pieces, here, offsets)
            return ChatExample(ids, sup, "".join(p for p, _ in pieces), spans[0] if spans else None, n)

        if self.train_on_prompt or not turns:
            return [example([(full, self.train_on_prompt)], where, len(messages))]
        parts = [self.turn(messages, i, where) for i in turns]
        # One example for the whole conversation if every turn sits in `full` as it renders alone.
        pieces, pos = [], 0
        for context, reply, _ in [] if per_turn else parts:
            if (
                not (full.startswith(context) and full[len(context) : len(context) + len(reply)] == reply)
                or len(context) < pos
            ):
                break
            pieces += [(full[pos : len(context)], False), (reply, True)]
            pos = len(context) + len(reply)
        else:
            whole = example(pieces + [(full[pos:], False)], where, len(messages)) if not per_turn else None
            # ... and every turn's context, tokenised as inference tokenises it, is a prefix of those tokens.
            if whole and all(whole.ids[: len(c)] == c for c in (self._encode(context) for context, _, _ in parts)):
                return [whole]
        return [
            example([(context, False), (reply, True), (after, False)], f"{where}, turn {i}", i + 1)
            for i, (context, reply, after) in zip(turns, parts)
        ]

    # -------------------------------------------------------------------------------------- message contents
    def content_spans(self, messages: list[dict], text: str, where: str) -> list[Span | None]:
        """Where ``text`` (a rendering of ``messages``, e.g. ``ChatExample.text``) holds each message's content:
        ``[len(messages)]`` character spans, None for a message whose content the template does not write as
        written (dropped, rewritten) or that has none.

        The template's markup is found by rendering the conversation with each content replaced by a sentinel
        (``DS_DISTILL_CONTENT_<k>_``): the text between sentinels is markup, and in ``text`` each content sits
        between its markup and the next. A content written as a part of itself (trimmed: Llama 3; only the answer
        after ``</think>``: DeepSeek-R1's history) spans that part; one written inside other text spans itself. Where
        the markup depends on the content (Qwen3 writes a ``<think>`` block from it), the content is searched as
        written (or trimmed), followed by the start of the next markup.
        """
        marked = [
            {**m, "content": f"DS_DISTILL_CONTENT_{k}_"} if isinstance(m.get("content"), str) and m["content"] else m
            for k, m in enumerate(messages)
        ]
        out: list[Span | None] = [None] * len(messages)
        try:
            pieces = _CONTENT.split(self.render(marked, where))  # [markup, k, markup, k, ..., markup]
        except UsageError:  # a template that branches on content (no sentinel passes its checks): nothing located
            return out
        pos = 0
        for j in range(1, len(pieces), 2):
            before, k, after = pieces[j - 1], int(pieces[j]), pieces[j + 1]
            content, at = messages[k]["content"], text.find(before, pos)
            span = _located(text, at + len(before), content, after) if at >= 0 and out[k] is None else None
            if span is None and out[k] is None:
                span = next(
                    (
                        (i, i + len(c))
                        for c in dict.fromkeys((content, content.strip()))
                        if c
                        for i in _occurrences(text, c, pos)
                        if text.startswith(after[:_GUARD], i + len(c))
                    ),
                    None,
                )
            if span is not None:
                out[k], pos = span, span[1]
        return out


# A content found by search must be followed by this many characters of the next markup (not a word inside markup).
_GUARD = 4


def _occurrences(text: str, sub: str, pos: int):
    """Every start of ``sub`` in ``text`` from ``pos`` on."""
    i = text.find(sub, pos)
    while i >= 0:
        yield i
        i = text.find(sub, i + 1)


def _located(text: str, pos: int, content: str, after: str) -> Span | None:
    """The span of ``content`` at ``pos`` of ``text``, before the markup ``after``: as written or trimmed, else what
    lies up to ``after`` when it is a part of the content (or holds it)."""
    for c in dict.fromkeys((content, content.strip())):
        if c and text.startswith(c, pos) and text.startswith(after[:_GUARD], pos + len(c)):
            return pos, pos + len(c)
    end = text.find(after, pos) if after else -1
    shown = text[pos:end] if end >= 0 else ""
    if shown and shown in content:
        return pos, end
    if shown and content in shown:
        return pos + shown.find(content), pos + shown.find(content) + len(content)
    return None


def content_probe(student: ChatEncoder, teacher: ChatEncoder, student_name: str, teacher_name: str) -> None:
    """Cross-tokenizer chat data: ``SAMPLE_CONVERSATION`` rendered by both templates must show every message's
    content as written (the contents are what the two renderings are aligned on); else one UsageError naming the
    message, what each template made of it and the fix, before any model loads. A template that refuses a system turn
    (Gemma's) is probed without it."""
    import jinja2

    conversation = list(SAMPLE_CONVERSATION)
    try:
        for enc in (student, teacher):
            enc.tools = None
            enc.tokenizer.apply_chat_template(conversation, chat_template=enc.template, tokenize=False)
    except jinja2.TemplateError:
        conversation = conversation[1:]
    for enc, name in ((student, student_name), (teacher, teacher_name)):
        text = enc.render(conversation, f"the probe conversation ({name})")
        for k, span in enumerate(enc.content_spans(conversation, text, "the probe conversation")):
            m = conversation[k]
            if span is None or text[span[0] : span[1]] != m["content"]:
                raise UsageError(
                    f"the {name}'s chat template does not write the probe conversation's message {k} ({m['role']}: "
                    f"{m['content']!r}) as written (it renders {text[:200]!r}), so the two models' renderings of chat "
                    "data cannot be aligned on the messages' contents (--cross_tokenizer): give it a template that "
                    "writes every message's content (--chat_template FILE for the student, the teacher's "
                    "tokenizer_config.json chat_template for the teacher), or render the data to prompt/completion "
                    "records"
                )
