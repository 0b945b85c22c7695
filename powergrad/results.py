"""Finished runs and the paper's tables as data: the one loader behind compare and the report.

A run directory (written by train.py) holds ``summary.json``, ``metrics.jsonl`` (one record per
epoch) and ``config.yaml`` (the resolved config). :func:`load_run` reads one into a plain dict
``{"run_dir", "config", "summary", "history"}``; :func:`find_runs` searches folders for them;
:func:`load_wandb_runs` reads the same shape from a wandb project. ``results/paper.yaml`` (the
paper's Tables 1-3) is read by :func:`load_paper`.

Final and best test accuracy: summaries written before issue 11 carry ``val_top1`` (the last
epoch's) and ``best_val_top1``; newer ones add ``val_top1_final``, ``val_top1_best`` and
``best_epoch``. :func:`final_and_best` fills the new keys from the old ones (and ``best_epoch``
from the epoch history), so every reader uses the new names.

Seeds of one configuration are aggregated by :func:`mean_std` into a :class:`Stat`
(mean, sample std, n), printed as ``mean ± std (n=k)`` by :func:`fmt_ms`. Which runs are seeds of
one configuration: :func:`by_configuration` (the wandb job type's key, so compare's rows and the
dashboard's groups agree).
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from powergrad.tracking import METRICS_FILE, SUMMARY_FILE, config_key

__all__ = [
    "CONFIG_FILE",
    "NOT_RUN",
    "PAPER_YAML",
    "RunFileWarning",
    "Stat",
    "baseline_id",
    "by_configuration",
    "compared_test_key",
    "configuration_key",
    "final_and_best",
    "find_runs",
    "fmt_delta",
    "fmt_ms",
    "load_paper",
    "load_run",
    "load_runs",
    "load_wandb_runs",
    "mean_std",
    "paper_row",
    "paper_rows",
    "read_history",
    "runs_by_experiment",
    "summary_stat",
]

CONFIG_FILE = "config.yaml"
PAPER_YAML = Path(__file__).resolve().parents[1] / "results" / "paper.yaml"
NOT_RUN = "not run"

# Summary keys of the test (val) accuracy: the last epoch's and the best epoch's.
FINAL, BEST = "val_top1_final", "val_top1_best"


# ---------------------------------------------------------------------------------------------
# The paper


def load_paper(path: str | Path = PAPER_YAML) -> dict[str, Any]:
    """The paper's tables as data (results/paper.yaml)."""
    return yaml.safe_load(Path(path).read_text())


def paper_rows(paper: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(table key, row)`` for every row of every table, in the paper's order."""
    return [(key, row) for key, table in paper["tables"].items() for row in table["rows"]]


def paper_row(paper: dict[str, Any], row_id: str) -> tuple[str, dict[str, Any]]:
    """``(table key, row)`` of the row with id ``row_id``."""
    for table, row in paper_rows(paper):
        if row["id"] == row_id:
            return table, row
    raise KeyError(row_id)


def baseline_id(paper: dict[str, Any], table: str, row: dict[str, Any]) -> str | None:
    """The row's baseline: same table, model, schedule, batch and label smoothing, no method."""

    def key(r: dict[str, Any]) -> tuple:
        return (r["model"], r["sched"], r.get("batch", 1024), r.get("label_smoothing", 0.0))

    for r in paper["tables"][table]["rows"]:
        if r["method"] == "baseline" and key(r) == key(row):
            return r["id"]
    return None


def compared_test_key(paper: dict[str, Any], table: str) -> str:
    """The summary key ours are compared on for ``table``'s "test accuracy": best or final
    epoch, as results/paper.yaml's ``tables.<table>.test_epoch`` says (default best)."""
    return BEST if paper["tables"][table].get("test_epoch", "best") == "best" else FINAL


# ---------------------------------------------------------------------------------------------
# Runs


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def final_and_best(summary: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary`` with ``val_top1_final``, ``val_top1_best`` and ``best_epoch`` filled in.

    Older summaries have only ``val_top1`` (final) and ``best_val_top1``; the best epoch then
    comes from the epoch history (the first epoch with the highest val top-1).
    """
    out = dict(summary)
    if out.get(FINAL) is None:
        out[FINAL] = _finite(out.get("val_top1"))
    if out.get(BEST) is None:
        out[BEST] = _finite(out.get("best_val_top1"))
    scored = [
        (r["val_top1"], r["epoch"]) for r in history if _finite(r.get("val_top1")) is not None
    ]
    if out.get(BEST) is None and scored:
        out[BEST] = max(v for v, _ in scored)
    if out.get("best_epoch") is None and scored:
        best = max(v for v, _ in scored)
        out["best_epoch"] = next(e for v, e in scored if v == best)
    out.setdefault("best_epoch", None)
    return out


class RunFileWarning(UserWarning):
    """A run's file could not be read whole: the run is left out, or read without the broken
    part; the message names the file."""


def _warn(message: str) -> None:
    warnings.warn(message, RunFileWarning, stacklevel=3)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's epoch records (metrics.jsonl), [] when it has none.

    Lines that are not JSON records (a last line cut short by a kill, a corrupt line) are left
    out with a :class:`RunFileWarning` naming the file and the lines.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        _warn(f"{path}: not readable ({e.strerror}); the run's epochs are left out")
        return []
    records, broken = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            broken.append(number)
    if broken:
        where = (
            "its last line is cut short"
            if broken == [len(lines)]
            else f"line(s) {', '.join(map(str, broken))} are not JSON records"
        )
        _warn(f"{path}: {where}; read the {len(records)} other epoch record(s)")
    return records


def _read_summary(path: Path) -> dict[str, Any] | None:
    """summary.json as a dict; None (with a RunFileWarning naming it) when it is not one."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        _warn(f"{path}: not readable as JSON ({e}); the run is left out")
        return None
    if not isinstance(summary, dict):
        _warn(f"{path}: holds a {type(summary).__name__}, not a summary; the run is left out")
        return None
    return summary


def _read_config(path: Path) -> dict[str, Any] | None:
    """config.yaml as a dict; None when absent or (with a RunFileWarning) unreadable."""
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        _warn(f"{path}: not readable as YAML ({first}); the run is read without its config")
        return None
    if not isinstance(config, dict):
        _warn(f"{path}: not a config mapping; the run is read without its config")
        return None
    return config


def load_run(run_dir: str | Path, *, finished_only: bool = True) -> dict[str, Any] | None:
    """``{"run_dir", "config", "summary", "history"}`` of a run directory, or None.

    None when there is no readable summary.json; with ``finished_only`` (the report's rule)
    also when config.yaml is missing or the run stopped before its budget
    (``trainer.epochs``): a run cut short (e.g. diverged) is not a result for a paper row.
    ``config`` is {} when absent. A file that cannot be read whole is named in a
    :class:`RunFileWarning` (see :func:`read_history`).
    """
    run_dir = Path(run_dir)
    summary_path, config_path = run_dir / SUMMARY_FILE, run_dir / CONFIG_FILE
    if not summary_path.is_file():
        return None
    summary = _read_summary(summary_path)
    if summary is None:
        return None
    config = _read_config(config_path)
    trainer = (config or {}).get("trainer")
    epochs = trainer.get("epochs") if isinstance(trainer, dict) else None
    if finished_only and (config is None or summary.get("epochs") != epochs):
        return None
    history = read_history(run_dir)
    return {
        "run_dir": str(run_dir),
        "config": config or {},
        "summary": final_and_best(summary, history),
        "history": history,
    }


def load_runs(
    run_dirs: Iterable[str | Path], *, finished_only: bool = True
) -> list[dict[str, Any]]:
    """:func:`load_run` of each directory (sorted), leaving out the Nones."""
    runs = (load_run(d, finished_only=finished_only) for d in sorted(Path(d) for d in run_dirs))
    return [r for r in runs if r is not None]


def find_runs(roots: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every finished run under ``roots`` (searched recursively for summary.json)."""
    return [
        run
        for root in map(Path, roots)
        if root.exists()
        for run in load_runs(p.parent for p in root.rglob(SUMMARY_FILE))
    ]


def load_wandb_runs(path: str) -> list[dict[str, Any]]:
    """Finished runs of an online wandb project ``ENTITY/PROJECT`` in :func:`load_run` form."""
    import wandb

    runs = []
    for r in wandb.Api().runs(path, filters={"state": "finished"}):
        config = {k: v for k, v in r.config.items() if not k.startswith("_")}
        if "trainer" not in config or "data" not in config:
            continue
        summary = {k: v for k, v in r.summary.items() if not k.startswith("_")}
        history = [
            {"epoch": h["epoch"], "train_top1": h.get("train/top1"), "val_top1": h.get("val/top1")}
            for h in r.scan_history(keys=["epoch", "train/top1", "val/top1"])
        ]
        if summary.get("epochs") == config["trainer"]["epochs"]:
            summary = final_and_best(summary, history)
            runs.append(
                {"run_dir": r.url, "config": config, "summary": summary, "history": history}
            )
    return runs


def runs_by_experiment(runs: list[dict[str, Any]], dataset: str) -> dict[str, list[dict]]:
    """Runs on ``dataset`` grouped by ``experiment_name`` (the seeds of one configuration)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        cfg = run["config"]
        if cfg.get("experiment_name") and cfg.get("data", {}).get("name") == dataset:
            out[cfg["experiment_name"]].append(run)
    return out


def configuration_key(run: dict[str, Any]) -> str:
    """The run's configuration without its seed: :func:`powergrad.tracking.config_key` of its
    resolved config (the wandb job type of a sweep's jobs), so two runs share a key exactly when
    they differ only in seed and run plumbing (paths, threads, logger).

    A run without config.yaml (a wandb run without one, a hand-made folder) gets a key from its
    summary's model, method, alpha, schedule, batch, label smoothing, dataset and epochs.
    """
    cfg = run.get("config") or {}
    if all(k in cfg for k in ("model", "method", "sched", "trainer")):
        return config_key(cfg)
    s = run["summary"]
    keys = ("model", "method", "alpha", "sched", "batch_size", "label_smoothing", "dataset")
    return " ".join(f"{s.get(k)}" for k in (*keys, "epochs"))


def by_configuration(runs: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The runs grouped by :func:`configuration_key` (the seeds of each configuration), in the
    order each configuration first appears."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(configuration_key(run), []).append(run)
    return out


# ---------------------------------------------------------------------------------------------
# Seeds: mean, std, n


class Stat(NamedTuple):
    """Mean and sample standard deviation of ``n`` seeds (std 0 when n == 1)."""

    mean: float
    std: float
    n: int


def mean_std(values: Iterable[float | None]) -> Stat | None:
    """:class:`Stat` of the finite values, None when there is none."""
    vals = [v for v in map(_finite, values) if v is not None]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Stat(statistics.fmean(vals), std, len(vals))


def summary_stat(runs: list[dict[str, Any]], key: str) -> Stat | None:
    """:func:`mean_std` of summary key ``key`` over the runs."""
    return mean_std(r["summary"].get(key) for r in runs)


def fmt_ms(stat: tuple[float, float, int] | None, digits: int = 2) -> str:
    """``mean ± std (n=k)``, or "not run"."""
    if stat is None:
        return NOT_RUN
    mean, std, n = stat
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def fmt_delta(a: tuple | None, b: tuple | None, digits: int = 2) -> str:
    """Difference of two means ± the standard error of the difference, or "-"."""
    if a is None or b is None:
        return "-"
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    return f"{a[0] - b[0]:+.{digits}f} ± {se:.{digits}f}"
