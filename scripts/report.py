"""Our runs beside the paper's: Tables 1-3 in the paper's layout, figures, and the CPU study.

Reads ``results/paper.yaml`` (the paper's tables as data), every run directory holding a
``summary.json`` under the given roots (default ``outputs/`` and ``multirun/``), optionally the
runs of a wandb project (``--wandb ENTITY/PROJECT``, online), and ``results/cpu/runs.json``
(written by ``scripts/cpu_study.py``). Writes::

    results/tables.md          Tables 1-3: paper train/test, ours as mean +- std (n seeds) at the
                               best and the final epoch, our delta vs our baseline beside the
                               paper's; "not run" where none ran
    results/README_rows.md     paper row -> command -> status, with the GPU cost of each row
                               (also written into README.md between its paper-rows markers)
    results/figures/*.png      Fig. 3 (accuracy vs epoch, log-log), accuracy / loss / logit norm
                               vs alpha (Fig. 7): from runs that exist
    results/cpu/README.md      the CPU study's tables, the paper's claims tested, and its plots

The work is done in the package: run loading in ``powergrad.results``, tables in
``powergrad.tables``, plots in ``powergrad.plots``, the CPU study in ``powergrad.study``. Usage::

    python scripts/report.py [--runs DIR ...] [--dataset imagenet] [--wandb ENTITY/PROJECT]
    python scripts/report.py --cpu-only [--cpu-dir results/cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from powergrad.results import find_runs, load_paper, load_wandb_runs
from powergrad.study import render_cpu_study
from powergrad.tables import (
    README_END,
    README_START,
    paper_figures,
    paper_tables,
    readme_rows,
    update_readme_block,
)

__all__ = ["README_END", "README_START", "main", "update_readme_block"]

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """CLI: write the tables, the README rows, figures and the CPU study's report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="*",
        default=[str(ROOT / "outputs"), str(ROOT / "multirun")],
        help="directories searched for run directories (summary.json)",
    )
    parser.add_argument("--dataset", default="imagenet", help="dataset a run must use to count")
    parser.add_argument("--wandb", default=None, help="ENTITY/PROJECT to read runs from (online)")
    parser.add_argument("--paper", default=str(ROOT / "results" / "paper.yaml"))
    parser.add_argument("--out", default=str(ROOT / "results"), help="output directory")
    parser.add_argument("--cpu-dir", default=None, help="CPU study dir (default OUT/cpu)")
    parser.add_argument("--cpu-only", action="store_true", help="render only the CPU study")
    args = parser.parse_args(argv)

    out = Path(args.out)
    cpu_dir = Path(args.cpu_dir) if args.cpu_dir else out / "cpu"
    paper = load_paper(args.paper)
    if args.cpu_only:
        text = render_cpu_study(cpu_dir, paper)
        print(f"wrote {cpu_dir / 'README.md'}" if text else f"no {cpu_dir / 'runs.json'}")
        return 0 if text else 1

    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(args.runs)
    if args.wandb:
        runs += load_wandb_runs(args.wandb)
    (out / "tables.md").write_text(paper_tables(paper, runs, args.dataset))
    rows_text = readme_rows(paper, runs, args.dataset)
    (out / "README_rows.md").write_text(rows_text)
    if out.resolve() == (ROOT / "results").resolve():
        update_readme_block(ROOT / "README.md", rows_text)
    figures = paper_figures(runs, paper, args.dataset, out / "figures")
    cpu = render_cpu_study(cpu_dir, paper)
    names = {r["config"]["experiment_name"] for r in runs if r["config"].get("experiment_name")}
    print(
        f"{len(runs)} finished runs found ({len(names)} experiment names); wrote "
        f"{out / 'tables.md'}, {out / 'README_rows.md'}, {len(figures)} figure(s)"
        + (f", {cpu_dir / 'README.md'}" if cpu else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
