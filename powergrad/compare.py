"""Side-by-side comparison of finished runs: a table (markdown + json) and accuracy-vs-epoch plot.

Runs automatically at the end of a Hydra multirun (:class:`CompareCallback`, configured in
configs/train.yaml), writing ``compare.md``, ``compare.json`` and ``compare.png`` into the sweep
directory. Also usable by hand on any run directories::

    python -m powergrad.compare multirun/DATE/TIME_ID/*  [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from powergrad.fileio import atomic_write
from powergrad.results import load_runs

__all__ = ["COLUMNS", "CompareCallback", "compare_runs", "format_table", "load_runs", "plot_runs"]

# (header, summary key, format) of the table's columns. "val top-1 %" is the final epoch's (as
# train.py's summary ``val_top1``); the best epoch's and its epoch follow (powergrad.results fills
# them in for runs whose summary predates ``val_top1_best`` / ``best_epoch``).
COLUMNS: list[tuple[str, str, str]] = [
    ("method", "method", "{}"),
    ("alpha", "alpha", "{:g}"),
    ("train top-1 %", "train_top1", "{:.2f}"),
    ("val top-1 %", "val_top1_final", "{:.2f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("logit norm", "logit_norm", "{:.2f}"),
    ("wall s", "wall_s", "{:.0f}"),
    ("best val top-1 %", "val_top1_best", "{:.2f}"),
    ("best epoch", "best_epoch", "{}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def format_table(runs: list[dict[str, Any]]) -> str:
    """The runs as a markdown table, one row per run, in COLUMNS order (val top-1 % is the
    final epoch's; the best epoch's and its number are the last two columns)."""
    header = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = [
        "| " + " | ".join(_cell(r["summary"].get(key), fmt) for _, key, fmt in COLUMNS) + " |"
        for r in runs
    ]
    return "\n".join([header, rule, *rows])


def plot_runs(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Train (dashed) and val (solid) top-1 against the epoch, one colour per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        s, color = run["summary"], f"C{i}"
        label = s.get("method", Path(run["run_dir"]).name)
        if s.get("alpha") is not None:
            label += f" (alpha={s['alpha']:g})"
        train = [(r["epoch"], r["train_top1"]) for r in run["history"] if "train_top1" in r]
        val = [(r["epoch"], r["val_top1"]) for r in run["history"] if "val_top1" in r]
        if train:
            ax.plot(*zip(*train, strict=True), "--", color=color, label=f"{label} train")
        if val:
            ax.plot(*zip(*val, strict=True), "-", color=color, label=f"{label} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    first = runs[0]["summary"] if runs else {}
    ax.set_title(f"{first.get('model', '')} on {first.get('dataset', '')}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_runs(
    run_dirs: Iterable[str | Path], out_dir: str | Path, *, total_wall_s: float | None = None
) -> str:
    """Write compare.md / compare.json / compare.png into ``out_dir`` and return the table."""
    out_dir = Path(out_dir)
    runs = load_runs(run_dirs, finished_only=False)  # a sweep's cut-short jobs are shown too
    if not runs:
        return ""
    table = format_table(runs)
    note = f"\n\ntotal wall time: {total_wall_s:.0f} s" if total_wall_s is not None else ""
    (out_dir / "compare.md").write_text(table + note + "\n")
    rows = [
        {"run_dir": r["run_dir"], **{key: r["summary"].get(key) for _, key, _ in COLUMNS}}
        for r in runs
    ]
    atomic_write(
        out_dir / "compare.json",
        json.dumps({"rows": rows, "total_wall_s": total_wall_s}, indent=2) + "\n",
    )
    plot_runs(runs, out_dir / "compare.png")
    return table + note


class CompareCallback(Callback):
    """Hydra callback: after a multirun, compare the jobs of the sweep directory."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Note the sweep's start time, for its total wall time."""
        self._start = time.perf_counter()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print the side-by-side table and write it, with the plot, into the sweep dir."""
        sweep_dir = Path(config.hydra.sweep.dir)
        start = getattr(self, "_start", None)
        total = time.perf_counter() - start if start is not None else None
        table = compare_runs(
            [p for p in sweep_dir.iterdir() if p.is_dir()], sweep_dir, total_wall_s=total
        )
        if table:
            print(f"\n{table}\n\nwritten: {sweep_dir}/compare.md, compare.json, compare.png")


def main(argv: list[str] | None = None) -> None:
    """CLI: compare run directories given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", default=".", help="where compare.md/json/png go")
    args = parser.parse_args(argv)
    print(compare_runs(args.run_dirs, args.out) or "no run with a summary.json")


if __name__ == "__main__":
    main()
