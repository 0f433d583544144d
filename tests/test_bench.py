"""CI smoke test of scripts/bench.py at the CPU preset: every variant measured, the ratio taken from the plain loop."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def test_bench_cpu_smoke(tmp_path, dist_env):
    """Run from a process that holds a process group (dist_env: pytest's in-process tests export its MASTER_PORT),
    as in the suite: each worker must be a world of its own on its own port (it inherited the port: EADDRINUSE)."""
    variants = ["plain_full", "ds_z3"]
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--preset",
            "cpu",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--seq_len",
            "64",
            "--variants",
            ",".join(variants),
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == variants
    assert report["tokens_per_step"] == 2 * 64
    for r in rows.values():
        assert len(r["step_s"]) == 2 and r["tokens_per_s"] > 0 and r["peak_gib"] > 0 and r["mfu"] is None
        assert r["reference"] == "plain_full"
        assert abs(r["vs_plain"] - r["tokens_per_s"] / rows["plain_full"]["tokens_per_s"]) < 1e-9
    assert rows["plain_full"]["vs_plain"] == 1.0
    table = out_md.read_text()
    assert table in proc.stdout
    for v in variants:
        assert f"| {v} |" in table


def test_summarise_flops_and_ratio():
    bench = load_bench()
    results = [
        {"variant": "plain_full", "step_s": [1.0, 1.0], "peak_gib": 1.0, "device": "NVIDIA H100 80GB HBM3"},
        {"variant": "ds_z3", "step_s": [2.0, 2.0], "peak_gib": 0.5, "device": "NVIDIA H100 80GB HBM3"},
    ]
    rows = bench.summarise(results, tokens_per_step=1000, n_student=10**9, n_teacher=10**10)
    flops = (6 * 10**9 + 2 * 10**10) * 1000  # per step
    assert rows[0]["tflops"] == flops / 1e12 and rows[1]["tflops"] == flops / 2 / 1e12
    assert rows[0]["mfu"] == flops / 989e12
    assert rows[1]["vs_plain"] == 0.5 and rows[1]["median_step_s"] == 2.0


def test_ds_config_copies_change_only_the_micro_batch(tmp_path):
    bench = load_bench()
    for gpu in (False, True):
        student, teacher, full = bench.ds_configs("ds_z3_full_logits", tmp_path, 7, gpu)
        shipped = json.loads((ROOT / "ds_configs" / ("zero3_bf16.json" if gpu else "cpu_zero3.json")).read_text())
        assert json.loads(Path(student).read_text()) == {**shipped, "train_micro_batch_size_per_gpu": 7} and full
        assert teacher == ""  # no teacher JSON: the toolkit places the teacher by fit, as for users
        for kind, stage in (("replicated", 0), ("zero3", 3)):
            _, teacher, full = bench.ds_configs(f"ds_z0_teacher_{kind}", tmp_path, 3, gpu)
            assert json.loads(Path(teacher).read_text())["zero_optimization"]["stage"] == stage and not full


def test_workers_build_deepspeed_ops_with_their_venvs_ninja(tmp_path, monkeypatch):
    """A bench worker finds the ``ninja`` beside its interpreter first, as in an activated venv, even when the parent
    was started without the venv on PATH: torch JIT-builds DeepSpeed's ops with the first ninja on PATH, and a system
    ninja rebuilt the op the suite's venv ninja had built (~60 s of every such worker's start-up, issue 28)."""
    bench = load_bench()
    system, venv = tmp_path / "usr_bin", tmp_path / "venv" / "bin"
    for folder in (system, venv):
        folder.mkdir(parents=True)
        (folder / "ninja").write_text("#!/bin/sh\n")
        (folder / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", str(system))
    env = bench.worker_env(str(venv / "python"))
    assert shutil.which("ninja", path=env["PATH"]) == str(venv / "ninja")
    assert env["PATH"].endswith(str(system)) and env["HF_HUB_OFFLINE"] == "1"  # the rest of the parent's PATH kept


def test_lora_variant_is_the_same_json_with_a_lora_student(tmp_path):
    bench = load_bench()
    assert bench.DS_VARIANT.match("ds_z3_teacher_zero3_lora") and not bench.DS_VARIANT.match("ds_z3_lora_prefetch")
    (lora, t1, f1), (full, t2, f2) = (bench.ds_configs(v, tmp_path, 7, False) for v in ("ds_z3_lora", "ds_z3"))
    assert Path(lora).read_text() == Path(full).read_text() and (t1, f1) == (t2, f2)


def test_xtok_variants_are_the_same_json_with_another_tokenizer(tmp_path):
    """The _xtok variants (cross-tokenizer cost, --cross_tokenizer M): ds_z3's JSONs; the method is the variant's; the
    default teacher tokenizer is another one than the student's (a byte-level BPE trained on the corpus)."""
    bench = load_bench()
    for method in ("alm", "vocab_map"):
        match = bench.DS_VARIANT.match(f"ds_z3_teacher_zero3_xtok_{method}")
        assert match and match.group(7) == method
    assert not bench.DS_VARIANT.match("ds_z3_xtok_uld") and bench.DS_VARIANT.match("ds_z3").group(7) is None
    (xtok, t1, f1), (same, t2, f2) = (bench.ds_configs(v, tmp_path, 4, False) for v in ("ds_z3_xtok_alm", "ds_z3"))
    assert Path(xtok).read_text() == Path(same).read_text() and (t1, f1) == (t2, f2)
    bench.make_data(tmp_path / "train.jsonl", 64, 16, 8)
    word = bench.make_tokenizer(tmp_path / "w", 64)
    bpe = bench.make_bpe_tokenizer(tmp_path / "b", tmp_path / "train.jsonl", 300)
    text = (tmp_path / "train.jsonl").read_text().splitlines()[0]
    assert len(bpe) == 300 and bpe(text)["input_ids"] != word(text)["input_ids"]


def test_bench_peer_ds_side_on_tiny_models(tiny, tmp_path):
    """scripts/bench_peer.py, ds-distill's side only (TRL lives in its own environment, not the suite's): it trains,
    records the batches TRL would train on, times every step and its parts, and its held-out perplexity (the function
    both sides use) equals ds-distill's own evaluation of the same batches."""

    import torch

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny["data"], data / "train.jsonl")
    shutil.copy(tiny["data"], data / "eval.jsonl")
    out = tmp_path / "out"
    args = ["--teacher", tiny["teacher"], "--student", tiny["student"], "--data", str(data), "--out", str(out)]
    args += ["--systems", "ds", "--objectives", "mix", "--steps", "3", "--skip", "1", "--micro_batch", "2"]
    args += ["--seq_len", "32", "--parts", "--json", str(tmp_path / "peer.json")]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_peer.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "peer.json").read_text())
    runs = report["runs"]
    assert len(runs) == 1 and runs[0]["system"] == "ds-distill" and runs[0]["same_batches"]
    for r in runs:
        assert len(r["step_s"]) == len(r["cpu_s"]) == len(r["losses"]) == len(r["parts"]) == 3
        assert r["ppl"] == pytest.approx(r["own_eval_ppl"], rel=1e-5) and r["ppl"] > 1
        assert r["startup_s"] > 0 and r["peak_gib"] > 0
        assert {"student forward", "teacher forward", "loss forward", "optimizer step (engine)"} <= set(r["parts"][1])
    recorded = torch.load(out / "batches_mix.pt")
    assert len(recorded["train"]) == 3 and recorded["train"][0]["input_ids"].shape[0] == 2
    (row,) = report["rows"]
    assert row["runs"] == 1 and row["ppl"] == pytest.approx(runs[0]["ppl"])
    assert "| ds-distill" in proc.stdout and "0.5 CE + 0.5 fKL" in proc.stdout


def test_bench_peer_bad_input_is_one_line_exit_2(tmp_path):
    """A missing TRL environment or an unknown objective: one line naming the fix, exit 2, nothing run."""
    base = [sys.executable, str(ROOT / "scripts" / "bench_peer.py"), "--teacher", "t", "--student", "s", "--data", "d"]
    base += ["--out", str(tmp_path / "o")]
    for extra, words in (
        (["--trl_python", str(tmp_path / "nope")], "run `bash scripts/setup_trl.sh` first (or pass --systems ds)"),
        (["--objectives", "kl"], "unknown --objectives ['kl']"),
    ):
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], (proc.returncode, proc.stderr)
