"""Gather the demo's numbers into one table: demo_output/results.json, results.md and curves.png.

    python scripts/demo_report.py demo_output teacher student_init ce forward_kl reverse_kl

Each NAME is a row, read from files that scripts/demo.sh writes under the output folder:
  eval/NAME.json        from `python -m ds_distill.evaluate --json` (ppl, ce, tokens, seconds); every row has one
  runs/NAME/demo_run.json  {"label", "loss", "alpha", "temperature", "wall_s", "steps"}; trained rows only
  runs/NAME/monitor/train/*.csv  the trainer's csv monitor (Train_tokens_per_s is averaged; curves are drawn)
Rows without a run folder (the teacher, the untrained student) only have a perplexity.
  teacher_cache.json    the teacher cache's measurements (bytes/token, reconstruction KL, wall_s), when there is one
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ds_distill without an install, as the other scripts

from ds_distill.plot import plot_runs, read_curves  # noqa: E402

COLUMNS = ("model", "objective", "held-out ppl", "wall time (s)", "train tokens/s")


def gather(out_dir: Path, names: list[str]) -> list[dict]:
    """One dict per name: name, label, objective, ppl, ce, eval_tokens, and for trained rows wall_s, tokens_per_s."""
    rows = []
    for name in names:
        ev_path = out_dir / "eval" / f"{name}.json"
        if not ev_path.is_file():
            raise SystemExit(f"error: {ev_path} is missing: run scripts/demo.sh (it evaluates every model before the report)")
        ev = json.loads(ev_path.read_text())
        row = {"name": name, "label": name, "objective": "", "ppl": ev["ppl"], "ce": ev["ce"], "eval_tokens": ev["tokens"]}
        run_dir = out_dir / "runs" / name
        if (run_dir / "demo_run.json").is_file():
            run = json.loads((run_dir / "demo_run.json").read_text())
            row.update(label=run["label"], objective=_objective(run), wall_s=run["wall_s"], steps=run["steps"])
            rate = read_curves(run_dir).get("Train/tokens_per_s", [])
            # The first window includes DeepSpeed's first-step set-up; the mean of the rest is the steady rate.
            steady = [v for _, v in rate[1:]] or [v for _, v in rate]
            row["tokens_per_s"] = sum(steady) / len(steady) if steady else None
        else:
            meta = out_dir / "eval" / f"{name}.label"
            row["label"] = meta.read_text().strip() if meta.is_file() else name
        rows.append(row)
    return rows


def _objective(run: dict) -> str:
    if run["alpha"] >= 1.0:
        return "CE only (alpha=1)"
    kd = f"{run['loss']}, T={run['temperature']:g}"
    return f"{kd} (pure KD)" if run["alpha"] == 0 else f"{run['alpha']:g}*CE + {1 - run['alpha']:g}*{kd}"


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else ""
        rate = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else ""
        lines.append(f"| {r['label']} | {r['objective']} | {r['ppl']:.2f} | {wall} | {rate} |")
    return "\n".join(lines) + "\n"


def cache_summary(cache: dict, rows: dict[str, dict], cached: str = "forward_kl", live: str = "forward_kl_live") -> str:
    """The teacher cache's lines (issue 16): its size and reconstruction error, its pass time, and forward KL from the
    cache (run ``cached``) against forward KL from the live teacher (run ``live``): wall time and held-out perplexity."""
    lines = [f"teacher cache: one pass of {cache['wall_s']:.0f} s, top-{cache['top_k']}, {cache['bytes_per_token']:.1f} bytes/token; "
             f"KL(teacher || reconstructed) per token mean {cache['kl_full_per_token']:.3g}, p99 {cache.get('kl_full_p99', float('nan')):.3g} "
             f"nats (on the top-K + tail buckets the loss sees: mean {cache['kl_buckets_per_token']:.2g}, "
             f"p99 {cache.get('kl_buckets_p99', float('nan')):.2g}); tail mass {cache['tail_mass_per_token']:.3f}"]
    c, l = rows.get(cached), rows.get(live)
    if c and l and "wall_s" in c and "wall_s" in l:
        saved = l["wall_s"] - c["wall_s"]
        lines.append(f"forward KL from the cache vs the live teacher: {c['wall_s']:.0f} s vs {l['wall_s']:.0f} s of training "
                     f"({saved:.0f} s saved per KD run; the pass costs {cache['wall_s']:.0f} s once); held-out perplexity "
                     f"{c['ppl']:.3f} vs {l['ppl']:.3f} ({100 * (c['ppl'] / l['ppl'] - 1):+.2f}%, goal within 1%)")
    return "\n".join(lines)


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
        plot_runs([out_dir / "runs" / r["name"] for r in trained], out_dir / "curves.png", [r["name"] for r in trained])
    print(table, end="")
    if cache:
        print(cache_summary(cache, {r["name"]: r for r in rows}))
    print(f"demo_report: wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}" + (f", {out_dir / 'curves.png'}" if trained else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
