"""Teacher caches (issue 16): the sparse loss against float64 and against the live-teacher loss, the coding, training
from an exact cache against the live teacher, resume after a killed writer, bytes/token at K = 64, mismatches, ranks."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ds_distill import cache_teacher, losses, train
from ds_distill.config import parse_args
from ds_distill.ds_config import REPO_CONFIGS
from ds_distill.teachers import cache_format, cache_reader, cache_writer, ensemble
from tests.helpers import flags
from tests.launch import deepspeed

REPLICATED = str(REPO_CONFIGS / "cpu_teacher_replicated.json")


# ------------------------------------------------------------------------------------------------ the loss, pure
def _reference(s_logits, t_logits, k, loss, temperature, beta=0.5, skew=0.1):
    """float64: the teacher's top-k ids, both models' K+1 bucket distributions, then the divergence by its formula."""
    s, t = s_logits.double() / temperature, t_logits.double() / temperature
    tp, sp = t.softmax(-1), s.softmax(-1)
    ids = tp.topk(k, dim=-1).indices
    tb = torch.cat([tp.gather(-1, ids), 1 - tp.gather(-1, ids).sum(-1, keepdim=True)], -1)
    sb = torch.cat([sp.gather(-1, ids), 1 - sp.gather(-1, ids).sum(-1, keepdim=True)], -1)
    kl = lambda p, q: (p * (p / q).log()).sum(-1)
    mix = lambda p, q, w: w * p + (1 - w) * q
    d = {
        "forward_kl": lambda: kl(tb, sb),
        "reverse_kl": lambda: kl(sb, tb),
        "jsd": lambda: beta * kl(tb, mix(tb, sb, beta)) + (1 - beta) * kl(sb, mix(tb, sb, beta)),
        "skew_forward_kl": lambda: kl(tb, mix(tb, sb, skew)),
        "skew_reverse_kl": lambda: kl(sb, mix(sb, tb, skew)),
        "tvd": lambda: 0.5 * (tb - sb).abs().sum(-1),
        "entropy_aware_kl": lambda: (lambda w: w * kl(tb, sb) + (1 - w) * kl(sb, tb))(
            (-(tb * tb.log()).sum(-1) / 3.0).clamp(max=1.0)  # the K + 1 buckets' entropy, default threshold 3 nats
        ),
    }[loss]()
    return temperature**2 * d


def _sparse_inputs(t_logits, k, temperature):
    ids, logp, tail, _ = cache_format.top_k(t_logits, k, temperature)
    return ids, logp, tail


@pytest.mark.parametrize("temp", [2.0, 1.0])  # T = 1: the CE reads the KD term's log-softmax (issue 29)
@pytest.mark.parametrize("loss", sorted(losses.LOSSES))
def test_sparse_loss_matches_float64_and_the_live_loss(loss, temp):
    torch.manual_seed(0)
    B, T, V, H, K = 2, 5, 13, 6, 4
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    t_logits = torch.randn(B, T, V) * 3
    s_logits = torch.randn(B, T, V, requires_grad=True)
    sup = labels != -100
    kw = dict(loss=loss, alpha=0.3, temperature=temp)
    # K < V: the K + 1 buckets against float64
    ids, logp, tail = _sparse_inputs(t_logits[sup], K, temp)
    got = losses.sparse_loss_sums(s_logits, ids, logp, tail, labels, **kw)
    ref_kd = _reference(s_logits[sup].detach(), t_logits[sup], K, loss, temp)
    assert got.kd.item() == pytest.approx(ref_kd.sum().item(), rel=1e-5, abs=1e-6)
    # chunked (the head called per chunk) == unchunked, values and gradients
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, requires_grad=True)
    full = losses.sparse_loss_sums(head(hidden), ids, logp, tail, labels, **kw)
    g_full = torch.autograd.grad(full.total, [hidden, head.weight])
    chunked = losses.chunked_sparse_loss_sums(hidden, head, ids, logp, tail, labels, chunk_size=3, num_chunks=4, **kw)
    g_chunked = torch.autograd.grad(chunked.total, [hidden, head.weight])
    assert chunked.total.item() == pytest.approx(full.total.item(), rel=1e-6)
    for a, b in zip(g_full, g_chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # K = V, unquantised: the live-teacher loss, values and gradients
    ids, logp, tail = _sparse_inputs(t_logits[sup], V, temp)
    sparse = losses.sparse_loss_sums(s_logits, ids, logp, tail, labels, **kw)
    live = losses.loss_sums(s_logits, t_logits, labels, **kw)
    assert sparse.total.item() == pytest.approx(live.total.item(), rel=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(sparse.total, s_logits)[0],
        torch.autograd.grad(live.total, s_logits)[0],
        rtol=1e-5,
        atol=1e-7,
    )


# ------------------------------------------------------------------------------------------------------ coding
def test_coding_round_trips_and_quantisation_error_is_bounded():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**21 - 1])
    assert cache_format.varint_decode(cache_format.varint_encode(values)).tolist() == values.tolist()
    assert len(cache_format.varint_encode(values)) == 1 + 1 + 1 + 2 + 2 + 3 + 3
    torch.manual_seed(0)
    t = torch.randn(50, 300) * 4
    ids, logp, tail, plogp = cache_format.top_k(t, 64, 1.0)
    full = F.log_softmax(t, -1)
    assert (ids.diff(dim=1) > 0).all()
    assert torch.equal(torch.from_numpy(cache_format.decode_ids(cache_format.encode_ids(ids.numpy()), 64)), ids)
    rank = np.random.default_rng(0).permutation(300).astype(np.int32)  # any coding order
    row = cache_format.encode_example(ids, logp, tail, exact=False, rank=rank)
    d_ids, d_logp, d_tail = cache_format.decode_example(row, 64, exact=False, order=np.argsort(rank))
    assert torch.equal(d_ids.sort(dim=1).values, ids) and not torch.equal(d_ids, ids)
    total = torch.logsumexp(torch.cat([d_logp, d_tail[:, None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros(50), atol=1e-5, rtol=0)  # a distribution again
    # sqrt(p / p_top) rounds to half a level, sqrt(tail mass) to half a tail level; the absolute level follows from both
    true = full.gather(1, d_ids)
    u = lambda lp: torch.exp(0.5 * (lp - lp.max(-1, keepdim=True).values))
    assert ((u(d_logp) - u(true)).abs() * cache_format.LEVELS)[u(true) * cache_format.LEVELS >= 1].max() <= 0.5 + 1e-4
    assert ((d_tail / 2).exp() - (tail / 2).exp()).abs().max() * cache_format.TAIL_LEVELS <= 0.5 + 1e-4
    kl_full, kl_b = cache_format.reconstruction_kl(plogp, 300, true, tail, d_logp, d_tail)
    for kl in (kl_full, kl_b):  # the p99 the cache reports, from its histogram: the true one, at most a bin (4.7%) high
        p99 = cache_format.kl_quantile([cache_format.kl_histogram(kl)], 0.99)
        assert (
            np.quantile(kl.numpy(), 0.99, method="inverted_cdf")
            <= p99
            <= 1.05 * np.quantile(kl.numpy(), 0.99, method="inverted_cdf")
        )
    assert (kl_b >= -1e-6).all() and (kl_b < 1e-2).all() and (kl_full >= kl_b - 1e-6).all()
    e_ids, e_logp, e_tail = cache_format.decode_example(
        cache_format.encode_example(*cache_format.top_k(t, 300, 1.0)[:3], exact=True), 300, exact=True
    )
    assert torch.equal(e_logp, F.log_softmax(t, -1)) and torch.equal(e_ids, torch.arange(300).expand(50, -1))


def test_top_k_in_row_blocks_equals_one_call_on_all_rows():
    """top_k works TOP_K_ROWS rows at a time: the same values, bit for bit, as the formulas on all rows at once."""
    torch.manual_seed(0)
    t = torch.randn(2 * cache_format.TOP_K_ROWS + 5, 300) * 4
    for temperature in (1.0, 2.0):
        full = F.log_softmax(t / temperature, -1)
        ids, logp, tail, plogp = cache_format.top_k(t, 64, temperature)
        assert torch.equal(ids, full.topk(64, -1).indices.sort(-1).values)
        assert torch.equal(logp, full.gather(1, ids))
        assert torch.equal(tail, torch.logsumexp(full.scatter(1, ids, -math.inf), -1))
        assert torch.equal(plogp, (full.exp() * full).sum(-1))
    assert [tuple(x.shape) for x in cache_format.top_k(t[:0], 64, 1.0)] == [(0, 64), (0, 64), (0,), (0,)]


# ------------------------------------------------------------------------------------------- writing and training
def write(tiny, out, *extra, on_shard=None):
    args = [
        "--teacher",
        tiny["teacher"],
        "--data",
        tiny["data"],
        "--output_dir",
        str(out),
        "--seq_len",
        "32",
        "--shard_examples",
        "24",
        "--batch_size",
        "4",
        "--teacher_deepspeed_config",
        REPLICATED,
        *extra,
    ]
    return cache_teacher.run(parse_args(args, cache_teacher.CacheConfig), on_shard=on_shard)


@pytest.fixture(scope="module")
def k64(tiny, tmp_path_factory):
    """A K = 64 cache of the tiny data, written in one go by one rank."""
    from ds_distill.runtime import distributed

    distributed.init_distributed()
    out = tmp_path_factory.mktemp("k64") / "cache"
    return out, write(tiny, out, "--top_k", "64")


def test_bytes_per_token_at_k64_and_resume_after_a_kill(tiny, dist_env, tmp_path, k64, capsys):
    reference_dir, reference = k64
    stats = reference["stats"]
    print(
        f"\nK=64 on the tiny data: {stats['bytes_per_token']:.1f} bytes/token {stats['column_bytes_per_token']}, "
        f"KL {stats['kl_full_per_token']:.3g} p99 {stats['kl_full_p99']:.3g} (buckets "
        f"{stats['kl_buckets_per_token']:.3g} "
        f"p99 {stats['kl_buckets_p99']:.3g}) nats/token"
    )
    assert stats["tokens"] > 500 and stats["bytes_per_token"] <= 100
    assert (
        0 < stats["kl_buckets_per_token"] <= stats["kl_buckets_p99"] * 1.05
        and stats["kl_full_per_token"] <= stats["kl_full_p99"] * 1.05
    )
    assert stats["bytes_per_token"] == pytest.approx(
        sum(p.stat().st_size for p in (reference_dir / "shards").glob("*.parquet")) / stats["tokens"]
    )

    class Killed(Exception):
        pass

    def kill_after_first(side):
        raise Killed(side["name"])

    out = tmp_path / "cache"
    with pytest.raises(Killed):
        write(tiny, out, "--top_k", "64", on_shard=kill_after_first)
    first = out / "shards" / "data-00000.parquet"
    assert first.is_file() and not json.loads((out / "manifest.json").read_text())["complete"]
    before = first.stat().st_mtime_ns
    (out / "shards" / "data-00001.parquet.tmp").write_bytes(b"half a shard")  # the writer died mid-file
    (out / "shards" / "data-00002.parquet").write_bytes(b"renamed, sidecar never written")
    capsys.readouterr()
    resumed = write(tiny, out, "--top_k", "64")
    assert "bytes/token" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == before, "a finished shard is never rewritten"
    assert [s["sha256"] for s in resumed["shards"]["data"]] == [s["sha256"] for s in reference["shards"]["data"]]
    assert not list((out / "shards").glob("*.tmp"))


def test_reported_error_is_that_of_the_stored_rows_against_the_teacher(tiny, k64):
    """The manifest's reconstruction KL (mean and p99, full and on the K + 1 buckets) against float64 from the teacher's
    own forward and the rows read back: it must measure what was stored (not the unquantised top-K) at the right ids."""
    from transformers import AutoModelForCausalLM

    from ds_distill import data, models

    root, manifest = k64
    cache = cache_reader.TeacherCache(str(root))
    tok = models.load_tokenizer(tiny["teacher"])
    ds = data.get_dataset(tiny["data"], tok, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).eval()
    vocab, k = len(tok), cache.k
    batch = data.collate(ds[:], tok.pad_token_id)  # right-padded: the tokens' logits are those of each example alone
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p = logits[batch["labels"] != -100, :vocab].double().log_softmax(-1)  # the examples' supervised tokens, in order
    ids, logp, tail, _ = cache.read("data", ds["row"])
    q = (tail.double() - math.log(vocab - k))[:, None].expand(-1, vocab).scatter(1, ids, logp.double())
    kl_full = (p.exp() * (p - q)).sum(-1)
    pb = torch.cat([p.gather(1, ids), torch.logsumexp(p.scatter(1, ids, -math.inf), -1, keepdim=True)], 1)
    qb = torch.cat([logp.double(), tail.double()[:, None]], 1)
    kl_buckets = (pb.exp() * (pb - qb)).sum(-1)
    stats = manifest["stats"]
    for name, kl in (("kl_full", kl_full), ("kl_buckets", kl_buckets)):
        assert stats[f"{name}_per_token"] == pytest.approx(kl.mean().item(), rel=1e-3), name
        p99 = np.quantile(kl.numpy(), 0.99, method="inverted_cdf")
        assert p99 * (1 - 1e-3) <= stats[f"{name}_p99"] <= 1.05 * p99 * (1 + 1e-3), name
    assert stats["kl_buckets_per_token"] > 1e-5  # the quantisation's own error: 0 if the unquantised rows were measured


def student_args(tiny, ds_config: str, **more) -> list[str]:
    """The student side of a cached-vs-live comparison (the teacher or its cache is added): 2 steps, a 10% eval
    split, the teacher replicated; ``ds_config`` one of the shipped student configs."""
    return flags(
        student=tiny["student"],
        data=tiny["data"],
        max_steps=2,
        seq_len=32,
        log_steps=1,
        eval_fraction=0.1,
        chunk_size=16,
        export="false",
        seed=0,
        deepspeed_config=REPO_CONFIGS / ds_config,
        teacher_deepspeed_config=REPLICATED,
        **more,
    )


def test_exact_cache_trains_like_the_live_teacher(tiny, dist_env, tmp_path):
    """K = vocabulary, float32: the same loss curve (train and eval) and the same per-example tracking."""
    write(tiny, tmp_path / "exact", "--exact")
    base = student_args(tiny, "cpu_zero3.json", track_examples=True)
    run = lambda cfg: train.run(cfg, train.default_callbacks(cfg))
    live = run(parse_args(base + ["--teacher", tiny["teacher"], "--output_dir", str(tmp_path / "live")]))
    cached = run(
        parse_args(base + ["--teacher_cache", str(tmp_path / "exact"), "--output_dir", str(tmp_path / "cached")])
    )
    for key in ("Train/loss", "Train/kd", "Eval/kd", "Train/grad_norm"):
        a, b = [h[key] for h in live.history if key in h], [h[key] for h in cached.history if key in h]
        assert a and a == pytest.approx(b, rel=1e-5, abs=1e-7), key
    assert cached.teachers.__class__.__name__ == "CachedTeacher"
    rows = lambda d: [(r["example_id"], round(float(r["kd"]), 4)) for r in csv.DictReader(open(d / "examples.csv"))]
    assert rows(tmp_path / "live") == rows(tmp_path / "cached") and rows(tmp_path / "live")


def test_mismatches_stop_in_one_line(tiny, dist_env, tmp_path, k64, capsys, keep_process_group):
    from tests import tiny as tiny_mod

    cache = str(k64[0])
    other_tok = tiny_mod.make_tokenizer(tmp_path / "tok2", vocab_size=300)
    other_student = tiny_mod.make_model(tmp_path / "other", other_tok, layers=1, hidden=16, heads=2)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(Path(tiny["data"]).read_text().replace("fox", "cat"))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    manifest = json.loads((k64[0] / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    old_format = tmp_path / "v1"
    old_format.mkdir()
    (old_format / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    base = {
        "--student": tiny["student"],
        "--data": tiny["data"],
        "--output_dir": str(tmp_path / "o"),
        "--teacher_cache": cache,
        "--max_steps": "1",
        "--seq_len": "32",
        "--eval_fraction": "0",
    }
    cases = [
        ({"--seq_len": "24"}, [], "was written with --seq_len 32 but this run has --seq_len 24"),
        ({}, ["--packing"], "was written with --packing False but this run has --packing True"),
        ({"--temperature": "2"}, [], "holds log-probs at temperature 1.0 but this run has --temperature 2.0"),
        ({"--student": other_student}, [], "was written with another tokenizer"),
        ({"--data": str(changed)}, [], "was written from other --data tokens"),
        ({"--eval_data": tiny["data"]}, [], "holds no eval_data split"),
        (
            {},
            ["--teacher_weights", "1", "--teacher_weights", "2", "--teacher_weights", "3"],
            "--teacher_weights has 3 values for 1 teachers (--teacher 0, then --teacher_cache 1",
        ),
        ({"--temperature": "2"}, ["--router", "lowest_ce"], "--router lowest_ce scores labels at temperature 1"),
        (
            {"--teacher": tiny["teacher"]},
            ["--teacher_weights", "1"],
            "--teacher_weights has 1 values for 2 teachers (--teacher 1, then --teacher_cache 1",
        ),
        ({"--teacher_cache": str(incomplete)}, [], "is incomplete"),
        ({"--teacher_cache": str(old_format)}, [], "has format version 1, this ds-distill reads 2: rewrite the cache"),
        ({"--on_policy_fraction": "0.5"}, [], "a teacher cache cannot score"),
    ]
    for replace, extra, message in cases:
        args = [x for k, v in {**base, **replace}.items() for x in (k, v)] + extra
        code = train.main(args)
        errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (replace, extra, errors)


def test_per_turn_chat_examples_are_refused_in_one_line(tmp_path):
    """A conversation split into one example per assistant turn (a template that rewrites history) gives several
    examples with one row number, the key a cache is read by: refused before the teacher loads."""
    from ds_distill.common import UsageError
    from tests import tiny as tiny_mod
    from tests.helpers import CONV

    tok = tiny_mod.make_qwen_tokenizer(tmp_path / "qwen")
    teacher = tiny_mod.make_model(tmp_path / "teacher", tok, layers=1, hidden=16, heads=2)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CONV}) + "\n")
    with pytest.raises(UsageError, match="one example per assistant turn.*train with --teacher"):
        write({"teacher": teacher, "data": str(chat)}, tmp_path / "cache", "--seq_len", "256")


# ---------------------------------------------------------------------------------------------- ensembles of caches
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_mixed_caches_match_float64_buckets(loss):
    """Two caches with different K: the union of their supports plus one bucket, each cache's tail spread uniformly
    over the ids outside its top-K, mixed with per-token weights; against float64 from the full distributions."""
    torch.manual_seed(0)
    n, V, T = 7, 11, 1.5
    t = [torch.randn(n, V) * 3, torch.randn(n, V) * 3]
    t[1][:3] = t[0][:3] + 0.1 * torch.randn(3, V)  # close teachers on 3 tokens: smaller unions there, padded rows
    ks = [3, 5]
    s_logits = torch.randn(1, n, V, requires_grad=True)
    labels = torch.randint(0, V, (1, n))
    w = torch.rand(n, 2)
    w = w / w.sum(1, keepdim=True)
    parts = [_sparse_inputs(x, k, T) for x, k in zip(t, ks)]
    mixed = ensemble.mix(parts, w, V)
    assert (mixed[0] < 0).any() and (mixed[0] >= 0).sum(1).min() < mixed[0].shape[1]
    got = losses.sparse_loss_sums(s_logits, *mixed, labels, loss=loss, alpha=0.0, temperature=T)
    ref = 0.0
    for i in range(n):
        recon = []
        for x, k in zip(t, ks):
            p = (x[i].double() / T).softmax(-1)
            top = p.topk(k).indices
            r = torch.full((V,), (1 - p[top].sum()).item() / (V - k), dtype=torch.float64)
            r[top] = p[top]
            recon.append((r, set(top.tolist())))
        union = sorted(set.union(*(u for _, u in recon)))
        mixture = sum(w[i, m].double() * recon[m][0] for m in range(2))
        sp = (s_logits[0, i].detach().double() / T).softmax(-1)
        rest = [v for v in range(V) if v not in union]
        tb = torch.cat([mixture[union], mixture[rest].sum()[None]])
        sb = torch.cat([sp[union], sp[rest].sum()[None]])
        ref += T**2 * losses.LOSSES[loss](tb.log(), sb.log(), beta=0.5, skew=0.1).item()
    assert got.kd.item() == pytest.approx(ref, rel=1e-5)
    assert torch.isfinite(torch.autograd.grad(got.total, s_logits)[0]).all()  # the padded buckets give no NaN


@pytest.mark.parametrize("mixing", [["--teacher_weights", "0.3", "0.7"], ["--router", "lowest_ce"]])
def test_exact_caches_ensemble_trains_like_the_live_ensemble(tiny, dist_env, tmp_path, mixing):
    """Two exact caches of two teachers, or the first teacher live beside the second's exact cache, mixed by weights
    or by the router: the live ensemble's loss curve."""
    from tests import tiny as tiny_mod

    other = tiny_mod.make_model(tmp_path / "teacher2", tiny["tokenizer"], layers=1, hidden=16, heads=2, seed=5)
    write(tiny, tmp_path / "exact1", "--exact")
    write({**tiny, "teacher": other}, tmp_path / "exact2", "--exact")
    base = student_args(tiny, "cpu_zero1.json") + list(mixing)
    run = lambda cfg: train.run(cfg, train.default_callbacks(cfg))
    live = run(
        parse_args(base + ["--teacher", tiny["teacher"], "--teacher", other, "--output_dir", str(tmp_path / "live")])
    )
    cached = run(
        parse_args(
            base
            + [
                "--teacher_cache",
                str(tmp_path / "exact1"),
                "--teacher_cache",
                str(tmp_path / "exact2"),
                "--output_dir",
                str(tmp_path / "cached"),
            ]
        )
    )
    # A live teacher beside the other's exact cache (one ensemble across sources: ensemble.MixedTeachers)
    mixed = run(
        parse_args(
            base
            + ["--teacher", tiny["teacher"], "--teacher_cache", str(tmp_path / "exact2")]
            + ["--output_dir", str(tmp_path / "mixed")]
        )
    )
    assert isinstance(mixed.teachers, ensemble.MixedTeachers)
    for key in ("Train/kd", "Eval/kd", "Train/grad_norm"):
        a = [h[key] for h in live.history if key in h]
        for other_run in (cached, mixed):
            b = [h[key] for h in other_run.history if key in h]
            # 1e-4: the live mixture is a float32 logsumexp, the cached one float64 from float32 log-probs
            assert a and a == pytest.approx(b, rel=1e-4), key


# ------------------------------------------------------------------------------------------------------- ranks
@pytest.mark.multiprocess
def test_two_ranks_write_the_same_cache_as_one(tiny, tmp_path, k64):
    """2 ranks through the real deepspeed launcher, the teacher sharded (ZeRO-3; rank 1 has one shard fewer, so it
    makes dummy collective calls): the same shards, byte for byte, as one rank."""
    out = tmp_path / "two"
    args = flags(
        teacher=tiny["teacher"],
        data=tiny["data"],
        output_dir=out,
        seq_len=32,
        shard_examples=24,
        batch_size=4,
        top_k=64,
        teacher_deepspeed_config=REPO_CONFIGS / "cpu_teacher_zero3.json",
    )
    proc = deepspeed("ds_distill.cache_teacher", args)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "bytes/token" in proc.stdout
    two = json.loads((out / "manifest.json").read_text())
    one = k64[1]
    assert [s["sha256"] for s in two["shards"]["data"]] == [s["sha256"] for s in one["shards"]["data"]]
    assert two["stats"]["bytes_per_token"] == one["stats"]["bytes_per_token"]


def test_shards_of_every_split_are_dealt_to_every_rank(caplog):
    """Each shard written once; the demo's layout (one train shard + one eval shard before) kept rank 1 idle."""
    sizes = {"data": 267, "eval_data": 21}
    for world in (1, 2, 3):
        dealt = [cache_writer.shards_of_rank(sizes, 32, world, r) for r in range(world)]
        flat = sorted(s for shards in dealt for s in shards)
        assert flat == sorted([("data", s) for s in range(9)] + [("eval_data", 0)])
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1  # balanced
    # one shard per split and two ranks: each rank gets one (not both on rank 0)
    assert [cache_writer.shards_of_rank({"data": 10, "eval_data": 5}, 1024, 2, r) for r in (0, 1)] == [
        [("data", 0)],
        [("eval_data", 0)],
    ]
    with caplog.at_level("WARNING", logger="ds_distill"):
        assert cache_writer.shards_of_rank({"data": 10}, 1024, 2, 1) == []
        cache_writer.shards_of_rank({"data": 10}, 1024, 2, 0)
    assert "1 shard(s) for 2 ranks" in caplog.text and "--shard_examples" in caplog.text


def test_a_bad_shard_of_any_split_or_a_truncated_manifest_stops_before_any_model_loads(
    tiny, dist_env, tmp_path, capsys, keep_process_group, monkeypatch
):
    """Every shard of every split is checked (presence, size, sha256) when the cache opens, so a bad eval shard is
    not found at the first evaluation (after all of training, with the defaults); a truncated manifest is one line."""
    import shutil
    import time

    from ds_distill.core import build

    cache = tmp_path / "cache"
    write(tiny, cache, "--top_k", "8", "--eval_data", tiny["data"])
    start = time.perf_counter()
    cache_reader.TeacherCache(str(cache))
    print(f"\nopening (every shard hashed) took {time.perf_counter() - start:.3f} s")

    def no_model(*a, **k):
        raise AssertionError("a model loaded before the cache was checked")

    monkeypatch.setattr(build, "load_models", no_model)
    args = student_args(tiny, "cpu_zero3.json", eval_data=tiny["data"], teacher_cache=cache, output_dir=tmp_path / "o")
    eval_shard = cache / "shards" / "eval_data-00001.parquet"
    good = eval_shard.read_bytes()
    broken = {
        "flipped": good[:-9] + bytes([good[-9] ^ 1]) + good[-8:],
        "truncated": good[: len(good) // 2],
        "missing": None,
    }
    for name, content in broken.items():
        eval_shard.unlink()
        if content is not None:
            eval_shard.write_bytes(content)
        code = train.main(args)
        errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "eval_data-00001.parquet" in errors[0], (name, errors)
    eval_shard.write_bytes(good)
    manifest = cache / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    code = train.main(args)
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "manifest.json is not valid JSON" in errors[0], errors
    shutil.rmtree(cache)
