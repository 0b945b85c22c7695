"""The paper's Tables 1-3 beside our runs, and the README's "paper row -> command -> status" rows.

Pure functions of ``results/paper.yaml`` (:func:`powergrad.results.load_paper`) and finished runs
(:func:`powergrad.results.find_runs`); ``scripts/report.py`` writes what they return. A run fills
a paper row when its config's ``experiment_name`` is the row's ``experiment`` and its dataset is
the one asked for (smoke runs on digits never fill an ImageNet row). Ours are mean ± std (n) over
seeds; the test accuracy compared with the paper's is the best or the final epoch's, as
paper.yaml's ``test_epoch`` says per table (both are shown).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from powergrad.plots import plot_accuracy_loglog, plot_vs_alpha
from powergrad.results import (
    NOT_RUN,
    baseline_id,
    compared_test_key,
    fmt_delta,
    fmt_ms,
    mean_std,
    paper_rows,
    runs_by_experiment,
    summary_stat,
)

__all__ = [
    "METHOD_NAMES",
    "MODEL_NAMES",
    "README_END",
    "README_START",
    "SWEEPS",
    "V100_IMAGES_PER_S",
    "experiment_budget",
    "gpu_hours",
    "paper_figures",
    "paper_tables",
    "readme_rows",
    "row_name",
    "sweep_grid",
    "update_readme_block",
]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGENET_TRAIN_IMAGES = 1_281_167

# Assumed training throughput of one V100 (images/s, fp16 autocast, channels_last, DALI, 224 px),
# used only to estimate the cost of each row. ResNet-50: NVIDIA DeepLearningExamples report about
# 1,150-1,270 img/s per V100 for ResNet-50 v1.5 with mixed precision; the others are scaled from
# it by their FLOPs (ResNet-18 1.8, ResNet-50 4.1, ResNet-101 7.8 GFLOPs) with a discount for
# memory-bound layers (SE blocks, the small ResNet-18 convs). Estimates, not measurements.
V100_IMAGES_PER_S: dict[str, int] = {
    "resnet18": 2500,
    "resnet18_nonorm": 2500,
    "seresnet18": 2000,
    "resnet50": 1150,
    "seresnet50": 850,
    "resnet101": 650,
}

# Alpha grid searches of the supplementary material: configs/sweep/<name>.yaml.
SWEEPS: dict[str, dict[str, Any]] = {
    "resnet18_alpha": {"model": "resnet18", "epochs": 50},
    "resnet50_alpha": {"model": "resnet50", "epochs": 50},
}

TABLE_TITLES = {"table1": "Table 1", "table2": "Table 2", "table3": "Table 3"}
MODEL_NAMES = {
    "seresnet50": "SE-ResNet-50",
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "seresnet18": "SE-ResNet-18",
    "resnet18": "ResNet-18",
    "resnet18_nonorm": "ResNet-18 (no norm)",
}
METHOD_NAMES = {
    "baseline": "baseline",
    "pgt": "PGT",
    "gc": "GC",
    "agc": "AGC",
    "gc_pgt": "GC + PGT",
    "agc_pgt": "AGC + PGT",
}


def gpu_hours(model: str, epochs: int, images: int = IMAGENET_TRAIN_IMAGES) -> float:
    """Estimated V100-hours of one training run: epochs x images / assumed V100 throughput."""
    return epochs * images / V100_IMAGES_PER_S[model] / 3600.0


def _row_label(table: str, row: dict[str, Any]) -> list[str]:
    alpha = "-" if row["alpha"] is None else f"{row['alpha']:g}"
    method = METHOD_NAMES[row["method"]]
    if table == "table1":
        return [MODEL_NAMES[row["model"]], row["sched"], method, alpha]
    if table == "table2":
        return [str(row["batch"]), method, alpha]
    ls = "0.1" if row.get("label_smoothing") else "no"
    return [str(row["row"]), row["sched"], ls, alpha]


def row_name(table: str, row: dict[str, Any]) -> str:
    """A row in words, e.g. "ResNet-50, cosine, PGT 0.05" or "batch 256, AGC + PGT 0.25"."""
    method = METHOD_NAMES[row["method"]]
    if row["alpha"] is not None:
        method += f" {row['alpha']:g}"
    if table == "table1":
        return f"{MODEL_NAMES[row['model']]}, {row['sched']}, {method}"
    if table == "table2":
        return f"batch {row['batch']}, {method}"
    ls = ", LS 0.1" if row.get("label_smoothing") else ""
    return f"row {row['row']} (ResNet-50, {row['sched']}{ls}, {method})"


_HEADERS = {
    "table1": ["model", "sched", "method", "alpha"],
    "table2": ["batch", "method", "alpha"],
    "table3": ["row", "sched", "LS", "alpha"],
}


_EPOCH_WORDS = {"val_top1_best": "best epoch", "val_top1_final": "final epoch"}


def _test_note(paper: dict[str, Any], table: str) -> str:
    """The table's note on which of our test accuracies is compared with the paper's, and why."""
    key = compared_test_key(paper, table)
    why = paper["tables"][table].get("test_epoch_why", "")
    return f"Ours test is the {_EPOCH_WORDS[key]}'s top-1 (results/paper.yaml): {why}".rstrip()


def paper_tables(paper: dict[str, Any], runs: list[dict[str, Any]], dataset: str) -> str:
    """Tables 1-3 in the paper's layout with our runs (mean ± std, n) and deltas beside them.

    Ours test is the best or final epoch's, as the table's ``test_epoch`` in paper.yaml says; the
    other one is shown beside it, and the deltas and Table 3's gap use the compared one.
    """
    groups = runs_by_experiment(runs, dataset)
    rows_by_id = {row["id"]: row for _, row in paper_rows(paper)}
    out = [
        "# The paper's tables beside our runs",
        "",
        f"Generated by `python scripts/report.py` from run directories on `{dataset}`. Accuracies "
        "are top-1 %; ours are mean ± sample std over n seeds. Δ test is the row's test accuracy "
        "minus its baseline's (paper: single runs; ours: difference of means ± its standard "
        "error). Rows without a finished run say *not run*.",
    ]
    for table, tab in paper["tables"].items():
        key = compared_test_key(paper, table)
        other = "val_top1_final" if key == "val_top1_best" else "val_top1_best"
        headers = [
            *_HEADERS[table],
            "paper train",
            "paper test",
            "ours train",
            f"ours test ({_EPOCH_WORDS[key]})",
            f"ours test ({_EPOCH_WORDS[other]})",
            "paper Δ test",
            "ours Δ test",
        ]
        if table == "table3":
            headers += ["paper gap", "ours gap"]
        out += ["", f"## {TABLE_TITLES[table]}: {tab['title']}", ""]
        out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for row in tab["rows"]:
            mine = groups.get(row["experiment"], [])
            test = summary_stat(mine, key)
            base_id = baseline_id(paper, table, row)
            base = rows_by_id[base_id]
            if base_id == row["id"]:
                paper_delta, ours_delta = "-", "-"
            else:
                paper_delta = f"{row['test'] - base['test']:+.3f}"
                ours_delta = fmt_delta(test, summary_stat(groups.get(base["experiment"], []), key))
            cells = [
                *_row_label(table, row),
                f"{row['train']:g}",
                f"{row['test']:g}",
                fmt_ms(summary_stat(mine, "train_top1")),
                fmt_ms(test),
                fmt_ms(summary_stat(mine, other)),
                paper_delta,
                ours_delta,
            ]
            if table == "table3":
                gap = mean_std(
                    r["summary"]["train_top1"] - r["summary"][key]
                    for r in mine
                    if r["summary"].get("train_top1") is not None
                    and r["summary"].get(key) is not None
                )
                cells += [f"{row['gap']:g}", fmt_ms(gap)]
            out.append("| " + " | ".join(cells) + " |")
        out += ["", _test_note(paper, table)]
        if tab.get("notes"):
            out += ["", f"Note: {tab['notes']}"]
        for row in tab["rows"]:
            if row.get("notes"):
                out += ["", f"Note ({row['id']}): {row['notes']}"]
    out += ["", "## Inconsistencies in the paper (recorded, not fixed)", ""]
    out += [f"- {note}" for note in paper.get("notes", [])]
    return "\n".join(out) + "\n"


def readme_rows(paper: dict[str, Any], runs: list[dict[str, Any]], dataset: str) -> str:
    """The README's "paper row -> command -> status" table with each row's GPU cost."""
    groups = runs_by_experiment(runs, dataset)
    out = [
        "## Paper rows: command, status, cost",
        "",
        "Each row of the paper's tables is one config under `configs/experiment/` (overrides "
        "only; its header names the row, the paper's numbers and the cost). Run one on 4 GPUs "
        "with ImageNet prepared by `scripts/prepare_imagenet.py`; add `-m +sweep=seeds` for "
        "three seeds. Cost is estimated V100-hours for one seed (100 epochs x 1.28M images at "
        "an assumed per-V100 throughput: "
        + ", ".join(f"{MODEL_NAMES[m]} {r:,} img/s" for m, r in V100_IMAGES_PER_S.items())
        + "; see `scripts/report.py`). Status: the paper's train / test top-1, then ours as mean "
        "± std (n) or *not run*.",
        "",
        "| row | command | paper train / test | ours train / test | V100-h |",
        "|---|---|---|---|---|",
    ]
    seen_cost = 0.0
    for table, row in paper_rows(paper):
        exp = row["experiment"]
        mine = groups.get(exp, [])
        label = f"{TABLE_TITLES[table]}: {row_name(table, row)}"
        cmd = f"`torchrun --nproc_per_node=4 train.py experiment={exp} data.root=DIR`"
        if mine:
            key = compared_test_key(paper, table)
            status = (
                f"{fmt_ms(summary_stat(mine, 'train_top1'))} / "
                f"{fmt_ms(summary_stat(mine, key))} ({_EPOCH_WORDS[key]})"
            )
        else:
            status = NOT_RUN
        hours = gpu_hours(row["model"], 100)
        shared = row.get("same_as")
        cost = f"(= {shared})" if shared else f"{hours:.0f}"
        if not shared:
            seen_cost += hours
        out.append(f"| {label} | {cmd} | {row['train']:g} / {row['test']:g} | {status} | {cost} |")
    # Experiments that test a claim rather than a table row (Fig. 3c's 60-epoch run).
    row_experiments = {row["experiment"] for _, row in paper_rows(paper)}
    for claim in paper.get("claims", []):
        for exp in claim.get("experiments", []):
            if exp in row_experiments:
                continue
            model, epochs = experiment_budget(exp)
            hours = gpu_hours(model, epochs)
            seen_cost += hours
            mine = groups.get(exp, [])
            status = (
                f"- / {fmt_ms(summary_stat(mine, 'val_top1'))} (final epoch)" if mine else NOT_RUN
            )
            test = f"- / {claim['test_top1']:g}" if "test_top1" in claim else "(claim)"
            out.append(
                f"| claim {claim['id']}: {MODEL_NAMES[model]}, {epochs} epochs | "
                f"`torchrun --nproc_per_node=4 train.py experiment={exp} data.root=DIR` | "
                f"{test} | {status} | {hours:.0f} |"
            )
    sweep_cost = 0.0
    for name, sweep in SWEEPS.items():
        grid = sweep_grid(name)
        hours = gpu_hours(sweep["model"], sweep["epochs"]) * len(grid)
        sweep_cost += hours
        out.append(
            f"| alpha grid, {MODEL_NAMES[sweep['model']]}, {sweep['epochs']} epochs, "
            f"alpha in {{{', '.join(f'{a:g}' for a in grid)}}} | "
            f"`torchrun --nproc_per_node=4 train.py -m +sweep={name} data.root=DIR` | "
            f"(supplementary) | {NOT_RUN if not groups.get(f'sweep_{name}') else 'see figures'} "
            f"| {hours:.0f} |"
        )
    out += [
        "",
        f"All distinct rows once: ~{seen_cost:.0f} V100-hours; with 3 seeds ~{3 * seen_cost:.0f}; "
        f"both alpha grids ~{sweep_cost:.0f} more.",
        "",
        "## Evaluating the authors' released checkpoints",
        "",
        "`eval.py` loads this project's checkpoints and timm-format ones (`checkpoint.pth.tar`, "
        "`model_best.pth.tar`; DDP `module.` prefixes stripped, architecture checked) and writes "
        "top-1 / top-5, loss and logit statistics as JSON:",
        "",
        "```bash",
        "python eval.py checkpoint=/path/to/model_best.pth.tar model=resnet50 data=imagenet \\",
        "    data.root=/path/to/imagenet loader=dali output=eval_resnet50_pgt.json",
        "```",
        "",
        "Use `model=resnet18_nonorm` for the authors' `resnet18_wobn` (Table 2) and the matching "
        "`model=` for the other rows.",
    ]
    return "\n".join(out) + "\n"


def experiment_budget(name: str) -> tuple[str, int]:
    """(model, epochs) of configs/experiment/<name>.yaml (the paper's 100 epochs unless set)."""
    cfg = yaml.safe_load((CONFIGS / "experiment" / f"{name}.yaml").read_text())
    model = next(d["override /model"] for d in cfg["defaults"] if "override /model" in d)
    return model, cfg.get("trainer", {}).get("epochs", 100)


def sweep_grid(name: str) -> list[float]:
    """The alpha values of configs/sweep/<name>.yaml."""
    cfg = yaml.safe_load((CONFIGS / "sweep" / f"{name}.yaml").read_text())
    grid = cfg["hydra"]["sweeper"]["params"]["method.alpha"]
    return [float(a) for a in str(grid).split(",")]


def paper_figures(runs: list[dict[str, Any]], paper: dict, dataset: str, out: Path) -> list[str]:
    """Figures from paper-scale runs that exist: Fig. 3 per Table 1 pair and alpha sweeps."""
    groups = runs_by_experiment(runs, dataset)
    written = []
    for _, row in paper_rows(paper):
        if row["method"] == "baseline" or not groups.get(row["experiment"]):
            continue
        base = baseline_id(paper, "table1", row) if row["id"].startswith("t1_") else None
        series = {row["experiment"]: [r["history"] for r in groups[row["experiment"]]]}
        if base and groups.get(base):
            series[base] = [r["history"] for r in groups[base]]
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"fig3_{row['experiment']}.png"
        plot_accuracy_loglog(series, path, title=row["experiment"])
        written.append(str(path))
    for name in SWEEPS:
        sweep_runs = groups.get(f"sweep_{name}", [])
        if not sweep_runs:
            continue
        points: dict[float, list[dict]] = defaultdict(list)
        for r in sweep_runs:
            alpha = r["config"]["method"]["alpha"]
            points[1.0 if alpha is None else alpha].append(r["summary"])
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        keys = [
            ("val_top1", "test top-1 %"),
            ("train_loss", "final loss"),
            ("logit_norm", "logit norm"),
        ]
        plot_vs_alpha(points, keys, path, title=name)
        written.append(str(path))
    return written


# ---------------------------------------------------------------------------------------------


README_START = "<!-- paper-rows: generated by scripts/report.py, do not edit by hand -->"
README_END = "<!-- /paper-rows -->"


def update_readme_block(readme: Path, text: str) -> bool:
    """Replace the README's generated paper-rows block (between the markers) with ``text``.

    The README shows the same table as results/README_rows.md without anyone copying numbers
    by hand; a README without the markers is left alone. Returns whether it was rewritten.
    """
    if not readme.exists():
        return False
    old = readme.read_text()
    start, end = old.find(README_START), old.find(README_END)
    if start < 0 or end < start:
        return False
    new = old[: start + len(README_START)] + "\n" + text.rstrip() + "\n" + old[end:]
    if new != old:
        readme.write_text(new)
    return True
