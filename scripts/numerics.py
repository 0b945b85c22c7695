"""What the authors' fp16 PGT computed, next to exact PGT, over logit scale and alpha (issue 23).

The fork's hook (method.impl=authors_hook) ran on the fp16 gradient of the logits under AMP,
at loss scale S = N^2 once the scaler settled. There every class whose p rounds to 0 in fp16
gets p' = 0, where exact PGT gives it p^alpha / sum p^alpha. This script measures, on random
logits of a given RMS (fp16, as a model's output under autocast; uniformly random targets;
C = 1000, N = 256, S = N^2; 4 hook calls of 256 rows per point), for each (RMS, alpha):

- l1_median: median over rows of sum_i |p'_fork_i - p'_exact_i| (0: the same; 2: disjoint);
- underflow_fraction: the fraction of non-target classes whose p, as the hook recovers it in
  fp16 (grad / N + q), is exactly 0;
- underflow_mass_median: median over rows of the exact p' mass those classes carry.

p'_fork is the hook's output (powergrad.pgt.authors_pgt_hook on the fp16 gradient
powergrad.pgt.fork_fp16_logit_grad emulates: bit for bit the fork's on fp16 tensors,
tests/test_fork_numerics.py) divided by N, plus q. The logit L2 norm of a row is about
RMS * sqrt(C) = 31.6 RMS: the logit norms of 80-270 that issue 23 read from the paper's Fig. 5
(the figure files are images; the text gives no values) are RMS 2.5-8.5.

Writes OUT/numerics.json, OUT/README.md and OUT/numerics.png (default OUT: results/numerics).
About 30 s on a 2-core CPU.

Usage: python scripts/numerics.py [--out DIR] [--rms 1,2,...] [--alphas 0.05,...] [--seed 0]
                                  [--batches 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# Running as `python scripts/numerics.py` from the repo root: make `powergrad` importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from powergrad.fileio import atomic_write  # noqa: E402
from powergrad.pgt import authors_pgt_hook, fork_fp16_logit_grad, pgt_probs  # noqa: E402
from powergrad.tracking import git_sha  # noqa: E402

CLASSES, ROWS = 1000, 256  # ImageNet's classes; the fork's 256 images per GPU
RMS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
ALPHAS = [0.05, 0.1, 0.25, 0.3, 0.5, 0.75, 0.92, 1.0]  # every alpha of the paper's tables, and 1
# Anchors the README reads (the emulation): RMS 8 at alpha 0.05 and 0.25, RMS 2.
ANCHORS = [(8.0, 0.05), (8.0, 0.25), (2.0, 0.05), (2.0, 0.25)]


def measure(rms: float, alphas: list[float], seed: int, batches: int) -> list[dict[str, float]]:
    """The points of one RMS: ``batches`` hook calls of N rows each (the same logits at every
    alpha), pooled over rows."""
    gen = torch.Generator().manual_seed(seed)
    rows: dict[float, list] = {a: [] for a in alphas}
    norms, unders = [], []
    for _ in range(batches):
        z = (rms * torch.randn(ROWS, CLASSES, generator=gen)).half().float()
        target = torch.randint(0, CLASSES, (ROWS,), generator=gen)
        one_hot = F.one_hot(target, CLASSES)
        # What the hook receives (its output at alpha 1 is its input); the p it recovers,
        # grad / N + q in fp16 as it computes it, is 0 where this rounds to -q exactly.
        incoming = fork_fp16_logit_grad(z, target, 1.0)
        under = ((incoming / ROWS + one_hot.half()) == 0) & (one_hot == 0)
        norms.append(z.norm(dim=1))
        unders.append(under)
        for a in alphas:
            fork = authors_pgt_hook(incoming, target, a).float() / ROWS + one_hot
            exact = pgt_probs(z, a)
            rows[a].append(((fork - exact).abs().sum(dim=1), (exact * under).sum(dim=1)))
    under = torch.cat(unders)
    points = []
    for a in alphas:
        l1 = torch.cat([x[0] for x in rows[a]])
        mass = torch.cat([x[1] for x in rows[a]])
        points.append(
            {
                "rms": rms,
                "alpha": a,
                "logit_norm_mean": torch.cat(norms).mean().item(),
                "l1_median": l1.median().item(),
                "l1_max": l1.max().item(),
                "underflow_fraction": under.sum().item() / (under.shape[0] * (CLASSES - 1)),
                "underflow_mass_median": mass.median().item(),
                "underflow_mass_mean": mass.mean().item(),
            }
        )
    return points


def _table(points: list[dict], key: str, rms: list[float], alphas: list[float], fmt: str) -> list:
    by = {(p["rms"], p["alpha"]): p[key] for p in points}
    lines = [
        "| RMS (norm) | " + " | ".join(f"a={a:g}" for a in alphas) + " |",
        "|---|" + "---|" * len(alphas),
    ]
    norms = {p["rms"]: p["logit_norm_mean"] for p in points}
    for r in rms:
        cells = " | ".join(format(by[(r, a)], fmt) for a in alphas)
        lines.append(f"| {r:g} ({norms[r]:.0f}) | {cells} |")
    return lines


def _plot(points: list[dict], rms: list[float], alphas: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(p["rms"], p["alpha"]): p for p in points}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in alphas:
        left.plot(rms, [by[(r, a)]["l1_median"] for r in rms], marker="o", label=f"alpha {a:g}")
    left.set_yscale("log")
    left.set_xlabel("logit RMS (row L2 norm / sqrt(C))")
    left.set_ylabel("median per-row L1(p'_fork, p'_exact)")
    left.axvspan(2.5, 8.5, color="0.9", label="norms 80-270 (Fig. 5, issue 23's reading)")
    left.legend(fontsize=7)
    low = min(alphas)
    right.plot(rms, [by[(r, low)]["underflow_fraction"] for r in rms], marker="o",
               label="classes whose p is 0 in fp16")  # fmt: skip
    for a in sorted({low, 0.25} & set(alphas)):
        right.plot(rms, [by[(r, a)]["underflow_mass_median"] for r in rms], marker="s",
                   label=f"exact p' mass they carry, alpha {a:g}")  # fmt: skip
    right.axvspan(2.5, 8.5, color="0.9")
    right.set_xlabel("logit RMS")
    right.set_ylabel("fraction")
    right.set_ylim(0, 1)
    right.legend(fontsize=7)
    fig.suptitle(f"The fork's fp16 PGT vs exact PGT (C={CLASSES}, N={ROWS}, S=N^2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _readme(result: dict) -> str:
    points, rms, alphas = result["points"], result["rms"], result["alphas"]
    by = {(p["rms"], p["alpha"]): p for p in points}
    anchors = [
        f"RMS {r:g}, alpha {a:g}: L1 {by[(r, a)]['l1_median']:.3g}, "
        f"{100 * by[(r, a)]['underflow_fraction']:.0f}% of classes underflow, carrying "
        f"{100 * by[(r, a)]['underflow_mass_median']:.0f}% of the exact p' (median row)"
        for r, a in ANCHORS
        if (r, a) in by
    ]
    return "\n".join(
        [
            "# The fork's fp16 PGT vs exact PGT",
            "",
            "Written by `python scripts/numerics.py` (do not edit; rerun it). "
            f"Commit {result['git_sha']}, torch {result['torch']}, seed {result['seed']}, "
            f"{result['batches_per_point']} x {ROWS} rows per point.",
            f"Random logits of each RMS in fp16, C = {CLASSES}, N = {ROWS}, loss scale S = N^2, "
            "uniformly random targets. p'_fork is what the authors' hook returns there "
            "(powergrad.pgt.fork_fp16_logit_grad, bit for bit their code on fp16 tensors); "
            "p'_exact = softmax(alpha z). A row's logit norm is about 31.6 x RMS (in brackets).",
            "",
            "Anchors: " + "; ".join(anchors) + ".",
            "",
            "![fork vs exact](numerics.png)",
            "",
            "## Median per-row L1 distance between the fork's p' and the exact p'",
            "",
            *_table(points, "l1_median", rms, alphas, ".3g"),
            "",
            "## Fraction of classes whose p underflows fp16 (p' = 0 in the fork)",
            "",
            "It depends on the logits only, not on alpha.",
            "",
            "| RMS (norm) | fraction |",
            "|---|---|",
            *[
                f"| {r:g} ({by[(r, alphas[0])]['logit_norm_mean']:.0f}) | "
                f"{by[(r, alphas[0])]['underflow_fraction']:.3f} |"
                for r in rms
            ],
            "",
            "## Exact p' mass on the underflowing classes (median row)",
            "",
            *_table(points, "underflow_mass_median", rms, alphas, ".3f"),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Measure the grid, write the JSON, README and figure, print the anchors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "numerics")
    parser.add_argument("--rms", default=",".join(f"{r:g}" for r in RMS))
    parser.add_argument("--alphas", default=",".join(f"{a:g}" for a in ALPHAS))
    parser.add_argument("--seed", type=int, default=0, help="the same logits at every alpha")
    parser.add_argument("--batches", type=int, default=4, help="hook calls (of N rows) per point")
    args = parser.parse_args(argv)
    rms = [float(x) for x in args.rms.split(",")]
    alphas = [float(x) for x in args.alphas.split(",")]
    points = [p for r in rms for p in measure(r, alphas, args.seed + int(r * 1000), args.batches)]
    result = {
        "command": "python scripts/numerics.py " + " ".join(argv or sys.argv[1:]),
        "git_sha": git_sha(ROOT),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "classes": CLASSES,
        "rows": ROWS,
        "loss_scale": ROWS * ROWS,
        "seed": args.seed,
        "batches_per_point": args.batches,
        "rms": rms,
        "alphas": alphas,
        "points": points,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "numerics.json", json.dumps(result, indent=1) + "\n")
    atomic_write(args.out / "README.md", _readme(result))
    _plot(points, rms, alphas, args.out / "numerics.png")
    worst = max(points, key=lambda p: p["l1_median"])
    print(f"wrote {args.out}: {len(points)} points; largest median L1 {worst['l1_median']:.3g} "
          f"at RMS {worst['rms']:g}, alpha {worst['alpha']:g}")  # fmt: skip
    for p in points:
        if (p["rms"], p["alpha"]) in ANCHORS:
            print(f"RMS {p['rms']:g} alpha {p['alpha']:g}: L1 {p['l1_median']:.3g}, "
                  f"underflow {p['underflow_fraction']:.3f}, mass {p['underflow_mass_median']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
