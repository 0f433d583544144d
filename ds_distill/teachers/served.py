"""A teacher behind an inference server (``--teacher_url``): ``ServedTeacher``, the third teacher source beside live
engines and caches. Per micro-batch, the supervised positions' top-K log-probs come from an OpenAI-compatible
completions endpoint with ``prompt_logprobs`` (vLLM; ``ds_distill.teachers.server_client``), and the loss is the
cache's: top-K plus one tail bucket (``losses.sparse_loss_sums``), summed per token and divided by the run's global
token count like every loss.

What each divergence computes from a served top-K (the same as from a cache of the same K; ``losses.sparse``):
the teacher is known on K + 1 buckets (its K most likely ids, then "every other id", mass
``tail = log(1 - sum_topK p)``), and D is the divergence between the teacher's and the student's distributions on
those buckets (the student's tail bucket is the logsumexp of its own log-probs outside the teacher's ids).
    forward_kl      KL(t || s) on the buckets: the full-vocabulary forward KL minus the tail's within-bucket term
                    ``sum_tail p_t log(p_t / p_s) - P_t log(P_t / P_s)`` (>= 0, at most the tail mass times the log of
                    the tail's size); exact when K >= the vocabulary. Its gradient on the top-K ids is the full KL's.
    reverse_kl      KL(s || t) on the buckets: a lower bound of the full reverse KL. The student's mass spread inside
                    the tail is not scored token by token, because the server does not return the teacher's log-probs
                    of ids outside its top K; exact when K >= the vocabulary.
    jsd, skew_*, tvd  the same divergence on the buckets (a lower bound of the full one by the data-processing
                    inequality); exact when K >= the vocabulary.
What is refused, in one line at connect: a KD ``--temperature`` other than 1 when K is below the vocabulary (vLLM's
prompt log-probs are of ``softmax(logits)``: the top K at temperature 1 do not fix the tail's shape at another
temperature; with K >= the vocabulary the log-probs are rescaled exactly, ``log_softmax(logp / T)``).

Requests: one ``/v1/completions`` request per micro-batch (rank-local batching: its rows, or with packing its
documents, as a list of token-id lists, so the server batches them), issued from a thread pool as soon as
``ServedStream`` draws the micro-batch, ``ahead`` micro-batches before the trainer needs them.
``extras.served_guard.ServedGuard`` waits,
before each step, for the step's requests: a server that stays unavailable after the client's retries stops the run
at that step boundary on every rank (the vote of ``core.step_sync``), with a checkpoint of the last finished step and
exit code 75 (``extras.preemption.PREEMPTED_EXIT_CODE``); ``--resume`` continues the same curve. A micro-batch is
never skipped: its targets are the server's, or the step does not happen.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import hashlib
import logging
import math
from typing import Any, Callable, Iterator

import torch

from ds_distill.common import IGNORE_INDEX, UsageError
from ds_distill.data.batching import Batch
from ds_distill.teachers.cache_format import TAIL_FLOOR
from ds_distill.teachers.cache_reader import CachedTeacher
from ds_distill.teachers.live import CrossTokenizerTeacher
from ds_distill.teachers.server_client import ServerClient, ServerRefused

log = logging.getLogger("ds_distill")

# The probe of the connect checks: words, digits, punctuation and a newline (most tokenizers split these differently).
PROBE_TEXT = "The quick brown fox, 42 times: jumps over the lazy dog?\nYes! it's 3.14 o'clock."
PARITY_TOLERANCE = 1e-3  # nats: vLLM float32 against the model's own float32 log_softmax differed by <= 9.2e-5 here


def request_sequences(
    input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """What to ask the server for one micro-batch: (token-id sequences, one (sequence, position) per supervised token
    in row-major ``[B, T]`` order, pointing at the answer entry that holds ``log p(label | prefix)``).

    input_ids, labels ``[B, T]`` (labels shifted: ``labels[b, t] = input_ids[b, t + 1]`` or -100); position_ids
    ``[B, T]`` for packed rows: each document (positions restarting at 0) is its own sequence, as the student sees it.
    A sequence ends at its last supervised label (the rest would be scored for nothing). ValueError if a label is not
    the next input token (the server scores the sequence it is given).
    """
    ids, lab = input_ids.cpu(), labels.cpu()
    seqs: list[list[int]] = []
    where: list[tuple[int, int]] = []
    for b in range(ids.shape[0]):
        sup = (lab[b] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        if not sup:
            continue
        if position_ids is None:
            starts = [0]
        else:
            starts = (position_ids[b].cpu() == 0).nonzero().squeeze(1).tolist() or [0]
        bounds = starts[1:] + [ids.shape[1]]
        for s, e in zip(starts, bounds):
            mine = [t for t in sup if s <= t < e]
            if not mine:
                continue
            last = mine[-1]
            if last + 1 >= e:
                raise ValueError(f"row {b}: the label at position {last} has no next input token in its document")
            seq = ids[b, s : last + 2].tolist()
            for t in mine:
                if int(lab[b, t]) != seq[t - s + 1]:
                    raise ValueError(f"row {b}: labels[{t}] = {int(lab[b, t])} is not input_ids[{t + 1}]")
                where.append((len(seqs), t - s + 1))
            seqs.append(seq)
    return seqs, where


def sparse_from_entries(
    entries: list[list[dict | None]], where: list[tuple[int, int]], k: int, vocab: int, temperature: float, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Server answers -> the sparse teacher of ``losses.sparse_loss_sums``: (ids ``[n, K]`` ascending, log-probs
    ``[n, K]``, log tail ``[n]``), float32, one row per ``where`` entry.

    Each entry holds the top-K ids (rank 1..K) plus the label itself when it ranks lower (dropped here: the loss
    compares K + 1 buckets). The tail is ``log(1 - sum p)`` in float64, at least ``TAIL_FLOOR`` (as a cache stores
    it); with K = vocabulary there is no tail (-inf) and ``temperature`` rescales exactly: ``log_softmax(logp / T)``.
    UsageError when the server's ids leave the vocabulary or it returns fewer than K ids.
    """
    n = len(where)
    ids = torch.empty((n, k), dtype=torch.int64)
    logp = torch.empty((n, k), dtype=torch.float64)
    for row, (s, pos) in enumerate(where):
        entry = entries[s][pos]
        items = sorted(((int(v["rank"]), int(i), float(v["logprob"])) for i, v in entry.items()))[:k]
        if len(items) < k:
            raise UsageError(
                f"{name} returned {len(items)} log-probs per position for top-K {k}: its model scores fewer ids "
                f"than the student's vocabulary ({vocab}): serve a teacher with the student's vocabulary"
            )
        items.sort(key=lambda x: x[1])
        ids[row] = torch.tensor([i for _, i, _ in items])
        logp[row] = torch.tensor([lp for _, _, lp in items])
    if n and int(ids.max()) >= vocab:
        raise UsageError(
            f"{name} returned token id {int(ids.max())}, outside the student's vocabulary of {vocab}: the served "
            "model has more output rows than the tokenizer; serve a teacher whose vocabulary is the student's"
        )
    if k >= vocab:
        logp = torch.log_softmax(logp / temperature, dim=-1)
        tail = torch.full((n,), -math.inf, dtype=torch.float64)
    else:
        # the complement of the top-K mass; rounding can make it <= 0 when the top K hold nearly everything
        tail = torch.log((-torch.logsumexp(logp, dim=-1).exp()).add(1.0).clamp(min=math.exp(TAIL_FLOOR)))
    return ids, logp.float(), tail.float()


class ServedModel:
    """One served teacher: its client, its K and the log-probs of micro-batches (``fetch``)."""

    def __init__(self, client: ServerClient, k: int, vocab: int, temperature: float):
        self.client, self.k, self.vocab, self.temperature = client, k, vocab, temperature

    @property
    def name(self) -> str:
        return f"{self.client.flag} {self.client.url}"

    def fetch(self, seqs: list[list[int]], where: list[tuple[int, int]]):
        """(ids, log-probs, tail) of the supervised tokens of one micro-batch: one request, retried by the client."""
        if not seqs:
            empty = torch.empty((0, self.k))
            return empty.long(), empty, torch.empty(0)
        try:
            entries = self.client.prompt_logprobs(seqs, self.k)
        except ServerRefused as exc:
            raise UsageError(f"{self.name} refused a micro-batch's request ({exc})") from None
        return sparse_from_entries(entries, where, self.k, self.vocab, self.temperature, self.name)

    def fetch_own(self, seqs: list[list[int]], where: list[tuple[int, int]]) -> torch.Tensor:
        """The log-prob of each ``where`` entry's own token (the sequence's token at that position: vLLM's prompt
        log-probs hold it beside the top-K), ``[n]`` float32 in ``where``'s order: ALM's targets, one request."""
        if not seqs:
            return torch.empty(0)
        try:
            entries = self.client.prompt_logprobs(seqs, self.k)
        except ServerRefused as exc:
            raise UsageError(f"{self.name} refused a micro-batch's request ({exc})") from None
        out = []
        for s, pos in where:
            entry = entries[s][pos] or {}
            got = entry.get(str(seqs[s][pos]))
            if got is None:
                raise UsageError(
                    f"{self.name} returned no log-prob of the prompt's own token {seqs[s][pos]} at position {pos}: "
                    "serve with vLLM's OpenAI server, whose prompt_logprobs hold the prompt token"
                )
            out.append(float(got["logprob"]))
        return torch.tensor(out, dtype=torch.float32)

    # ---------------------------------------------------------------------------------------- connect checks
    def check(
        self,
        tokenizer,
        seq_len: int,
        reference: str = "",
        tolerance: float = PARITY_TOLERANCE,
        whose: str = "the student's",
    ) -> None:
        """The connect checks, each a one-line UsageError: context length, tokenizer parity, K within the server's
        ``--max-logprobs``, vocabulary, and with ``reference`` (a local copy of the teacher) log-prob parity."""
        info = self.client.model()
        limit = info.get("max_model_len")
        if limit is not None and limit < seq_len:
            raise UsageError(
                f"{self.name} serves {info['id']!r} with max_model_len {limit}, below --seq_len {seq_len}: restart it "
                f"with --max-model-len {seq_len} or more"
            )
        mine = tokenizer(PROBE_TEXT)["input_ids"]
        theirs = self.client.tokenize(PROBE_TEXT)
        if theirs != mine:
            at = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))
            raise UsageError(
                f"{self.name} tokenizes the probe text {PROBE_TEXT!r} into {len(theirs)} ids, {whose} tokenizer "
                f"into {len(mine)}, first difference at id {at}: serve a teacher with {whose} tokenizer"
            )
        try:
            entries = self.client.prompt_logprobs([mine], self.k)
        except ServerRefused as exc:
            if "logprob" in exc.message.lower():
                raise UsageError(
                    f"{self.name} refuses top-K {self.k} ({exc.message}): restart the server with --max-logprobs "
                    f"{self.k} or more (vLLM), or lower --teacher_top_k"
                ) from None
            raise UsageError(f"{self.name} refused the probe request ({exc})") from None
        where = [(0, p) for p in range(1, len(mine))]
        ids, logp, _ = sparse_from_entries(entries, where, self.k, self.vocab, 1.0, self.name)
        if reference:
            diff = reference_difference(reference, mine, ids, logp, self.vocab)
            if diff > tolerance:
                raise UsageError(
                    f"{self.name}: its log-probs on the probe differ from --teacher_reference {reference} by up to "
                    f"{diff:.3g} nats (tolerance {tolerance:g}): it serves another model, or another dtype (serve with "
                    "--dtype float32), or raise --teacher_reference_tolerance"
                )
            log.info(
                "%s: log-probs within %.2g nats of --teacher_reference %s on the probe", self.name, diff, reference
            )


def reference_difference(path: str, seq: list[int], ids: torch.Tensor, logp: torch.Tensor, vocab: int) -> float:
    """Largest |served - local| log-prob over the served top-K ids of the probe ``seq`` (nats), the local copy at
    ``path`` run in float32 (its log_softmax over the first ``vocab`` rows, as the live teacher's loss takes them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1, :vocab]
    local = torch.log_softmax(logits.double(), dim=-1).gather(1, ids)
    return float((local - logp.double()).abs().max())


class ServedTeacher(CachedTeacher):
    """A ``teachers.TeacherSource``: served teachers (and optionally caches, as one ensemble: ``ensemble.mix``; with
    live teachers too, it is the sparse member of an ``ensemble.MixedTeachers``).

    ``submit(batch)`` issues a micro-batch's requests on the thread pool (``ServedStream`` calls it as it draws);
    ``targets`` takes the answers of that batch (or asks now, e.g. for eval batches). Ensemble order: caches first,
    then servers, as ``--teacher_weights`` lists them."""

    def __init__(
        self, servers: list[ServedModel], caches: list = (), splits: dict[str, str] | None = None, workers: int = 4
    ):
        super().__init__(list(caches), splits or {"train": "data", "eval": "data"})
        self.servers = list(servers)
        self.temperature = servers[0].temperature if servers else self.temperature
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ds_distill-served")
        self.pending: dict[tuple, tuple[list, list[concurrent.futures.Future]]] = {}

    @staticmethod
    def _key(batch: Batch, split: str) -> tuple:
        """Where the batch sits in the data (and which examples it holds): a batch drawn by ``ServedStream``."""
        return (split, batch.epoch, batch.position, *batch.example_ids.tolist())

    @staticmethod
    def _requests(batch: Batch):
        return request_sequences(batch.inputs["input_ids"], batch.labels, batch.inputs.get("position_ids"))

    @staticmethod
    def fetch(server: ServedModel, seqs: list[list[int]], where: list[tuple[int, int]]):
        """One server's answer to one micro-batch's request (on a pool thread)."""
        return server.fetch(seqs, where)

    def submit(self, batch: Batch, split: str = "train") -> list[concurrent.futures.Future]:
        seqs, where = self._requests(batch)
        futures = [self.pool.submit(self.fetch, server, seqs, where) for server in self.servers]
        self.pending[self._key(batch, split)] = (seqs, futures)
        return futures

    def cancel(self) -> None:
        for _, futures in self.pending.values():
            for f in futures:
                f.cancel()
        self.pending.clear()

    def close(self) -> None:
        """End of the run: drop the requests drawn ahead, stop their retries, join the threads."""
        self.cancel()
        for server in self.servers:
            server.client.close()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def targets(self, batch: Batch, split: str):
        """The served top-K of the batch's supervised tokens (the requests ``submit`` issued, else issued now), after
        the caches' parts when the ensemble has caches."""
        seqs, where = self._requests(batch)
        got = self.pending.pop(self._key(batch, split), None)
        if got is None or got[0] != seqs:  # not drawn through ServedStream (eval), or another batch with these ids
            futures = [self.pool.submit(self.fetch, server, seqs, where) for server in self.servers]
        else:
            futures = got[1]
        parts = super().targets(batch, split) if self.caches else []
        return parts + [f.result() for f in futures]


class ServedCrossTokenizerTeacher(ServedTeacher):
    """ALM (``--cross_tokenizer alm``) against a served teacher of another tokenizer: per micro-batch one request of
    the teacher's own ids (the batch's teacher columns, one sequence per row or packed document, as the data pipeline
    aligned them with ``--teacher_tokenizer``); vLLM's prompt log-probs hold each prompt token's own log-prob, which
    is exactly what ALM needs of the teacher (at temperature 1: ``--temperature`` other than 1 is refused). Requests
    are issued ahead by ``ServedStream`` and guarded by ``ServedGuard`` as for ``ServedTeacher``; the loss and the
    alignment report are ``CrossTokenizerTeacher``'s (``self.cross``) on those log-probs, as from a cache."""

    def __init__(self, servers: list[ServedModel], splits: dict[str, str] | None = None, workers: int = 4):
        super().__init__(servers, [], splits, workers)
        self.cross = CrossTokenizerTeacher(None, "alm")

    @staticmethod
    def _requests(batch: Batch):
        c = batch.teacher
        if c is None:
            raise ValueError("--cross_tokenizer needs batches with the teacher's columns (data.get_dataset)")
        return request_sequences(c["teacher_input_ids"], c["teacher_labels"], c.get("teacher_position_ids"))

    @staticmethod
    def fetch(server: ServedModel, seqs: list[list[int]], where: list[tuple[int, int]]):
        return server.fetch_own(seqs, where)

    def targets(self, batch: Batch, split: str) -> dict[str, Any]:
        cross = self.cross.columns(batch, split)
        (logp,) = super().targets(batch, split)
        return {**cross, "teacher_logp": logp}

    def loss_sums(self, *args, **kwargs) -> Any:
        return self.cross.loss_sums(*args, **kwargs)


class ServedStream:
    """Wraps a batch stream: keeps ``ahead`` micro-batches drawn, each with its requests already issued
    (``ServedTeacher.submit``), so the server works while the student trains. ``state_dict`` is the wrapped stream's
    state as of the last batch the trainer consumed (like ``data.prefetch.Prefetcher``): checkpoints resume with or
    without it."""

    def __init__(self, stream, teacher: ServedTeacher, ahead: int):
        self.stream, self.teacher, self.ahead = stream, teacher, max(ahead, 1)
        self.dataset = getattr(stream, "dataset", None)  # what the run's manifest fingerprints
        self._state = copy.deepcopy(stream.state_dict())
        self._queue: collections.deque = collections.deque()  # (batch, state after it, futures)

    def __iter__(self) -> "ServedStream":
        return self

    def fill(self) -> None:
        while len(self._queue) < self.ahead:
            batch = next(self.stream)
            state = copy.deepcopy(self.stream.state_dict())
            self._queue.append((batch, state, self.teacher.submit(batch)))

    def upcoming(self, n: int) -> list[concurrent.futures.Future]:
        """The requests of the next ``n`` micro-batches (drawn now if they are not yet)."""
        self.fill()
        return [f for _, _, fs in list(self._queue)[:n] for f in fs]

    def __next__(self):
        self.fill()
        batch, self._state, _ = self._queue.popleft()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Drop what was drawn ahead (and its requests) and move the wrapped stream to ``state``."""
        self._queue.clear()
        self.teacher.cancel()
        self.stream.load_state_dict(state)
        self._state = copy.deepcopy(state)


# ------------------------------------------------------------------------------------------------- wiring a run
def connect(
    urls: list[str],
    tokenizer,
    vocab: int,
    *,
    k: int,
    temperature: float,
    seq_len: int,
    references: list[str] = (),
    tolerance: float = PARITY_TOLERANCE,
    timeout: float = 120.0,
    retries: int = 6,
    wait: float = 600.0,
    flag: str = "--teacher_url",
    whose: str = "the student's",
) -> list[ServedModel]:
    """Served teachers at ``urls``: ready, each checked in one line (``ServedModel.check``); ``k`` is cut to the
    vocabulary. ``references``: none, or one local copy per URL (``--teacher_reference``). ``whose``: whose tokenizer
    ``tokenizer`` is, in the messages (a teacher of another tokenizer is checked against its own)."""
    refs = list(references or [])
    if refs and len(refs) != len(urls):
        raise UsageError(
            f"--teacher_reference is given {len(refs)} times for {len(urls)} {flag}: one local copy per served "
            "teacher, in the same order"
        )
    k = min(k, vocab)
    if k < vocab and temperature != 1.0:
        raise UsageError(
            f"--temperature {temperature} with {flag} needs the teacher's whole distribution: a server's top-{k} "
            f"log-probs at temperature 1 do not fix the tail at another temperature: use --temperature 1, or top-K "
            f"{vocab} (the vocabulary) with a server started with --max-logprobs {vocab}"
        )
    servers = []
    for i, url in enumerate(urls):
        client = ServerClient(url, timeout=timeout, retries=retries, flag=flag)
        client.wait_ready(timeout=wait)
        server = ServedModel(client, k, vocab, temperature)
        server.check(tokenizer, seq_len, refs[i] if refs else "", tolerance, whose)
        log.info("%s: serving %r, top-%d per supervised token", server.name, client.model_id, k)
        servers.append(server)
    return servers


def connect_run(cfg, tokenizer, vocab: int, k: int | None = None, whose: str = "the student's") -> list[ServedModel]:
    """The ``--teacher_url``s of a run or cache config, connected and checked; ``k``: top-K asked (default the
    config's ``teacher_top_k``); ``whose``: as ``connect``."""
    return connect(
        cfg.teacher_url,
        tokenizer,
        vocab,
        k=cfg.teacher_top_k if k is None else k,
        temperature=cfg.temperature,
        seq_len=cfg.seq_len,
        references=cfg.teacher_reference,
        tolerance=cfg.teacher_reference_tolerance,
        timeout=cfg.teacher_url_timeout,
        retries=cfg.teacher_url_retries,
        wait=cfg.teacher_url_wait,
        whose=whose,
    )


def served_fingerprint(server: ServedModel) -> str:
    """What a cache records of a served teacher: its model name (the URL is where it ran, not what it is)."""
    return hashlib.sha256(f"served:{server.client.model_id}".encode()).hexdigest()


def cache_scorer(server: ServedModel, pad_token_id: int, workers: int = 4, own_tokens: bool = False) -> Callable:
    """``cache_writer.write_cache``'s ``scorer``: a shard's batches scored by ``server``, ``workers`` requests in flight
    together (each batch one request). ``sum p log p`` is exact when K covers the vocabulary, else None.
    own_tokens (``--cross_tokenizer alm``): the teacher's own ids are asked for instead, and each scored token's own
    log-prob is returned as ``(ids [n, 1], log-probs [n, 1], None, None)``, as the writer's own forward gives it."""
    from ds_distill.data import collate
    from ds_distill.data.alignment import collate_teacher

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ds_distill-cache")

    def one(part: dict[str, list]):
        if own_tokens:
            c = collate_teacher(part, 0)
            lab = c["teacher_labels"]
            seqs, where = request_sequences(c["teacher_input_ids"], lab, c.get("teacher_position_ids"))
            lp = server.fetch_own(seqs, where)
            return (lab[lab != IGNORE_INDEX][:, None], lp[:, None], None, None), (lab != IGNORE_INDEX).sum(1).tolist()
        b = collate(part, pad_token_id)
        seqs, where = request_sequences(b["input_ids"], b["labels"], b.get("position_ids"))
        ids, logp, tail = server.fetch(seqs, where)
        plogp = (logp.exp() * logp).sum(-1) if server.k >= server.vocab else None
        return (ids, logp, tail, plogp), (b["labels"] != IGNORE_INDEX).sum(1).tolist()

    def score(parts: list[dict[str, list]]) -> Iterator:
        futures = [pool.submit(one, part) for part in parts]
        try:
            for f in futures:
                yield f.result()
        finally:
            for f in futures:
                f.cancel()

    return score
