"""Side-by-side comparison of finished runs: seeds averaged per configuration, per-run rows, a plot.

Runs automatically at the end of a Hydra multirun (:class:`CompareCallback`, configured in
configs/train.yaml), writing into the sweep directory:

- ``compare.md``: one row per configuration (model, schedule, batch, method, alpha) with its
  seeds and their number n; every metric is the mean ± sample std over those seeds (the value
  alone when n = 1; a cell's own ``(n=k)`` when fewer seeds have that metric, e.g. a diverged run);
- ``compare.csv``: one row per run (its directory, configuration key, seed and metrics);
- ``compare.json``: the per-run ``rows`` (as the CSV) and the ``configurations``
  (mean, std, n of each metric);
- ``compare.png``: train (dashed) and val (solid) top-1 against the epoch, one colour per
  configuration.

Also usable by hand on any run directories (or a sweep folder, which stands for its jobs)::

    python -m powergrad.compare multirun/DATE/TIME_ID/*  [--out DIR]

Nothing is left out silently: a folder without summary.json (a crashed, killed or running run),
a file that cannot be read whole (a corrupt summary.json, a metrics.jsonl line cut short) and a
copy of a run already read (the same wandb id, recorded run directory, or content; counted once)
each get a note, printed and written under the table. A missing run folder, an ``--out`` that
cannot be written (it is created when missing) or no run at all: one line, exit status 2.

Runs are loaded by :mod:`powergrad.results` (the report's loader); "seeds of one configuration"
is its :func:`~powergrad.results.by_configuration`, the wandb job type's key.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from powergrad.fileio import atomic_write
from powergrad.results import (
    CONFIG_FILE,
    RunFileWarning,
    Stat,
    by_configuration,
    load_run,
    load_runs,
    mean_std,
    read_history,
)
from powergrad.tracking import METRICS_FILE, SUMMARY_FILE

__all__ = [
    "LABELS",
    "METRICS",
    "CompareCallback",
    "CompareError",
    "compare_runs",
    "configurations",
    "format_table",
    "load_comparable",
    "load_runs",
    "plot_runs",
    "run_rows",
]

# (header, summary key) of what names a configuration; seeds and n follow them in the table.
LABELS: list[tuple[str, str]] = [
    ("model", "model"),
    ("sched", "sched"),
    ("batch", "batch_size"),
]
# (header, summary key, decimals) of the averaged metrics. "val top-1 %" is the final epoch's (as
# train.py's summary ``val_top1``); the best epoch's and its epoch close the row (powergrad.results
# fills them in for runs whose summary predates ``val_top1_best`` / ``best_epoch``).
METRICS: list[tuple[str, str, int]] = [
    ("train top-1 %", "train_top1", 2),
    ("val top-1 %", "val_top1_final", 2),
    ("train loss", "train_loss", 4),
    ("val loss", "val_loss", 4),
    ("logit norm", "logit_norm", 2),
    ("wall s", "wall_s", 0),
    ("best val top-1 %", "val_top1_best", 2),
    ("best epoch", "best_epoch", 0),
]
# Per-run columns of compare.csv / compare.json's rows, after run_dir and config.
RUN_KEYS = ["model", "method", "alpha", "sched", "batch_size", "seed", *(k for _, k, _ in METRICS)]


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fmt_stat(stat: Stat | None, digits: int, n_runs: int) -> str:
    """``mean ± std`` over the seeds; the value alone for one seed; ``(n=k)`` when fewer than
    the configuration's n seeds have this metric; "-" when none has it."""
    if stat is None:
        return "-"
    if stat.n == 1:
        text = f"{stat.mean:.{digits}f}"
    else:
        d = max(digits, 1)  # an average of whole epochs or seconds keeps one decimal
        text = f"{stat.mean:.{d}f} ± {stat.std:.{d}f}"
    return text if stat.n == n_runs else f"{text} (n={stat.n})"


def configurations(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per configuration (its seeds' runs): the label fields (model, sched,
    batch_size, method, alpha), ``key``, ``seeds``, ``n`` and a :class:`Stat` per metric key."""
    out = []
    for key, group in by_configuration(runs).items():
        first = group[0]["summary"]
        out.append(
            {
                "key": key,
                **{k: first.get(k) for _, k in LABELS},
                "method": first.get("method"),
                "alpha": first.get("alpha"),
                "seeds": [r["summary"].get("seed") for r in group],
                "n": len(group),
                "stats": {k: mean_std(r["summary"].get(k) for r in group) for _, k, _ in METRICS},
                "runs": group,
            }
        )
    return out


def format_table(runs: list[dict[str, Any]]) -> str:
    """The runs as a markdown table, one row per configuration: model, sched, batch, the seeds and
    their number n, method, alpha, then each metric as mean ± std over the seeds (val top-1 % is
    the final epoch's; the best epoch's and its number are the last two columns)."""
    headers = [h for h, _ in LABELS] + ["seed", "n", "method", "alpha"] + [h for h, _, _ in METRICS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for c in configurations(runs):
        cells = [_text(c[k]) for _, k in LABELS]
        cells += [",".join(map(_text, c["seeds"])), str(c["n"]), _text(c["method"])]
        cells.append(_text(c["alpha"]))
        cells += [_fmt_stat(c["stats"][k], d, c["n"]) for _, k, d in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record per run: ``run_dir``, ``config`` (its configuration key) and RUN_KEYS."""
    return [
        {
            "run_dir": c_run["run_dir"],
            "config": c["key"],
            **{k: c_run["summary"].get(k) for k in RUN_KEYS},
        }
        for c in configurations(runs)
        for c_run in c["runs"]
    ]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["run_dir", "config", *RUN_KEYS], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _label(c: dict[str, Any]) -> str:
    label = f"{c['method']}"
    if c["alpha"] is not None:
        label += f" (alpha={c['alpha']:g})"
    if c["n"] > 1:
        label += f", {c['n']} seeds"
    return label


def plot_runs(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Train (dashed) and val (solid) top-1 against the epoch as a PNG: one colour per
    configuration, one line per seed (labelled once), a dot per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(configurations(runs)):
        color, label = f"C{i}", _label(c)
        for j, run in enumerate(c["runs"]):
            train = [(r["epoch"], r["train_top1"]) for r in run["history"] if "train_top1" in r]
            val = [(r["epoch"], r["val_top1"]) for r in run["history"] if "val_top1" in r]
            if train:
                ax.plot(*zip(*train, strict=True), "--", marker=".", color=color, alpha=0.8,
                        label=f"{label} train" if j == 0 else None)  # fmt: skip
            if val:
                ax.plot(*zip(*val, strict=True), "-", marker=".", color=color, alpha=0.8,
                        label=f"{label} val" if j == 0 else None)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    first = runs[0]["summary"] if runs else {}
    ax.set_title(f"{first.get('model', '')} on {first.get('dataset', '')}".strip())
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stat_json(stat: Stat | None) -> dict[str, float | int] | None:
    return None if stat is None else {"mean": stat.mean, "std": stat.std, "n": stat.n}


class CompareError(ValueError):
    """Input compare cannot use (a missing run folder, an unwritable --out); names the path."""


# Files that make a folder a run directory (train.py writes config.yaml first, summary.json last).
_RUN_FILES = (SUMMARY_FILE, CONFIG_FILE, METRICS_FILE)


def _is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in _RUN_FILES)


def _run_folders(run_dirs: Iterable[str | Path]) -> list[Path]:
    """The run folders to read, sorted: each given folder (it must exist); a sweep folder (no
    run files of its own, job folders inside) stands for its job folders."""
    out = []
    for folder in map(Path, run_dirs):
        if not folder.is_dir():
            raise CompareError(
                f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}"
            )
        jobs = [] if _is_run(folder) else [
            d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and _is_run(d)
        ]  # fmt: skip
        out += jobs or [folder]
    return sorted(out)


def _out_folder(out_dir: str | Path) -> Path:
    """``out_dir``, checked to be (or to be creatable as) a writable folder; not created."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out}: not a folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise CompareError(f"--out {out}: {existing} is not a writable folder")
    return out


def _not_compared(folder: Path) -> str:
    """Why a folder without summary.json is left out."""
    if not _is_run(folder):
        return f"{folder}: not a run folder (no {', '.join(_RUN_FILES)}): left out"
    epochs = len(read_history(folder))
    return (
        f"{folder}: no {SUMMARY_FILE}, the run crashed, was killed or is still running "
        f"({epochs} epoch(s) in {METRICS_FILE}): left out"
    )


# A run's identity when its summary names neither a wandb id nor its run directory.
_CONTENT = "config, summary and history"


def _identity(run: dict[str, Any]) -> tuple[str, str]:
    """What names one training run, whichever folder holds it: its wandb id, else the run
    directory train.py recorded in summary.json, else its whole content."""
    summary = run["summary"]
    if summary.get("wandb_id"):
        return "wandb id", str(summary["wandb_id"])
    if summary.get("run_dir"):
        return "recorded run_dir", str(summary["run_dir"])
    content = [run["config"], summary, run["history"]]
    return _CONTENT, json.dumps(content, sort_keys=True, default=str)


def _drop_copies(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each training run once (a folder copied elsewhere is the same run, not another seed);
    the folder it was trained in is kept when it is among them. Returns (runs, notes)."""
    kept: dict[tuple[str, str], dict[str, Any]] = {}
    notes = []
    for run in runs:
        key = _identity(run)
        first = kept.get(key)
        if first is None:
            kept[key] = run
            continue
        if Path(run["run_dir"]).resolve() == Path(str(run["summary"].get("run_dir"))).resolve():
            kept[key], run, first = run, first, run  # the original folder stays
        same = f"identical {_CONTENT}" if key[0] == _CONTENT else f"the same {key[0]} {key[1]}"
        notes.append(f"{run['run_dir']}: a copy of {first['run_dir']} ({same}): counted once")
    return list(kept.values()), notes


def load_comparable(run_dirs: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs of ``run_dirs`` to compare (finished or cut short, each run once) and a note
    for each folder left out or read in part (crashed, corrupt file, copy of another run).

    Raises:
        CompareError: a given folder does not exist.
    """
    runs, notes = [], []
    for folder in _run_folders(run_dirs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RunFileWarning)
            run = load_run(folder, finished_only=False)  # a sweep's cut-short jobs too
            missing = run is None and not (folder / SUMMARY_FILE).exists()
            why = _not_compared(folder) if missing else None
        notes += [str(w.message) for w in caught if issubclass(w.category, RunFileWarning)]
        notes += [why] if why else []
        runs += [run] if run else []
    runs, copies = _drop_copies(runs)
    return runs, notes + copies


def compare_runs(
    run_dirs: Iterable[str | Path], out_dir: str | Path, *, total_wall_s: float | None = None
) -> str:
    """Write compare.md / compare.csv / compare.json / compare.png into ``out_dir`` (created
    when missing) and return the table (seeds of a configuration averaged) with its notes.

    Raises:
        CompareError: a folder does not exist, ``out_dir`` cannot be written, or no folder
            holds a run (the message lists why each was left out).
    """
    out_dir = _out_folder(out_dir)
    runs, notes = load_comparable(run_dirs)
    if not runs:
        raise CompareError("no run to compare: " + ("; ".join(notes) or "no folder given"))
    table = format_table(runs)
    note = f"\n\ntotal wall time: {total_wall_s:.0f} s" if total_wall_s is not None else ""
    if notes:
        note += "\n\nnotes:\n" + "\n".join(f"- {n}" for n in notes)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "compare.md", table + note + "\n")
    rows = run_rows(runs)
    atomic_write(out_dir / "compare.csv", _csv(rows))
    configs = [
        {
            **{k: c[k] for k in ("key", "model", "sched", "batch_size", "method", "alpha")},
            "seeds": c["seeds"],
            "n": c["n"],
            **{k: _stat_json(c["stats"][k]) for _, k, _ in METRICS},
        }
        for c in configurations(runs)
    ]
    atomic_write(
        out_dir / "compare.json",
        json.dumps(
            {"rows": rows, "configurations": configs, "total_wall_s": total_wall_s, "notes": notes},
            indent=2,
        )
        + "\n",
    )
    plot_runs(runs, out_dir / "compare.png")
    return table + note


class CompareCallback(Callback):
    """Hydra callback: after a multirun, compare the jobs of the sweep directory."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Note the sweep's start time, for its total wall time."""
        self._start = time.perf_counter()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print the table and write it, the per-run CSV and the plot into the sweep dir."""
        sweep_dir = Path(config.hydra.sweep.dir)
        start = getattr(self, "_start", None)
        total = time.perf_counter() - start if start is not None else None
        jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        try:
            table = compare_runs(jobs, sweep_dir, total_wall_s=total)
        except CompareError as e:
            print(f"\ncompare: {e}")
            return
        print(
            f"\n{table}\n\nwritten: {sweep_dir}/compare.md, compare.csv (one row per run), "
            "compare.json, compare.png"
        )


def main(argv: list[str] | None = None) -> None:
    """CLI: compare run directories given on the command line (exit 2 with one line for a
    missing folder, an unwritable --out, or no run among them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders, or a sweep folder")
    parser.add_argument("--out", default=".", help="where compare.md/csv/json/png go (created)")
    args = parser.parse_args(argv)
    try:
        table = compare_runs(args.run_dirs, args.out)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{table}\n\nwritten: {Path(args.out)}/compare.md, compare.csv, compare.json, compare.png"
    )


if __name__ == "__main__":
    main()
