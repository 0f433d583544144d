"""Gather the demo's numbers into one table: demo_output/results.json, results.md and curves.png.

    python scripts/demo_report.py demo_output teacher student_init ce forward_kl reverse_kl [forward_kl_live] on_policy

Each NAME is a row, read from files that scripts/demo.sh writes under the output folder:
  eval/NAME.json        from `python -m ds_distill.evaluate --json_dir` (ppl, ce, tokens, seconds; with
                        --generation_prompts also gen_nll, gen_self_nll, gen_kl, gen_tokens, gen_mean_len,
                        gen_eos_fraction, samples); every row has one
  runs/NAME/demo_run.json  {"label", "loss", "alpha", "temperature", "wall_s", "steps", "on_policy_fraction", "student",
                        "teacher_cache"}; trained rows only (with runs/NAME/run_config.json: its cross_tokenizer)
  runs/NAME/monitor/train/*.csv  the trainer's csv monitor (Train_tokens_per_s, Train_step_s and Generate_tokens_per_s
                        are averaged; Eval_ce is drawn: every run's held-out CE on one panel, curves.png; Eval_ppl
                        gives the equal-cost comparison: equal_cost.md, KD against CE with the teacher's cost counted)
Rows without a run folder (the teacher, the untrained student) have only the evaluation's numbers. A run whose student
is another row's final/ (the on-policy run) is drawn from that row's last step.
  teacher_cache.json    the teacher cache's measurements (bytes/token, reconstruction KL, wall_s), when there is one
"""

from __future__ import annotations

import json
import math
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
    gen_self_nll, gen_kl, gen_tokens, gen_mean_len, gen_eos_fraction), and for trained rows wall_s, steps, tokens_per_s,
    start (the row
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
            config = run_dir / "run_config.json"  # the trainer's own record (DEMO_XTOK's row: --cross_tokenizer)
            if "cross_tokenizer" not in run and config.is_file():
                run["cross_tokenizer"] = json.loads(config.read_text()).get("cross_tokenizer") or ""
            row.update(label=run["label"], objective=_objective(run), wall_s=run["wall_s"], steps=run["steps"])
            row.update(alpha=run["alpha"], on_policy=bool(run.get("on_policy_fraction")))
            student = Path(run.get("student", ""))
            from_row = student.name == "final" and student.parent.parent.resolve() == run_dir.parent.resolve()
            row["start"] = student.parent.name if from_row else None
            row["teacher_cache"] = run.get("teacher_cache", False)
            curves = read_curves(run_dir)
            row["tokens_per_s"] = _steady(curves.get("Train/tokens_per_s", []))
            row["step_s"] = _steady(curves.get("Train/step_s", []))
            row["eval_ppl"] = curves.get("Eval/ppl", [])
            row["generate_tokens_per_s"] = _steady(curves.get("Generate/tokens_per_s", []))
        else:
            meta = out_dir / "eval" / f"{name}.label"
            row["label"] = meta.read_text().strip() if meta.is_file() else name
        rows.append(row)
    return rows


def _steady(points: list[tuple[int, float]]) -> float | None:
    """Mean rate without the first window (it includes DeepSpeed's first-step set-up), or None when nothing was
    logged."""
    steady = [v for _, v in points[1:]] or [v for _, v in points]
    return sum(steady) / len(steady) if steady else None


def _objective(run: dict) -> str:
    if run["alpha"] >= 1.0:
        return "CE only (alpha=1)"
    kd = f"{run['loss']}, T={run['temperature']:g}"
    if run.get("cross_tokenizer"):  # README "Teachers with another tokenizer": the divergence it binarises
        kd = f"{run['cross_tokenizer']} ({kd}), another tokenizer"
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
    cache (run ``cached``) against forward KL from the live teacher (run ``live``): wall time and held-out
    perplexity."""
    lines = [
        f"teacher cache: one pass of {cache['wall_s']:.0f} s, top-{cache['top_k']}, {cache['bytes_per_token']:.1f} "
        "bytes/token; "
        f"KL(teacher || reconstructed) per token mean {cache['kl_full_per_token']:.3g}, p99 "
        f"{cache.get('kl_full_p99', float('nan')):.3g} "
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


SHARED = (1, 2, 4)  # students sharing one teacher cache pass


def ppl_at(curve: list[tuple[int, float]], step: float) -> float | None:
    """Held-out perplexity after ``step`` optimizer steps (a float: the step an equal budget buys) from a run's eval
    curve [(step, ppl), ...]: the eval's value at an eval step, else linear in log-perplexity (the held-out CE)
    between the two evals around it. None before the first eval or past the last (not measured). Exact at eval steps
    only: the demo's JSONs hold the learning rate constant after warm-up, so a run stopped at step k is this run's
    state at step k."""
    exact = dict(curve).get(step)
    if exact is not None:
        return exact
    for (s0, p0), (s1, p1) in zip(curve, curve[1:]):
        if s0 < step < s1:
            w = (step - s0) / (s1 - s0)
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    return None


def equal_cost(rows: dict[str, dict], cache: dict | None, ce: str = "ce") -> list[dict]:
    """KD against CE at equal cost: every off-policy KD run (alpha < 1, not continuing another row) against the CE run.

    Cost = optimizer steps x the run's seconds per step (``Train/step_s``, eval and save left out; a live teacher's
    forward is inside it) + the teacher's share: a run from the cache pays the cache pass's wall time / n, n in
    SHARED students reading one pass. Start-up, evals and export cost every run alike and cancel. Two readings:
    - the budget of CE's run (B = its steps x its s/step): the KD steps it buys, k = (B - share) / KD's s/step, and
      KD's held-out perplexity after k steps (``ppl_at``; None where k is before KD's first eval or <= 0);
    - KD's full run: its cost, and the CE steps that cost buys (CE's curve ends at its own steps: beyond, unmeasured).
    ``pays``: KD's perplexity in CE's budget is below CE's at its last step (None where not measured).
    Returns one dict per (KD run, sharing): row, label, teacher ("cache / n" or "live"), share_s, step_s, ce_step_s,
    steps_in_ce_budget, ppl, ce_ppl, ce_budget_s, kd_cost_s, ce_steps_for_kd_cost, pays.
    """
    base = rows.get(ce)
    if not base or not base.get("step_s") or not base.get("eval_ppl"):
        return []
    ce_budget = base["steps"] * base["step_s"]
    ce_ppl = ppl_at(base["eval_ppl"], base["steps"])
    out = []
    for r in rows.values():
        if r is base or not r.get("step_s") or r.get("start") or r.get("alpha", 1.0) >= 1.0 or r.get("on_policy"):
            continue
        if r.get("teacher_cache"):
            if not cache:
                continue
            shares = [(f"cache / {n}", cache["wall_s"] / n) for n in SHARED]
        else:
            shares = [("live", 0.0)]
        for teacher, share in shares:
            k = (ce_budget - share) / r["step_s"]
            ppl = ppl_at(r["eval_ppl"], k) if k > 0 else None
            kd_cost = r["steps"] * r["step_s"] + share
            out.append(
                {
                    "row": r["name"],
                    "label": r["label"],
                    "teacher": teacher,
                    "share_s": share,
                    "step_s": r["step_s"],
                    "ce_step_s": base["step_s"],
                    "ce_budget_s": ce_budget,
                    "steps_in_ce_budget": max(k, 0.0),
                    "ppl": ppl,
                    "ce_ppl": ce_ppl,
                    "kd_cost_s": kd_cost,
                    "ce_steps_for_kd_cost": kd_cost / base["step_s"],
                    "pays": None if ppl is None or ce_ppl is None else ppl < ce_ppl,
                }
            )
    return out


def equal_cost_markdown(lines: list[dict], ce_steps: int) -> str:
    head = (
        "| KD run | teacher's share | s/step (KD / CE) | KD steps in CE's cost (s) | KD held-out ppl there "
        f"| CE held-out ppl ({ce_steps} steps) | KD pays at equal cost? | KD's full run costs | CE steps for that |"
    )
    out = [head, "|" + "---|" * 9]
    for e in lines:
        k = e["steps_in_ce_budget"]
        if e["ppl"] is not None:
            ppl, pays = f"{e['ppl']:.1f}", "yes" if e["pays"] else "**no**"
        elif k <= 0:
            ppl, pays = "-", "**no**: the teacher's share alone costs more than CE's run"
        else:
            ppl, pays = "not measured (before KD's first eval)", "not measured"
        out.append(
            f"| {e['label']} | {e['teacher']}: {e['share_s']:.0f} s | {e['step_s']:.2f} / {e['ce_step_s']:.2f} "
            f"| {k:.1f} ({e['ce_budget_s']:.0f} s) | {ppl} | {e['ce_ppl']:.1f} | {pays} | {e['kd_cost_s']:.0f} s "
            f"| {e['ce_steps_for_kd_cost']:.1f} |"
        )
    return "\n".join(out) + "\n"


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
    by_name = {r["name"]: r for r in rows}
    costs = equal_cost(by_name, cache)
    cost_table = equal_cost_markdown(costs, by_name["ce"]["steps"]) if costs else ""
    (out_dir / "results.json").write_text(
        json.dumps({"rows": rows, "teacher_cache": cache, "equal_cost": costs}, indent=2)
    )
    (out_dir / "results.md").write_text(table)
    if cost_table:
        (out_dir / "equal_cost.md").write_text(cost_table)
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
    if cost_table:
        print("\nKD against CE at equal cost (the teacher's forward or its cache pass counted):")
        print(cost_table, end="")
    if cache:
        print(cache_summary(cache, by_name))
    print(
        f"demo_report: wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
        + (f", {out_dir / 'equal_cost.md'}" if cost_table else "")
        + (f", {out_dir / 'curves.png'}" if trained else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
