"""A teacher behind a real vLLM server (``--teacher_url``, ``cache_teacher --teacher_url``, ``generate --server_url``):
one server per test run (``tests/served_fixtures.served``), a tiny Llama whose 47-token vocabulary the top-64 covers,
so the served distribution is the whole one and every comparison with the live teacher is exact up to the server's
float32 arithmetic (measured: 4.7e-7 nats on the probe)."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from ds_distill import cache_teacher, generate, train
from ds_distill.common import UsageError
from ds_distill.config import RunConfig, parse_args
from ds_distill.core.checkpoint import read_latest, tag_for
from ds_distill.ds_config import REPO_CONFIGS
from ds_distill.extras.preemption import PREEMPTED_EXIT_CODE
from ds_distill.teachers import cache_format
from ds_distill.teachers import served as served_mod
from ds_distill.teachers.ensemble import MixedTeachers
from ds_distill.teachers.server_client import ServerClient, ServerUnavailable
from tests.helpers import ds_json, losses_of, make_cfg

pytestmark = pytest.mark.vllm

REPLICATED = str(REPO_CONFIGS / "cpu_teacher_replicated.json")
AGREEMENT = dict(rel=2e-5, abs=1e-6)  # server float32 vs the live teacher's float32, through 2-3 AdamW steps


def cfg(served, tmp_path, out: str, **kw) -> RunConfig:
    """``make_cfg``'s run on the served pair: no teacher unless one is named, the replicated teacher JSON, 48 tokens,
    an evaluation of 2 batches."""
    base = dict(teacher=[], deepspeed_config=ds_json(tmp_path), teacher_deepspeed_config=REPLICATED, seq_len=48)
    base.update(eval_fraction=0.1, eval_batches=2)
    return make_cfg(served, tmp_path / out, **{**base, **kw})


def run(c: RunConfig):
    return train.run(c, train.default_callbacks(c))


# ---------------------------------------------------------------------------------------------- connect checks
def test_connect_checks_refuse_in_one_line(served, tmp_path):
    from tests import tiny

    client = ServerClient(served["url"])
    tok = served["tokenizer"]

    def refused(fn) -> str:
        with pytest.raises(UsageError) as exc:
            fn()
        assert "\n" not in str(exc.value)
        return str(exc.value)

    # the real teacher passes every check, the parity probe too
    served_mod.ServedModel(client, 47, 47, 1.0).check(tok, 48, served["teacher"])
    other_tok = tiny.make_tokenizer(tmp_path / "bpe")
    assert "tokenizes the probe text" in refused(
        lambda: served_mod.ServedModel(client, 47, 47, 1.0).check(other_tok, 48)
    )
    assert "--max-logprobs 65" in refused(lambda: served_mod.ServedModel(client, 65, 1000, 1.0).check(tok, 48))
    assert "outside the student's vocabulary of 10" in refused(
        lambda: served_mod.ServedModel(client, 10, 10, 1.0).check(tok, 48)
    )
    assert "differ from --teacher_reference" in refused(
        lambda: served_mod.ServedModel(client, 47, 47, 1.0).check(tok, 48, served["student"])
    )
    assert "max_model_len 256, below --seq_len 300" in refused(
        lambda: served_mod.ServedModel(client, 47, 47, 1.0).check(tok, 300)
    )
    # through the run config: K below the vocabulary at another temperature; a URL where nothing listens
    c = cfg(served, tmp_path, "t", teacher_url=[served["url"]], teacher_top_k=16, temperature=2.0)
    assert "do not fix the tail" in refused(lambda: served_mod.connect_run(c, tok, 47))
    dead = cfg(served, tmp_path, "d", teacher_url=["http://127.0.0.1:9"], teacher_url_wait=1.0)
    assert "no server became ready in 1 s" in refused(lambda: served_mod.connect_run(dead, tok, 47))


# ------------------------------------------------------------------------------------------- served vs live
@pytest.mark.parametrize("loss,temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0)])
def test_served_teacher_trains_like_the_live_teacher(served, dist_env, tmp_path, loss, temperature):
    """K = vocabulary: the served loss is the live loss (train, eval, grad norm) at every step; at T = 2 the served
    log-probs are rescaled exactly."""
    kw = dict(loss=loss, temperature=temperature)
    live = run(cfg(served, tmp_path, "live", teacher=[served["teacher"]], **kw))
    srv = run(cfg(served, tmp_path, "served", teacher_url=[served["url"]], teacher_reference=[served["teacher"]], **kw))
    assert isinstance(srv.teachers, served_mod.ServedTeacher)
    a = losses_of(live)
    assert len(a) == 3 and abs(a[0] - a[-1]) > 1e-3, "the steps must move the loss"
    for key in ("Train/loss", "Train/kd", "Train/grad_norm", "Eval/kd"):
        assert losses_of(srv, key) == pytest.approx(losses_of(live, key), **AGREEMENT), key


def test_a_live_and_a_served_teacher_train_like_the_live_ensemble(served, dist_env, tmp_path):
    """An ensemble across sources: --teacher B --teacher_url (A) with --teacher_weights 0.3 0.7 trains like the live
    ensemble [B, A] with those weights (K = vocabulary: the served member is full, so the mixture is the live one's;
    ensemble.mix), train and eval; two different teachers, so the weights' order counts."""
    from tests import tiny

    other = tiny.make_model(tmp_path / "other", served["tokenizer"], layers=2, hidden=64, heads=2, seed=3)
    kw = dict(teacher_weights=[0.3, 0.7])
    live = run(cfg(served, tmp_path, "live", teacher=[other, served["teacher"]], **kw))
    mixed = run(cfg(served, tmp_path, "mixed", teacher=[other], teacher_url=[served["url"]], **kw))
    assert isinstance(mixed.teachers, MixedTeachers)
    a = losses_of(live)
    assert len(a) == 3 and abs(a[0] - a[-1]) > 1e-3, "the steps must move the loss"
    for key in ("Train/loss", "Train/kd", "Train/grad_norm", "Eval/kd"):
        assert losses_of(mixed, key) == pytest.approx(losses_of(live, key), **AGREEMENT), key


def test_alm_against_a_served_teacher_of_another_tokenizer_trains_like_the_live_one(served, tiny, dist_env, tmp_path):
    """--cross_tokenizer alm with --teacher_url: a student with the tiny byte-level BPE tokenizer against the served
    character-level teacher; the server's log-prob of each of the teacher's own tokens are ALM's targets, so the run
    equals the live ALM run with the same teacher (train and eval, grad norms, the alignment report). A
    --teacher_tokenizer that is not the server's stops in one line."""
    from ds_distill.teachers.live import AlignmentReport

    kw = dict(student=tiny["student"], cross_tokenizer="alm")
    live = run(cfg(served, tmp_path, "live", teacher=[served["teacher"]], **kw))
    srv = run(cfg(served, tmp_path, "served", teacher_url=[served["url"]], teacher_tokenizer=served["teacher"], **kw))
    assert isinstance(srv.teachers, served_mod.ServedCrossTokenizerTeacher)
    a = losses_of(live)
    assert len(a) == 3 and abs(a[0] - a[-1]) > 1e-3 and min(losses_of(live, "Train/kd")) > 0
    for key in ("Train/loss", "Train/kd", "Train/grad_norm", "Eval/kd"):
        assert losses_of(srv, key) == pytest.approx(losses_of(live, key), **AGREEMENT), key
    report = lambda t: next(cb for cb in t.callbacks if isinstance(cb, AlignmentReport)).history
    assert report(srv) == report(live) and len(report(live)) == 3
    wrong = cfg(served, tmp_path, "w", teacher_url=[served["url"]], teacher_tokenizer=tiny["student"], **kw)
    with pytest.raises(UsageError, match="into .* ids, --teacher_tokenizer's tokenizer into") as exc:
        train.run(wrong)
    assert "\n" not in str(exc.value)


def test_alm_cache_written_from_the_server_holds_the_local_teachers_log_probs(served, tiny, dist_env, tmp_path):
    """cache_teacher --teacher_url --cross_tokenizer alm: the served teacher's log-prob of each of its own scored
    tokens, the same rows (ids, and log-probs within the server's float32 agreement) as the cache of the local copy;
    the same alignment (data fingerprints) and teacher tokenizer."""
    from ds_distill.teachers.cache_reader import TeacherCache

    common = ["--tokenizer", tiny["student"], "--cross_tokenizer", "alm", "--data", served["data"], "--seq_len", "48"]
    common += ["--shard_examples", "24", "--batch_size", "4"]
    write = lambda out, *src: cache_teacher.run(
        parse_args([*src, *common, "--output_dir", str(tmp_path / out)], cache_teacher.CacheConfig)
    )
    local = write("local", "--teacher", served["teacher"], "--teacher_deepspeed_config", REPLICATED)
    remote = write("remote", "--teacher_url", served["url"], "--teacher_tokenizer", served["teacher"])
    for key in ("splits", "teacher_tokenizer_fingerprint", "tokenizer_fingerprint", "top_k"):
        assert remote["settings"][key] == local["settings"][key], key
    a, b = TeacherCache(str(tmp_path / "local")), TeacherCache(str(tmp_path / "remote"))
    rows = list(range(local["settings"]["splits"]["data"]["examples"]))
    (ids_a, lp_a, _, n_a), (ids_b, lp_b, _, n_b) = a.read("data", rows), b.read("data", rows)
    assert n_a == n_b and torch.equal(ids_a, ids_b) and sum(n_a) > 500
    torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=1e-5)


def test_cache_written_from_the_server_trains_like_the_local_teachers_cache(served, dist_env, tmp_path):
    common = ["--data", served["data"], "--seq_len", "48", "--shard_examples", "24", "--batch_size", "4", "--exact"]
    local = cache_teacher.run(
        parse_args(
            [
                "--teacher",
                served["teacher"],
                "--output_dir",
                str(tmp_path / "local"),
                "--teacher_deepspeed_config",
                REPLICATED,
                *common,
            ],
            cache_teacher.CacheConfig,
        )
    )
    remote = cache_teacher.run(
        parse_args(
            [
                "--teacher_url",
                served["url"],
                "--tokenizer",
                served["student"],
                "--output_dir",
                str(tmp_path / "remote"),
                *common,
            ],
            cache_teacher.CacheConfig,
        )
    )
    assert remote["settings"]["teacher_fingerprint"] != local["settings"]["teacher_fingerprint"]
    assert remote["info"]["served_model"] == ServerClient(served["url"]).model_id
    assert remote["info"]["teacher_url"] == served["url"]
    assert remote["stats"]["tokens"] == local["stats"]["tokens"]
    runs = {
        name: run(cfg(served, tmp_path, f"train-{name}", teacher_cache=[str(tmp_path / name)], eval_fraction=0.0))
        for name in ("local", "remote")
    }
    for key in ("Train/loss", "Train/grad_norm"):
        assert losses_of(runs["remote"], key) == pytest.approx(losses_of(runs["local"], key), **AGREEMENT), key


# ------------------------------------------------------------------------------------------------- faults
class FaultyProxy:
    """A local HTTP proxy in front of the real server: requests to /v1/completions after the first ``healthy`` are
    answered by the next fault of ``faults`` ("503", "stall": no answer for ``stall`` seconds, "drop": the connection
    closed unanswered), then passed through; ``down = True`` answers every completions request 503."""

    def __init__(self, upstream: str, stall: float = 4.0):
        self.upstream, self.stall = upstream, stall
        self.faults: list[str] = []
        self.healthy, self.seen, self.down = 0, 0, False
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self, body: bytes | None):
                fault = None
                if self.path.startswith("/v1/completions"):
                    with proxy.lock:
                        proxy.seen += 1
                        if proxy.down:
                            fault = "503"
                        elif proxy.seen > proxy.healthy and proxy.faults:
                            fault = proxy.faults.pop(0)
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall)
                req = urllib.request.Request(
                    proxy.upstream + self.path,
                    data=body,
                    method=self.command,
                    headers={"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=300) as resp:
                        status, data = resp.status, resp.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(served):
    p = FaultyProxy(served["url"])
    yield p
    p.close()


def test_faults_are_retried_or_stop_at_a_checkpoint_and_resume_the_same_curve(served, dist_env, tmp_path, proxy):
    fast = dict(teacher_url_timeout=2.0, teacher_url_retries=2, save_steps=1, max_steps=4, eval_fraction=0.0)
    # The reference talks to the server directly: a first request to a freshly started server may take tens of seconds.
    ref = run(cfg(served, tmp_path, "ref", teacher_url=[served["url"]], **{**fast, "teacher_url_timeout": 120.0}))
    # 503s, a stall beyond the timeout and a dropped connection: retried, the curve is the reference's
    proxy.healthy, proxy.faults = 1, ["503", "stall", "drop", "503"]
    retried = run(  # behind a prefetcher, with per-example tracking (they read the stream's position through ours)
        cfg(
            served,
            tmp_path,
            "retried",
            teacher_url=[proxy.url],
            prefetch_batches=2,
            track_examples=True,
            # Requests drawn ahead run concurrently, so two faults can fall on one request: retries to spare.
            **{**fast, "teacher_url_retries": 5},
        )
    )
    assert proxy.faults == [] and retried.exit_code == 0
    assert losses_of(retried) == pytest.approx(losses_of(ref), rel=1e-6, abs=1e-7)
    # down for longer than the retries: the run saves its last finished step and exits 75; --resume continues
    # the probe and the first two micro-batches pass (one per step, drawn two ahead); the third's request fails
    proxy.seen, proxy.healthy = 0, 1 + 2
    proxy.faults = ["503"] * 1000
    out = "stopped"
    stopped = run(cfg(served, tmp_path, out, teacher_url=[proxy.url], **fast))
    assert stopped.exit_code == PREEMPTED_EXIT_CODE and stopped.step == 2
    assert read_latest(tmp_path / out / "checkpoints") == tag_for(2)
    proxy.faults = []
    resumed = run(cfg(served, tmp_path, out, teacher_url=[proxy.url], resume=True, **fast))
    assert resumed.exit_code == 0 and resumed.step == 4
    assert losses_of(stopped) + losses_of(resumed) == pytest.approx(losses_of(ref), rel=1e-6, abs=1e-7)


def test_a_run_that_fails_closes_its_server_clients(served, dist_env, tmp_path, monkeypatch):
    """An error at a checkpoint ends the run; its server clients are closed with it (``ServedGuard.on_exit``), so
    requests drawn ahead stop retrying and the pool's threads are joined, not left to the process's exit."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    closed = []
    monkeypatch.setattr(ServerClient, "close", lambda self: closed.append(self.url) or self._closed.set())

    def failing_save(self, *a, **kw):
        raise RuntimeError("the checkpoint failed")

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", failing_save)
    c = cfg(served, tmp_path, "f", teacher_url=[served["url"]], max_steps=2, save_steps=1, eval_fraction=0.0)
    with pytest.raises(RuntimeError, match="the checkpoint failed"):
        run(c)
    assert closed == [served["url"].rstrip("/")]


def test_cache_from_a_dead_server_exits_75_and_the_same_command_finishes_it(served, dist_env, tmp_path, proxy, capsys):
    args = ["--teacher_url", proxy.url, "--tokenizer", served["student"], "--data", served["data"], "--seq_len", "48"]
    args += [
        "--shard_examples",
        "16",
        "--batch_size",
        "4",
        "--output_dir",
        str(tmp_path / "c"),
        "--teacher_url_retries",
        "1",
    ]
    proxy.healthy, proxy.faults = 1 + 4, ["503"] * 1000  # the probe and the first shard's 4 requests pass
    assert cache_teacher.main(args) == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --teacher_url") and "run the same command again" in err
    done = sorted(p.name for p in (tmp_path / "c" / "shards").glob("*.json"))
    assert done == [f"{cache_format.shard_name('data', 0)}.json"]  # the finished shard is kept
    proxy.faults = []
    assert cache_teacher.main(args) == 0


# ----------------------------------------------------------------------------------------------- sampling
def test_generate_from_the_server_is_seeded_and_resumable(served, dist_env, tmp_path):
    def gen(out: Path, seed: int = 3) -> list[dict]:
        generate.generate(
            generate.parse_args(
                [
                    "--model",
                    served["student"],
                    "--server_url",
                    served["url"],
                    "--data",
                    served["prompts"],
                    "--output",
                    str(out),
                    "--max_new_tokens",
                    "12",
                    "--seed",
                    str(seed),
                    "--batch_size",
                    "2",
                ]
            )
        )
        return [json.loads(line) for line in out.read_text().splitlines()]

    first = gen(tmp_path / "a.jsonl")
    assert [r["id"] for r in first] == [f"p{i}" for i in range(6)] and all(r["completion"] for r in first)
    assert gen(tmp_path / "b.jsonl") == first  # seeded per prompt: the same records
    assert gen(tmp_path / "c.jsonl", seed=4) != first
    # resumable: records already written are kept, the missing ones are sampled again, identically
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first[:3]))
    assert gen(tmp_path / "d.jsonl") == first
    # the completions are the served model's samples: its own ids decode to them
    tok = served["tokenizer"]
    ids = ServerClient(served["url"]).sample(
        [tok(first[0]["prompt"])["input_ids"]],
        max_tokens=12,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=generate_seed(3, 0),
    )[0]
    assert tok.decode([i for i in ids if i != tok.eos_token_id]) == first[0]["completion"]


def generate_seed(seed: int, row: int) -> int:
    from ds_distill import on_policy

    return on_policy.mix_seed(seed, row)


def test_a_closed_client_stops_retrying_at_once():
    """A run that ends closes its clients: a request in its backoff (here 30 s) gives up within a second."""

    class Down(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.HTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = ServerClient(f"http://127.0.0.1:{server.server_address[1]}", retries=3, backoff=30.0)
    try:
        threading.Timer(0.5, client.close).start()
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match="closed"):
            client.request("POST", "/v1/completions", {})
        assert time.monotonic() - start < 5
    finally:
        server.shutdown()
        server.server_close()


def test_request_sequences_follow_documents_and_labels():
    ids = torch.tensor([[1, 5, 6, 7, 0, 0], [1, 8, 9, 1, 4, 0]])
    labels = torch.tensor([[-100, 6, 7, -100, -100, -100], [8, 9, -100, -100, -100, -100]])
    seqs, where = served_mod.request_sequences(ids, labels)
    assert seqs == [[1, 5, 6, 7], [1, 8, 9]] and where == [(0, 2), (0, 3), (1, 1), (1, 2)]
    # packed: each document its own sequence
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    lab = torch.tensor([[5, 6, -100, 8, 9, -100]])
    seqs, where = served_mod.request_sequences(torch.tensor([[1, 5, 6, 1, 8, 9]]), lab, pos)
    assert seqs == [[1, 5, 6], [1, 8, 9]] and where == [(0, 1), (0, 2), (1, 1), (1, 2)]
    with pytest.raises(ValueError, match="is not input_ids"):
        served_mod.request_sequences(ids, torch.tensor([[-100, 7, 7, -100, -100, -100], [-100] * 6]))


@pytest.mark.multiprocess
def test_two_ranks_sharing_one_server_equal_one_rank(served, dist_env, tmp_path):
    """2 ranks x micro-batch 2, each sending its own requests to the one server, train like 1 rank x 2 micro-batches
    (the same examples per step, the loss divided by the same global token count)."""
    from ds_distill.plot import read_curves
    from tests.helpers import flags
    from tests.launch import deepspeed

    steps = dict(max_steps=3, seq_len=48, log_steps=1, eval_fraction=0.0, export="false", chunk_size=16, seed=0)
    args = flags(
        teacher_url=served["url"],
        student=served["student"],
        data=served["data"],
        output_dir=tmp_path / "two",
        deepspeed_config=ds_json(tmp_path),
        **steps,
    )
    proc = deepspeed("ds_distill.train", args, ranks=2)
    assert proc.returncode == 0, proc.stdout[-6000:]
    two = [v for _, v in read_curves(tmp_path / "two")["Train/loss"]]
    one = run(
        cfg(
            served,
            tmp_path,
            "one",
            teacher_url=[served["url"]],
            deepspeed_config=ds_json(tmp_path, gradient_accumulation_steps=2),
            max_steps=3,
            eval_fraction=0.0,
        )
    )
    assert len(two) == 3 and two == pytest.approx(losses_of(one), rel=1e-5, abs=1e-6)
