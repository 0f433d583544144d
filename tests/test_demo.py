"""The demo pipeline (scripts/demo.sh -> ds_distill.evaluate -> scripts/demo_report.py) on tiny random models.

The real script runs end to end through the `deepspeed` launcher with 2 CPU ranks, pointed by its DEMO_* variables
at a tiny teacher built here; the pydoc data is prepared for real (a second). The GGUF conversion is tested in
test_demo_prep.py, so the teacher folder given here is already "converted" and demo.sh skips it.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from ds_distill import on_policy
from ds_distill.evaluate import generation_nll, perplexity
from tests import tiny
from tests.launch import launch, without_launcher_vars

ROOT = Path(__file__).resolve().parent.parent


def _text_file(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return str(path)


def test_perplexity_matches_the_models_own_loss(tmp_path):
    """exp(mean CE over all supervised tokens of the file), truncated to seq_len, batching and padding included."""
    from transformers import AutoModelForCausalLM

    tok = tiny.make_tokenizer(tmp_path / "tok")
    model_dir = tiny.make_model(tmp_path / "m", tok, layers=1)
    texts = [
        "the quick brown fox jumps over the lazy dog",
        "hello, how are you today?",
        "one two three four five six seven eight nine ten",
    ]
    data = _text_file(tmp_path / "eval.jsonl", texts)
    seq_len = 12
    got = perplexity(model_dir, data, seq_len=seq_len, batch_size=2)  # 2 + 1: the first batch is padded

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ce_sum, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            # As the trainer reads text: bos + tokens + eos (a target too), cut to seq_len.
            ids = torch.tensor([(tok(t)["input_ids"] + [tok.eos_token_id])[:seq_len]])
            out = model(input_ids=ids, labels=ids)  # HF shifts internally: mean over ids.shape[1] - 1 targets
            ce_sum += out.loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert got["tokens"] == n
    assert got["ce"] == pytest.approx(ce_sum / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(ce_sum / n), rel=1e-5)


def test_several_models_in_one_process_equal_one_each(tmp_path, capsys):
    """`evaluate A=DIR B=DIR --json_dir D` writes D/A.json and D/B.json, each what the model alone gives (the loaded
    teacher is shared, the results are not)."""
    from ds_distill import evaluate

    tok = tiny.make_tokenizer(tmp_path / "tok")
    a = tiny.make_model(tmp_path / "a", tok, layers=1, seed=0)
    b = tiny.make_model(tmp_path / "runs" / "b" / "final", tok, layers=1, seed=1)
    teacher = tiny.make_model(tmp_path / "teacher", tok, layers=2, seed=2)
    data = _text_file(
        tmp_path / "eval.jsonl", ["the quick brown fox jumps over the lazy dog", "one two three four five"]
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": 0, "prompt": "the quick brown", "completion": " fox"}) + "\n")
    common = [
        "--data",
        data,
        "--seq_len",
        "16",
        "--generation_prompts",
        str(prompts),
        "--teacher",
        str(teacher),
        "--max_new_tokens",
        "4",
    ]
    assert evaluate.main([f"first={a}", str(b), "--json_dir", str(tmp_path / "out"), *common]) == 0
    for name, d in (("first", a), ("b", b)):  # b: named after its run, not "final"
        alone = tmp_path / f"{name}_alone.json"
        assert evaluate.main([str(d), "--json", str(alone), *common]) == 0
        got, want = (json.loads(f.read_text()) for f in (tmp_path / "out" / f"{name}.json", alone))
        assert (got["ppl"], got["gen_nll"], got["samples"]) == (want["ppl"], want["gen_nll"], want["samples"])
    capsys.readouterr()
    assert evaluate.main([str(a), f"a={b}", "--json_dir", str(tmp_path / "out"), *common]) == 2
    assert "two models are named 'a'" in capsys.readouterr().err
    assert evaluate.main([str(a), str(b), "--json", str(tmp_path / "x.json"), *common]) == 2
    assert "--json_dir" in capsys.readouterr().err


def test_generation_nll_is_the_teachers_own_nll_of_the_samples(tmp_path, monkeypatch):
    """Mean over sampled tokens of -log_softmax(teacher's own forward of prompt + sample) at those tokens: the prompt
    is not scored, an eos the model sampled is, and nothing after it (nor any padding) is."""
    from transformers import AutoModelForCausalLM

    tok = tiny.make_tokenizer(tmp_path / "tok")
    model_dir = tiny.make_model(tmp_path / "student", tok, layers=1, seed=0)
    teacher_dir = tiny.make_model(tmp_path / "teacher", tok, layers=2, seed=1)
    prompts = [
        "the quick brown fox jumps over",
        "hi",
        "one two three four five six seven",
    ]  # unequal: padding both ways
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"id": 10 + i, "prompt": p, "completion": " x"}) + "\n" for i, p in enumerate(prompts))
    )
    eos = tok.eos_token_id
    real = on_policy.HFGenerator.generate

    def eos_in_row_0(
        self, prompt_ids, sampling, seed
    ):  # the real samples; row 0 as if the model stopped at its 3rd token
        out = real(self, prompt_ids, sampling, seed)
        if len(prompt_ids) == 2:
            out[0] = out[0][:2] + [eos]
        return out

    monkeypatch.setattr(on_policy.HFGenerator, "generate", eos_in_row_0)
    got = generation_nll(
        model_dir, str(path), teacher_dir=teacher_dir, seq_len=32, max_new_tokens=6, seed=0, batch_size=2
    )

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    samples = got["samples"]
    assert [s["id"] for s in samples] == [10, 11, 12]
    assert samples[0]["completion_ids"][-1] == eos and len(samples[0]["completion_ids"]) == 3
    assert [len(s["completion_ids"]) for s in samples[1:]] == [6, 6]  # tiny random models never pick eos here
    nll_sum = self_sum = 0.0
    with torch.no_grad():
        for text, s in zip(prompts, samples):
            prompt = tok(text)["input_ids"]  # bos + prompt, as the trainer encodes a prompt
            new = s["completion_ids"]
            logits = teacher(input_ids=torch.tensor([prompt + new])).logits[0].double()  # alone: no padding
            token_nll = [-torch.log_softmax(logits[len(prompt) - 1 + j], -1)[t].item() for j, t in enumerate(new)]
            assert s["nll"] == pytest.approx(sum(token_nll) / len(new), rel=1e-5)
            nll_sum += sum(token_nll)
            own = model(input_ids=torch.tensor([prompt + new])).logits[0].double()  # the model's own forward
            self_sum -= sum(torch.log_softmax(own[len(prompt) - 1 + j], -1)[t].item() for j, t in enumerate(new))
    assert (
        got["gen_tokens"] == 3 + 6 + 6 and got["gen_prompts"] == 3 and got["gen_eos_fraction"] == pytest.approx(1 / 3)
    )
    assert got["gen_nll"] == pytest.approx(nll_sum / 15, rel=1e-5)
    assert got["gen_self_nll"] == pytest.approx(self_sum / 15, rel=1e-5)
    assert got["gen_kl"] == pytest.approx((nll_sum - self_sum) / 15, rel=1e-5)
    # Seeded: the same call samples the same tokens; another seed samples others.
    again = generation_nll(
        model_dir, str(path), teacher_dir=teacher_dir, seq_len=32, max_new_tokens=6, seed=0, batch_size=2
    )
    other = generation_nll(
        model_dir, str(path), teacher_dir=teacher_dir, seq_len=32, max_new_tokens=6, seed=1, batch_size=2
    )
    assert [s["completion_ids"] for s in again["samples"]] == [s["completion_ids"] for s in samples]
    assert [s["completion_ids"] for s in other["samples"]] != [s["completion_ids"] for s in samples]


def test_report_objective_names():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_report", ROOT / "scripts" / "demo_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report._objective({"alpha": 1.0, "loss": "forward_kl", "temperature": 1.0}) == "CE only (alpha=1)"
    assert report._objective({"alpha": 0.5, "loss": "reverse_kl", "temperature": 2.0}) == "0.5*CE + 0.5*reverse_kl, T=2"
    assert report._objective({"alpha": 0.0, "loss": "jsd", "temperature": 1.0}) == "jsd, T=1 (pure KD)"
    assert (
        report._objective({"alpha": 0.0, "loss": "reverse_kl", "temperature": 1.0, "on_policy_fraction": 1.0})
        == "reverse_kl, T=1 (pure KD), on-policy (100% of micro-batches sampled)"
    )
    # DEMO_XTOK=1's row: the method (from the run's run_config.json) and the divergence it binarises.
    assert (
        report._objective({"alpha": 0.5, "loss": "forward_kl", "temperature": 1.0, "cross_tokenizer": "alm"})
        == "0.5*CE + 0.5*alm (forward_kl, T=1), another tokenizer"
    )


def test_report_compares_the_cached_run_with_the_live_reference():
    """With DEMO_LIVE_REFERENCE=1 the report prints the cache's line and the cached run against the live one (wall
    time saved, held-out perplexity change); without the live run only the cache's line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_report", ROOT / "scripts" / "demo_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    cache = {
        "wall_s": 124.0,
        "top_k": 64,
        "bytes_per_token": 96.0,
        "kl_full_per_token": 0.411,
        "kl_full_p99": 1.74,
        "kl_buckets_per_token": 0.0017,
        "kl_buckets_p99": 0.014,
        "tail_mass_per_token": 0.111,
    }
    rows = {"forward_kl": {"wall_s": 248.0, "ppl": 367.53}, "forward_kl_live": {"wall_s": 340.0, "ppl": 363.47}}
    text = report.cache_summary(cache, rows)
    assert text.splitlines()[0].startswith("teacher cache: one pass of 124 s, top-64, 96.0 bytes/token")
    assert "248 s vs 340 s of training (92 s saved per KD run" in text and "367.530 vs 363.470 (+1.12%" in text
    assert report.cache_summary(cache, {"forward_kl": rows["forward_kl"]}).count("\n") == 0  # no live run: one line


def _report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_report", ROOT / "scripts" / "demo_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_equal_cost_counts_the_teacher():
    """KD against CE at equal cost: CE's budget (steps x s/step) buys KD (budget - teacher share) / KD's s/step steps;
    a cache pass is shared by 1, 2 or 4 students, a live teacher is inside KD's s/step; KD's perplexity there is
    interpolated in log space between its evals, and only there (before the first eval: not measured)."""
    report = _report()
    ce = {"name": "ce", "label": "CE", "alpha": 1.0, "steps": 30, "step_s": 5.0}
    ce["eval_ppl"] = [(10, 1700.0), (20, 650.0), (30, 400.0)]
    cached = {"name": "fkl", "label": "fKL", "alpha": 0.5, "steps": 30, "step_s": 5.5, "teacher_cache": True}
    cached["eval_ppl"] = [(10, 900.0), (20, 420.0), (30, 300.0)]
    live = {"name": "live", "label": "live", "alpha": 0.5, "steps": 30, "step_s": 9.0, "teacher_cache": False}
    live["eval_ppl"] = [(10, 1500.0), (20, 640.0), (30, 360.0)]
    on_policy = {**live, "name": "op", "start": "fkl", "on_policy": True}  # a continuation: not compared
    rows = {r["name"]: r for r in (ce, cached, live, on_policy)}
    got = report.equal_cost(rows, {"wall_s": 124.0})
    assert [(e["row"], e["teacher"]) for e in got] == [
        ("fkl", "cache / 1"),
        ("fkl", "cache / 2"),
        ("fkl", "cache / 4"),
        ("live", "live"),
    ]
    budget = 30 * 5.0
    for e, share in zip(got, (124.0, 62.0, 31.0, 0.0)):
        assert e["ce_budget_s"] == budget and e["share_s"] == share and e["ce_ppl"] == 400.0
        step_s = 9.0 if e["row"] == "live" else 5.5
        assert e["steps_in_ce_budget"] == pytest.approx((budget - share) / step_s)
        assert e["kd_cost_s"] == pytest.approx(30 * step_s + share)
        assert e["ce_steps_for_kd_cost"] == pytest.approx((30 * step_s + share) / 5.0)
    one, two, four, by_live = got
    assert one["steps_in_ce_budget"] < 10 and one["ppl"] is None and one["pays"] is None  # before the first eval
    w = (88 / 5.5 - 10) / 10  # 2 students: 16 steps, between the evals at 10 and 20
    assert two["ppl"] == pytest.approx(900.0 ** (1 - w) * 420.0**w) and two["pays"] is False
    w = (119 / 5.5 - 20) / 10  # 4 students: 21.6 steps
    assert four["ppl"] == pytest.approx(420.0 ** (1 - w) * 300.0**w) and four["ppl"] < 400 and four["pays"] is True
    w = (150 / 9.0 - 10) / 10
    assert by_live["ppl"] == pytest.approx(1500.0 ** (1 - w) * 640.0**w) and by_live["pays"] is False
    # A cache pass longer than CE's whole run buys no step; exact values at eval steps, nothing past the last eval.
    [alone, *_] = report.equal_cost({"ce": ce, "fkl": cached}, {"wall_s": 200.0})
    assert alone["steps_in_ce_budget"] == 0 and alone["ppl"] is None
    assert report.ppl_at(cached["eval_ppl"], 20) == 420.0 and report.ppl_at(cached["eval_ppl"], 31) is None
    table = report.equal_cost_markdown(got, 30)
    assert table.count("\n") == 2 + 4 and "| fKL | cache / 4: 31 s | 5.50 / 5.00 | 21.6 (150 s) |" in table
    assert "the teacher's share alone" in report.equal_cost_markdown([alone], 30)


# The demo's on-policy defaults (loss, alpha, beta, fraction), then this test's steps and tokens.
ON_POLICY = ("entropy_aware_kl", 0.0, 0.5, 1.0, 3, 6)


@pytest.mark.multiprocess
def test_demo_script_end_to_end(tmp_path):
    tok = tiny.make_tokenizer(tmp_path / "tok")
    assets = tmp_path / "assets"
    tiny.make_model(assets / "teacher", tok, layers=4, hidden=32, heads=4, seed=1)
    out = tmp_path / "out"
    env = without_launcher_vars(dict(os.environ))
    # seq_len 160: the pydoc prompts (~200 characters) are up to 153 tokens of the tiny byte-level tokenizer.
    env.update(
        DEMO_ASSETS=str(assets),
        DEMO_OUT=str(out),
        DEMO_STEPS="3",
        DEMO_SEQ_LEN="160",
        DEMO_LAYERS="0,3",
        DEMO_EVAL_STEPS="2",
        DEMO_ON_POLICY_STEPS="3",
        DEMO_MAX_NEW_TOKENS="6",
        DEMO_REVERSE_KL="1",  # off by default for the real demo's time; its row is checked here
        DEMO_ON_POLICY_ANCHOR="0.5",  # the stabilised row's anchor reaches the run (README: "The stabilised row")
        CUDA_VISIBLE_DEVICES="",
    )
    # 4 runs and a cache pass (a loaded machine takes over 15 minutes); every run's log is checked for /dev/shm.
    proc = launch(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, timeout=1800, log_dir=out)
    stdout = proc.stdout  # stdout and stderr together
    assert proc.returncode == 0, stdout[-6000:]

    # Prepared once, in the places the variables named: data split by topic, student from teacher layers 0 and 3.
    assert (assets / "data" / "train.jsonl").is_file() and (assets / "data" / "eval.jsonl").is_file()
    student_cfg = json.loads((assets / "student_0_3" / "config.json").read_text())
    assert student_cfg["num_hidden_layers"] == 2

    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == [
        "teacher",
        "student_init",
        "ce",
        "forward_kl",
        "reverse_kl",
        "on_policy",
    ]  # no live reference by default
    eval_tokens = {r["eval_tokens"] for r in rows.values()}
    assert len(eval_tokens) == 1 and eval_tokens.pop() > 0  # every model scored on the same tokens
    n_eval = sum(1 for _ in open(assets / "data" / "eval_prompts.jsonl"))
    for r in rows.values():
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        # The generation metric: every model continued every held-out prompt (at most 6 tokens), the teacher scored it.
        ev = json.loads((out / "eval" / f"{r['name']}.json").read_text())
        assert (
            ev["gen_prompts"] == n_eval
            and 0 < r["gen_tokens"] <= 6 * n_eval
            and math.isfinite(r["gen_nll"])
            and r["gen_nll"] > 0
        )
        assert r["gen_self_nll"] > 0 and r["gen_kl"] == pytest.approx(r["gen_nll"] - r["gen_self_nll"])
    for name, loss, alpha in (
        ("ce", "forward_kl", 1.0),
        ("forward_kl", "forward_kl", 0.5),
        ("reverse_kl", "reverse_kl", 0.5),
    ):
        run = out / "runs" / name
        assert rows[name]["wall_s"] > 0 and rows[name]["tokens_per_s"] > 0 and rows[name]["steps"] == 3
        cfg = json.loads((run / "run_config.json").read_text())
        assert (cfg["loss"], cfg["alpha"], cfg["seq_len"], cfg["max_steps"], cfg["seed"]) == (loss, alpha, 160, 3, 0)
        assert (run / "final" / "config.json").is_file() and not (run / "checkpoints").exists()
        assert (run / "monitor" / "train" / "Eval_ppl.csv").is_file()
    # The on-policy row continues the (cached) forward-KL student on its own samples of the train prompts, live teacher,
    # with its own DeepSpeed JSON (the continuation's learning rate).
    cfg = json.loads((out / "runs" / "on_policy" / "run_config.json").read_text())
    assert (
        cfg["loss"],
        cfg["alpha"],
        cfg["beta"],
        cfg["on_policy_fraction"],
        cfg["max_steps"],
        cfg["max_new_tokens"],
    ) == ON_POLICY
    assert (
        cfg["deepspeed_config"] == "ds_configs/cpu_demo_on_policy.json" and not cfg["teacher_cache"] and cfg["teacher"]
    )
    assert cfg["on_policy_anchor"] == 0.5
    assert cfg["student"] == str(out / "runs" / "forward_kl" / "final") and cfg["data"].endswith("train_prompts.jsonl")
    assert rows["on_policy"]["steps"] == 3 and rows["on_policy"]["start"] == "forward_kl"
    assert (
        rows["on_policy"]["generate_tokens_per_s"] > 0
        and (out / "runs" / "on_policy" / "final" / "config.json").is_file()
    )
    assert rows["on_policy"]["ppl"] != rows["forward_kl"]["ppl"]  # 3 steps: the first runs at lr 0 (warmup)
    # The trained students are not the untrained one (the exports hold the trained weights). 3 steps, not 2: the
    # warmup schedule starts at lr 0, so the first update changes nothing.
    assert rows["ce"]["ppl"] != rows["student_init"]["ppl"]

    table = (out / "results.md").read_text()
    # The two KD runs read one teacher cache.
    for name, cached in (("forward_kl", True), ("reverse_kl", True)):
        cfg = json.loads((out / "runs" / name / "run_config.json").read_text())
        assert bool(cfg["teacher_cache"]) == cached and bool(cfg["teacher"]) != cached
    cache = results["teacher_cache"]
    assert (
        cache["top_k"] == 64
        and 0 < cache["bytes_per_token"]
        and cache["wall_s"] > 0
        and cache["kl_full_per_token"] >= 0
    )
    assert "bytes/token" in stdout
    assert table.startswith("| model |") and table.count("\n") == 2 + 6
    assert "3 after forward_kl |" in table and f"on-policy ({ON_POLICY[3]:.0%} of micro-batches sampled)" in table
    assert "demo: evaluating 6 models" in stdout  # one evaluation process
    # KD against CE at equal cost: each cached KD run for 1, 2 and 4 students sharing the pass, the CE run's budget.
    costs = results["equal_cost"]
    assert [(e["row"], e["teacher"]) for e in costs] == [
        (name, f"cache / {n}") for name in ("forward_kl", "reverse_kl") for n in (1, 2, 4)
    ]
    for e in costs:
        assert e["ce_budget_s"] == pytest.approx(3 * rows["ce"]["step_s"]) and e["share_s"] * int(e["teacher"][-1]) == (
            pytest.approx(cache["wall_s"])
        )
    assert (out / "equal_cost.md").read_text() in stdout
    assert table in stdout
    assert (out / "curves.png").stat().st_size > 1000
