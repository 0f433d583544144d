"""A client for an OpenAI-compatible completions server (vLLM first): the HTTP calls a served teacher or sampler needs,
with a readiness wait, timeouts and retries with backoff. Standard library only (``http.client``): nothing to install.

What a server must offer (vLLM's ``python -m vllm.entrypoints.openai.api_server``):
    GET  /health                        200 when the model is loaded (the readiness wait; /v1/models as a fallback)
    GET  /v1/models                     the served model's name (``data[0].id``) and ``max_model_len``
    POST /tokenize   {model, prompt}    the server's token ids of a text (the tokenizer parity check)
    POST /detokenize {model, tokens}    the text of token ids (the vocabulary check)
    POST /v1/completions {model, prompt: [ids] or [[ids], ...], max_tokens: 1, prompt_logprobs: K}
        ``choices[i].prompt_logprobs``: per prompt position a map "token id" -> {"logprob", "rank"}, None at position 0;
        the top-K ids plus the prompt token itself (its own log-prob and rank, also when outside the top K).
    POST /v1/completions {..., max_tokens: N, temperature, top_p, top_k, seed, return_token_ids: true}
        sampling; ``choices[i].token_ids`` are the sampled ids.

Failures: a connection refused or reset, a timeout, a cut-short response, HTTP 408/429/5xx are retried with
exponential backoff (``backoff * 2**attempt`` seconds, at most ``max_backoff``) ``retries`` times, then
``ServerUnavailable`` (the caller decides: training checkpoints and exits 75, the cache and generate exit 75, both
resumable). Any other HTTP status is our request's fault: ``ServerRefused`` at once, with the server's message.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.parse
from typing import Any

from ds_distill.common import UsageError

log = logging.getLogger("ds_distill")

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class ServerUnavailable(RuntimeError):
    """The server did not answer after every retry (a transient fault that outlasted the retries)."""


class ServerRefused(RuntimeError):
    """The server answered our request with a client error (HTTP 4xx other than 408/429): not retried."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class ServerClient:
    """One server at ``url`` (``http://host:port``, optionally with a path prefix before ``/v1``).

    Args:
        timeout: seconds for one request (connect + answer); a stalled server counts as a failed attempt.
        retries: attempts after the first before ``ServerUnavailable``.
        backoff, max_backoff: seconds before retry ``a`` (0-based): ``min(backoff * 2**a, max_backoff)``.
        flag: the command-line flag that named the server, for messages.
    Thread-safe: every request opens its own connection (a few hundred microseconds on 127.0.0.1).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        flag: str = "--teacher_url",
    ):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{flag} {url!r} is not an http(s)://host:port URL: pass the server's address")
        self.url, self.flag = url.rstrip("/"), flag
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        if self.prefix.endswith("/v1"):  # people paste the OpenAI base URL; the tokenizer routes sit above it
            self.prefix = self.prefix[:-3]
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self._model: dict[str, Any] | None = None
        self._closed = threading.Event()  # set by close(): requests in their backoff give up at once

    def close(self) -> None:
        """Stop retrying: a request waiting for its next attempt raises ``ServerUnavailable`` now, so a run that ends
        does not wait out the backoff of requests it drew ahead and no longer needs."""
        self._closed.set()

    # ------------------------------------------------------------------------------------------------ transport
    def _once(self, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, self.prefix + path, body=payload, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def request(self, method: str, path: str, body: dict | None = None, *, retries: int | None = None) -> Any:
        """The JSON answer of one request, retried on transient faults (see the module docstring)."""
        retries = self.retries if retries is None else retries
        start, last = time.monotonic(), ""
        for attempt in range(retries + 1):
            try:
                status, data = self._once(method, path, body, self.timeout)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
                last = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200:
                    try:
                        return json.loads(data)
                    except json.JSONDecodeError:
                        last = f"an answer that is not JSON ({len(data)} bytes)"
                elif status in RETRIED_STATUS:
                    last = f"HTTP {status}"
                else:
                    raise ServerRefused(status, _message(data))
            if attempt < retries:
                wait = min(self.backoff * 2**attempt, self.max_backoff)
                log.warning(
                    "%s %s%s: %s; retry %d/%d in %.1f s", self.flag, self.url, path, last, attempt + 1, retries, wait
                )
                if self._closed.wait(wait):
                    last += "; the client was closed"
                    break
        raise ServerUnavailable(
            f"{self.flag} {self.url}: {method} {path} failed {retries + 1} times in {time.monotonic() - start:.0f} s "
            f"(last: {last})"
        )

    def wait_ready(self, timeout: float = 600.0, poll: float = 1.0) -> None:
        """Block until the server answers /health (or /v1/models) with 200; UsageError after ``timeout`` seconds."""
        deadline, last = time.monotonic() + timeout, ""
        while True:
            for path in ("/health", "/v1/models"):
                try:
                    status, data = self._once("GET", path, None, min(self.timeout, 10.0))
                except (OSError, http.client.HTTPException) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    break  # nothing listens yet: the second path would fail the same way
                if status == 200:
                    return
                last = f"HTTP {status} on {path}"
            if time.monotonic() >= deadline:
                raise UsageError(
                    f"{self.flag} {self.url}: no server became ready in {timeout:.0f} s (last: {last}): start it "
                    "(README: serving a teacher with vLLM) or fix the URL"
                )
            time.sleep(poll)

    # ----------------------------------------------------------------------------------------------- endpoints
    def model(self) -> dict[str, Any]:
        """The served model's entry of /v1/models (``id``, ``max_model_len`` where the server says), cached."""
        if self._model is None:
            models = self.request("GET", "/v1/models").get("data") or []
            if len(models) != 1:
                raise UsageError(
                    f"{self.flag} {self.url} serves {len(models)} models ({[m.get('id') for m in models]}): serve one "
                    "model per URL"
                )
            self._model = models[0]
        return self._model

    @property
    def model_id(self) -> str:
        return self.model()["id"]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out = self.request(
            "POST", "/tokenize", {"model": self.model_id, "prompt": text, "add_special_tokens": add_special_tokens}
        )
        return list(out["tokens"])

    def detokenize(self, ids: list[int]) -> str:
        return self.request("POST", "/detokenize", {"model": self.model_id, "tokens": list(ids)})["prompt"]

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list[dict[str, dict] | None]]:
        """Per sequence, per position: the server's ``prompt_logprobs`` entry (None at position 0). One request."""
        body = {
            "model": self.model_id,
            "prompt": [list(map(int, s)) for s in sequences],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": int(k),
        }
        choices = sorted(self.request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(sequences):
            raise ServerUnavailable(f"{self.flag} {self.url}: {len(choices)} answers for {len(sequences)} sequences")
        out = []
        for seq, choice in zip(sequences, choices):
            entries = choice.get("prompt_logprobs")
            if entries is None or len(entries) != len(seq):
                raise UsageError(
                    f"{self.flag} {self.url} returned no prompt log-probs per position (got "
                    f"{None if entries is None else len(entries)} for {len(seq)} tokens): serve with vLLM's "
                    "OpenAI server, which supports prompt_logprobs"
                )
            out.append(entries)
        return out

    def sample(
        self,
        prompts: list[list[int]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int,
    ) -> list[list[int]]:
        """Sampled continuation ids of each prompt (one request; the server's stop on its eos included)."""
        body = {
            "model": self.model_id,
            "prompt": [list(map(int, p)) for p in prompts],
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p),
            "top_k": int(top_k) if top_k > 0 else -1,
            "seed": int(seed),
            "return_token_ids": True,
        }
        choices = sorted(self.request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts) or any(c.get("token_ids") is None for c in choices):
            raise UsageError(
                f"{self.flag} {self.url} did not return sampled token ids (return_token_ids): serve with vLLM >= 0.10"
            )
        return [list(c["token_ids"]) for c in choices]


def _message(data: bytes) -> str:
    """The error text of a server's JSON error answer (OpenAI form ``{"error": {"message"}}`` or FastAPI's
    ``{"detail"}``), on one line."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return " ".join(data[:300].decode(errors="replace").split())
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message", obj)))
        if isinstance(err, dict):
            err = err.get("message", err)
        return " ".join(str(err).split())[:500]
    return " ".join(str(obj).split())[:500]
