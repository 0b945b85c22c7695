"""The report's figures: accuracy vs epoch (Fig. 3), summaries vs alpha (Fig. 7), filter norms
(Figs. 4-6). Each function writes one PNG; inputs are plain run records (powergrad.results)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from powergrad.results import mean_std

__all__ = ["curve", "plot_accuracy_loglog", "plot_filter_norms", "plot_vs_alpha"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(histories: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and std of ``key`` over runs (epochs every run has)."""
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for hist in histories:
        for rec in hist:
            if rec.get(key) is not None:
                per_epoch[rec["epoch"]].append(rec[key])
    epochs = sorted(e for e, v in per_epoch.items() if len(v) == len(histories))
    means = [statistics.fmean(per_epoch[e]) for e in epochs]
    stds = [statistics.stdev(per_epoch[e]) if len(per_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def plot_accuracy_loglog(series: dict[str, list[list[dict]]], path: Path, title: str = "") -> None:
    """Fig. 3: train (dashed) and test (solid) top-1 against the epoch on log-log axes.

    ``series`` maps a label to the epoch histories of its seeds; bands are ± 1 std.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, histories) in enumerate(series.items()):
        for key, style, name in (("train_top1", "--", "train"), ("val_top1", "-", "test")):
            epochs, mean, std = curve(histories, key)
            if not epochs:
                continue
            ax.plot(epochs, mean, style, color=f"C{i}", label=f"{label} {name}")
            lo = [max(m - s, 1e-3) for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(epochs, lo, hi, color=f"C{i}", alpha=0.15)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_vs_alpha(
    points: dict[float, list[dict]], keys: list[tuple[str, str]], path: Path, title: str = ""
) -> None:
    """One panel per ``(summary key, axis label)``: mean ± std over seeds against alpha."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    alphas = sorted(points)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        stats = [mean_std(s.get(key) for s in points[a]) for a in alphas]
        xs = [a for a, s in zip(alphas, stats, strict=True) if s]
        ax.errorbar(
            xs,
            [s[0] for s in stats if s],
            yerr=[s[1] for s in stats if s],
            marker="o",
            capsize=3,
        )
        ax.set_xlabel("alpha (1 = baseline)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_filter_norms(runs: dict[str, dict], path: Path, title: str = "") -> None:
    """Figs. 4-6: per-filter norm trajectories of chosen layers (one row per method) and the
    final number of zeroed-out (< 1e-6) and collapsed (< 10% of initial) filters per layer.

    ``runs`` maps a method label to a run's ``filter_norms`` digest (scripts/cpu_study.py).
    """
    plt = _plt()
    labels = list(runs)
    layers = sorted(int(k) for k in next(iter(runs.values()))["trajectories"])
    fig, axes = plt.subplots(
        len(labels) + 1, len(layers), figsize=(3.0 * len(layers), 2.4 * (len(labels) + 1))
    )
    for i, label in enumerate(labels):
        digest = runs[label]
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            traj = digest["trajectories"][str(layer)]
            for f in range(len(traj[0])):
                ax.plot(digest["steps"], [snap[f] for snap in traj], lw=0.4, alpha=0.5)
            total = digest["layer_filters"][layer - 1]
            shown = f"{len(traj[0])} of {total}" if len(traj[0]) < total else f"all {total}"
            ax.set_title(f"{label}: layer {layer} ({shown} filters)", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(labels) - 1:
                ax.set_xlabel("optimizer step", fontsize=8)
            if j == 0:
                ax.set_ylabel("filter L2 norm", fontsize=8)
    ax_bar = axes[-1]
    for ax in ax_bar[1:]:
        ax.remove()
    gs = ax_bar[0].get_gridspec()
    ax_bar[0].remove()
    ax = fig.add_subplot(gs[-1, :])
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        digest = runs[label]
        zeroed, collapsed = digest["zeroed"][-1], digest["collapsed"][-1]
        xs = [k + 1 + (i - len(labels) / 2) * width for k in range(len(zeroed))]
        ax.bar(xs, collapsed, width=width, color=f"C{i}", alpha=0.35)
        ax.bar(xs, zeroed, width=width, color=f"C{i}", label=label)
    ax.set_xticks(range(1, len(digest["zeroed"][-1]) + 1))
    peak = max(max(runs[label]["collapsed"][-1]) for label in labels)
    ax.set_ylim(0, max(1, peak) * 1.1)
    ax.set_xlabel("conv layer (the paper's numbering)")
    ax.set_ylabel("filters zeroed (solid) / collapsed (light)", fontsize=8)
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
