"""Gather the demo's numbers into one table: demo_output/results.json, results.md and curves.png.

    python scripts/demo_report.py demo_output teacher student_init ce forward_kl reverse_kl [forward_kl_live] on_policy

Each NAME is a row, read from files that scripts/demo.sh writes under the output folder:
  eval/NAME.json        from `python -m ds_distill.evaluate --json_dir` (ppl, ce, tokens, seconds; with --generation_prompts
                        also gen_nll, gen_self_nll, gen_kl, gen_tokens, gen_mean_len, gen_eos_fraction, samples); every row has one
  runs/NAME/demo_run.json  {"label", "loss", "alpha", "temperature", "wall_s", "steps", "on_policy_fraction", "student"};
                        trained rows only
  runs/NAME/monitor/train/*.csv  the trainer's csv monitor (Train_tokens_per_s and Generate_tokens_per_s are averaged;
                        Eval_ce is drawn: every run's held-out CE on one panel, curves.png)
Rows without a run folder (the teacher, the untrained student) have only the evaluation's numbers. A run whose student
is another row's final/ (the on-policy run) is drawn from that row's last step.
  teacher_cache.json    the teacher cache's measurements (bytes/token, reconstruction KL, wall_s), when there is one
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ds_distill without an install, as the other scripts

from ds_distill.plot import plot_metric, read_curves  # noqa: E402

COLUMNS = (
    "model",
    "objective",
    "held-out ppl",
    "teacher NLL of samples",
    "own NLL of samples",
    "sample tokens",
    "steps",
    "wall time (s)",
    "train tokens/s",
    "generate tokens/s",
)


def gather(out_dir: Path, names: list[str]) -> list[dict]:
    """One dict per name: name, label, objective, ppl, ce, eval_tokens, the generation metric when evaluated (gen_nll,
    gen_self_nll, gen_kl, gen_tokens, gen_mean_len, gen_eos_fraction), and for trained rows wall_s, steps, tokens_per_s, start (the row
    whose final/ it started from, or None), generate_tokens_per_s (on-policy runs)."""
    rows = []
    for name in names:
        ev_path = out_dir / "eval" / f"{name}.json"
        if not ev_path.is_file():
            raise SystemExit(
                f"error: {ev_path} is missing: run scripts/demo.sh (it evaluates every model before the report)"
            )
        ev = json.loads(ev_path.read_text())
        row = {
            "name": name,
            "label": name,
            "objective": "",
            "ppl": ev["ppl"],
            "ce": ev["ce"],
            "eval_tokens": ev["tokens"],
            **{
                k: ev[k]
                for k in ("gen_nll", "gen_self_nll", "gen_kl", "gen_tokens", "gen_mean_len", "gen_eos_fraction")
                if k in ev
            },
        }
        run_dir = out_dir / "runs" / name
        if (run_dir / "demo_run.json").is_file():
            run = json.loads((run_dir / "demo_run.json").read_text())
            row.update(label=run["label"], objective=_objective(run), wall_s=run["wall_s"], steps=run["steps"])
            student = Path(run.get("student", ""))
            from_row = student.name == "final" and student.parent.parent.resolve() == run_dir.parent.resolve()
            row["start"] = student.parent.name if from_row else None
            curves = read_curves(run_dir)
            row["tokens_per_s"] = _steady(curves.get("Train/tokens_per_s", []))
            row["generate_tokens_per_s"] = _steady(curves.get("Generate/tokens_per_s", []))
        else:
            meta = out_dir / "eval" / f"{name}.label"
            row["label"] = meta.read_text().strip() if meta.is_file() else name
        rows.append(row)
    return rows


def _steady(points: list[tuple[int, float]]) -> float | None:
    """Mean rate without the first window (it includes DeepSpeed's first-step set-up), or None when nothing was logged."""
    steady = [v for _, v in points[1:]] or [v for _, v in points]
    return sum(steady) / len(steady) if steady else None


def _objective(run: dict) -> str:
    if run["alpha"] >= 1.0:
        return "CE only (alpha=1)"
    kd = f"{run['loss']}, T={run['temperature']:g}"
    out = f"{kd} (pure KD)" if run["alpha"] == 0 else f"{run['alpha']:g}*CE + {1 - run['alpha']:g}*{kd}"
    fraction = run.get("on_policy_fraction", 0)
    return f"{out}, on-policy ({fraction:.0%} of micro-batches sampled)" if fraction else out


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            r["label"],
            r["objective"],
            f"{r['ppl']:.2f}",
            _fmt(r.get("gen_nll"), ".3f"),
            _fmt(r.get("gen_self_nll"), ".3f"),
            _fmt(r.get("gen_mean_len"), ".1f"),
            (f"{r['steps']}" + (f" after {r['start']}" if r.get("start") else "")) if "steps" in r else "",
            _fmt(r.get("wall_s"), ".0f"),
            _fmt(r.get("tokens_per_s"), ".0f"),
            _fmt(r.get("generate_tokens_per_s"), ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cache_summary(cache: dict, rows: dict[str, dict], cached: str = "forward_kl", live: str = "forward_kl_live") -> str:
    """The teacher cache's lines (issue 16): its size and reconstruction error, its pass time, and forward KL from the
    cache (run ``cached``) against forward KL from the live teacher (run ``live``): wall time and held-out perplexity."""
    lines = [
        f"teacher cache: one pass of {cache['wall_s']:.0f} s, top-{cache['top_k']}, {cache['bytes_per_token']:.1f} bytes/token; "
        f"KL(teacher || reconstructed) per token mean {cache['kl_full_per_token']:.3g}, p99 {cache.get('kl_full_p99', float('nan')):.3g} "
        f"nats (on the top-K + tail buckets the loss sees: mean {cache['kl_buckets_per_token']:.2g}, "
        f"p99 {cache.get('kl_buckets_p99', float('nan')):.2g}); tail mass {cache['tail_mass_per_token']:.3f}"
    ]
    c, l = rows.get(cached), rows.get(live)
    if c and l and "wall_s" in c and "wall_s" in l:
        saved = l["wall_s"] - c["wall_s"]
        lines.append(
            f"forward KL from the cache vs the live teacher: {c['wall_s']:.0f} s vs {l['wall_s']:.0f} s of training "
            f"({saved:.0f} s saved per KD run; the pass costs {cache['wall_s']:.0f} s once); held-out perplexity "
            f"{c['ppl']:.3f} vs {l['ppl']:.3f} ({100 * (c['ppl'] / l['ppl'] - 1):+.2f}%, goal within 1%)"
        )
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir, names = Path(argv[0]), argv[1:]
    rows = gather(out_dir, names)
    table = markdown(rows)
    cache_path = out_dir / "teacher_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else None
    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "teacher_cache": cache}, indent=2))
    (out_dir / "results.md").write_text(table)
    trained = [r for r in rows if "wall_s" in r]
    if trained:
        steps = {r["name"]: r["steps"] for r in trained}
        plot_metric(
            [out_dir / "runs" / r["name"] for r in trained],
            out_dir / "curves.png",
            [r["name"] for r in trained],
            offsets=[steps.get(r["start"], 0) for r in trained],
        )
    print(table, end="")
    if cache:
        print(cache_summary(cache, {r["name"]: r for r in rows}))
    print(
        f"demo_report: wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
        + (f", {out_dir / 'curves.png'}" if trained else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
