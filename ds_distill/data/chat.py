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
from typing import Any

from ds_distill.common import UsageError

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the test transformers uses
_SENTINEL = "DS_DISTILL_REPLY_SENTINEL"  # a reply no template rewrites (no markup, no surrounding whitespace)


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
    def _encode(self, text: str) -> list[int]:
        # The template writes bos and every marker itself; adding special tokens again would double bos.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_pieces(self, pieces: list[tuple[str, bool]], where: str) -> tuple[list[int], list[bool]]:
        """Concatenated (text, supervised) pieces -> (ids, supervised per token); see the module docstring."""
        ids: list[int] = []
        sup: list[bool] = []
        window, start = "", 0  # text tokenised as one string since the last cut, and where its ids begin
        for text, supervised in pieces:
            if not text:
                continue
            whole = self._encode(window + text)
            head = ids[start:]
            if whole[: len(head)] == head:
                new = whole[len(head) :]
                window += text
            else:  # the piece's first token merges with the previous piece's last: cut here, as generation does
                new = self._encode(text)
                decoded = self.tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                if decoded != text:
                    raise UsageError(
                        f"{where}: the text {text[:40]!r} does not survive tokenising on its own "
                        f"(decodes as {decoded[:40]!r}): check the tokenizer or the template"
                    )
                window, start = text, len(ids)
            ids += new
            sup += [supervised] * len(new)
        return ids, sup

    # ------------------------------------------------------------------------------------------------- main
    def __call__(
        self, messages: list[dict[str, Any]], where: str, tools: list[dict] | None = None
    ) -> list[tuple[list[int], list[bool]]]:
        """``tools``: the conversation's tool schemas (JSON-schema dicts), rendered by the template as at inference
        (``apply_chat_template(messages, tools=tools)``); an assistant turn with ``tool_calls`` is a reply like any
        other (the calls as the template writes them are supervised), ``tool`` results are context."""
        self.tools = tools or None
        full = self.render(messages, where)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on_prompt or not turns:
            return [self.encode_pieces([(full, self.train_on_prompt)], where)]
        parts = [self.turn(messages, i, where) for i in turns]
        # One example for the whole conversation if every turn sits in `full` as it renders alone.
        pieces, pos = [], 0
        for context, reply, _ in parts:
            if (
                not (full.startswith(context) and full[len(context) : len(context) + len(reply)] == reply)
                or len(context) < pos
            ):
                break
            pieces += [(full[pos : len(context)], False), (reply, True)]
            pos = len(context) + len(reply)
        else:
            ids, sup = self.encode_pieces(pieces + [(full[pos:], False)], where)
            # ... and every turn's context, tokenised as inference tokenises it, is a prefix of those tokens.
            if all(ids[: len(c)] == c for c in (self._encode(context) for context, _, _ in parts)):
                return [(ids, sup)]
        return [
            self.encode_pieces([(context, False), (reply, True), (after, False)], f"{where}, turn {i}")
            for i, (context, reply, after) in zip(turns, parts)
        ]
