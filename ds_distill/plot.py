"""Loss curves of one or more runs in one PNG, read from the files DeepSpeed's csv_monitor writes.

    python -m ds_distill.plot runs/a runs/b --out curves.png [--labels kd,ce]     # each run's own train and eval loss

``plot_runs`` draws each run's own objective (comparable between runs of one objective only); ``plot_metric`` draws
one metric of every run on one panel (the held-out CE, comparable across objectives; scripts/demo_report.py).

The trainer configures the csv_monitor with output_path RUN_DIR/monitor and job_name "train". DeepSpeed's
csvMonitor (deepspeed/monitor/csv_monitor.py) then writes one file per event, RUN_DIR/monitor/train/{name}.csv,
where `name` is the event name with "/" and " " replaced by "_" ("Train/loss" -> Train_loss.csv). Each file has
the header row `step,<last part of the event name>` and then `step,value` rows. A resumed run opens a new monitor
that appends a second header row and may write steps again; the last value written for a step wins.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from ds_distill.common import UsageError, print_error

MONITOR_SUBDIR = Path("monitor") / "train"
# (event, line style) drawn per run: train solid, eval dashed with markers since eval points are sparse.
CURVES = (("Train/loss", "-"), ("Eval/loss", "--o"))


def _event_name(stem: str) -> str:
    """Event name from a csv_monitor file stem. The monitor maps both "/" and "_" to "_", so this is a guess:
    the first "_" becomes "/" ("Train_grad_norm" -> "Train/grad_norm"), which is right for the trainer's events
    (one "/" after a "Train"/"Eval" group) and keeps DeepSpeed's own "Train/Samples/..." events distinct.
    """
    return stem.replace("_", "/", 1)


def read_curves(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{event name: [(step, value), ...] sorted by step} for every csv_monitor file of `run_dir`.

    Steps are whatever the trainer logged them against (optimizer steps); values are floats as written.
    """
    folder = Path(run_dir) / MONITOR_SUBDIR
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise UsageError(f"no metrics under {Path(run_dir) / 'monitor'}: was the run started with a csv_monitor block?")
    curves = {}
    for path in files:
        by_step: dict[int, float] = {}
        with open(path, newline="") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or row[0] == "step":  # header, repeated after each resume
                    continue
                try:
                    by_step[int(row[0])] = float(row[1])
                except (ValueError, IndexError):
                    raise UsageError(
                        f"{path}:{lineno}: expected 'step,value', got {','.join(row)!r}: is this a csv_monitor file?"
                    )
        curves[_event_name(path.stem)] = sorted(by_step.items())
    return curves


def plot_runs(run_dirs: list[str | os.PathLike], out_png: str | os.PathLike, labels: list[str] | None = None) -> None:
    """Draw Train/loss (solid) and Eval/loss (dashed) of each run, one colour per run, into `out_png`.

    `labels` name the runs in the legend (default: the run directory names). A run without one of the two
    curves just lacks that line; a run with neither is an error.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    labels = list(labels) if labels is not None else [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise UsageError(f"{len(labels)} labels for {len(run_dirs)} runs: give one label per run directory")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        curves = read_curves(run_dir)
        if not any(name in curves for name, _ in CURVES):
            found = ", ".join(sorted(curves))
            raise UsageError(
                f"{run_dir} has no Train/loss or Eval/loss metrics (found: {found}): was it logged by ds_distill.train?"
            )
        color = f"C{i}"
        for name, style in CURVES:
            if name in curves:
                steps, values = zip(*curves[name]) if curves[name] else ((), ())
                ax.plot(steps, values, style, color=color, label=f"{label} {name.split('/')[0].lower()}", markersize=3)
    _save(fig, ax, "loss (per supervised token)", out_png)


def plot_metric(
    run_dirs: list[str | os.PathLike],
    out_png: str | os.PathLike,
    labels: list[str],
    *,
    metric: str = "Eval/ce",
    offsets: list[int] | None = None,
    ylabel: str = "held-out CE (nats per token)",
) -> dict[str, list[tuple[int, float]]]:
    """One panel: `metric` of every run against the optimizer step, one line per run, into `out_png`.

    For comparing runs with different objectives: their own losses are not on one scale, but the held-out CE of the
    labels (``Eval/ce``, what the trainer's eval reports as ``ppl = exp(ce)``) is. `offsets` shift a run's steps (a run
    that continues another's student starts at that run's last step). A run without the metric is an error.
    Returns {label: [(shifted step, value), ...]}, the points drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offsets = list(offsets) if offsets is not None else [0] * len(run_dirs)
    if not len(labels) == len(offsets) == len(run_dirs):
        raise UsageError(
            f"{len(labels)} labels and {len(offsets)} offsets for {len(run_dirs)} runs: give one of each per run "
            "directory"
        )
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = {}
    for i, (run_dir, label, offset) in enumerate(zip(run_dirs, labels, offsets)):
        curves = read_curves(run_dir)
        if not curves.get(metric):
            raise UsageError(
                f"{run_dir} has no {metric} metric (found: {', '.join(sorted(curves))}): was it trained with an eval "
                "set and --eval_steps?"
            )
        drawn[label] = [(offset + step, value) for step, value in curves[metric]]
        ax.plot(*zip(*drawn[label]), "-o", color=f"C{i}", label=label, markersize=4)
    _save(fig, ax, ylabel, out_png)
    return drawn


def _save(fig, ax, ylabel: str, out_png: str | os.PathLike) -> None:
    """Label the step axis, add grid and legend, write the PNG (its folder made) and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with monitor/train/*.csv)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", help="comma-separated legend names, one per run (default: directory names)")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.run_dirs, args.out, args.labels.split(",") if args.labels else None)
    except UsageError as e:
        print_error(e)
        raise SystemExit(2)
    print(f"plot: wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
