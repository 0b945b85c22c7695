"""Benchmark: forward+backward time of the PGT loss vs F.cross_entropy vs the authors' hook.

Variants, all fed the same (N, C) logits and class targets and scaled by the same loss scale
S = N**2 (the one scale at which the authors' hook is correct, so all do equal work):
  ce         F.cross_entropy (the baseline every ratio refers to)
  pgt        powergrad.pgt.pgt_cross_entropy at --alpha
  pgt_a1     pgt_cross_entropy at alpha = 1 (the ordinary gradient through the PGT path)
  authors_hook powergrad.pgt.AuthorsHookCrossEntropy at --alpha: F.cross_entropy plus the
             authors' tensor hook on the logits (their timm fork's implementation)

The variants run in alternating blocks (each variant --block calls in a row, the block order
rotating every round) after a warm-up round, so machine noise hits them alike while each is
timed in its own steady state, as in a training loop that calls one loss every step. Reported
per variant: the median and 10th-percentile ms per call, their ratios to ce, the median over
calls of the time ratio to ce's call at the same position (paired, hence robust to slow drifts
in machine load), and on CPU the minor page faults per call: glibc hands multi-MB buffers back
to the kernel, so every fresh (N, C) fp32 buffer can cost one fault per 4 KiB page, often more
time than the arithmetic.
On a CPU shared with other jobs, OpenMP barriers stall and timings inflate many-fold: rerun, or
compare with --threads 1.

Usage: python scripts/bench_pgt.py [--n 1024] [--c 1000] [--repeats 300] [--device cpu|cuda|all]
       [--alpha 0.25] [--threads T] [--block 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# Running as `python scripts/bench_pgt.py` from the repo root: make `powergrad` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powergrad.pgt import AuthorsHookCrossEntropy, pgt_cross_entropy


def _variants(
    logits: torch.Tensor, target: torch.Tensor, alpha: float
) -> dict[str, Callable[[], None]]:
    n = logits.shape[0]
    scale = float(n * n)
    authors_loss = AuthorsHookCrossEntropy(alpha)

    def ce() -> None:
        x = logits.detach().requires_grad_()
        (F.cross_entropy(x, target) * scale).backward()

    def pgt() -> None:
        x = logits.detach().requires_grad_()
        (pgt_cross_entropy(x, target, alpha) * scale).backward()

    def pgt_a1() -> None:
        x = logits.detach().requires_grad_()
        (pgt_cross_entropy(x, target, 1.0) * scale).backward()

    def authors_hook() -> None:
        x = logits.detach().requires_grad_()
        # The hook builds a dense one-hot q every call; that is part of its cost.
        (authors_loss(x, target) * scale).backward()

    return {"ce": ce, "pgt": pgt, "pgt_a1": pgt_a1, "authors_hook": authors_hook}


def _time_call(fn: Callable[[], None], cuda: bool) -> tuple[float, int]:
    """One call's time (ms) and, on CPU, its minor page faults."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), 0
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def bench(
    n: int, c: int, repeats: int, warmup: int, alpha: float, device: str, block: int = 50
) -> dict:
    """Time every variant on ``device``; returns medians (ms) and paired ratios to ``ce``.

    Each round runs every variant ``block`` times in a row (rotating which goes first) and times
    the calls after the first fifth of the block: a training loop calls the same loss every
    step, so each variant is measured in its own steady allocator state. Interleaving single
    calls (``block=1``) instead measures the cost of switching allocation patterns: there a
    variant's time depends on which one ran before it.
    """
    gen = torch.Generator().manual_seed(0)
    # Logit scale 3 gives peaked but not one-hot softmaxes, like a partly trained classifier.
    logits = (3.0 * torch.randn(n, c, generator=gen)).to(device)
    target = torch.randint(0, c, (n,), generator=gen).to(device)
    fns = _variants(logits, target, alpha)
    names = list(fns)
    cuda = device.startswith("cuda")
    settle = block // 5
    timed_per_block = block - settle
    rounds = warmup + max(1, -(-repeats // timed_per_block))
    times: dict[str, list[float]] = {k: [] for k in names}
    faults = dict.fromkeys(names, 0)
    for rnd in range(rounds):
        # Rotate the order each round so no variant always runs first (cache, frequency).
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            for i in range(block):
                ms, flt = _time_call(fns[name], cuda)
                if rnd >= warmup and i >= settle:
                    times[name].append(ms)
                    faults[name] += flt
    repeats = len(times["ce"])
    median_ms = {k: statistics.median(v) for k, v in times.items()}
    # 10th percentile: the steady-state cost with most bursts of machine contention excluded.
    p10_ms = {k: statistics.quantiles(v, n=10)[0] for k, v in times.items()}
    paired = {
        k: statistics.median(a / b for a, b in zip(times[k], times["ce"], strict=True))
        for k in names
    }
    return {
        "device": device,
        "n": n,
        "c": c,
        "alpha": alpha,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "median_ms": median_ms,
        "p10_ms": p10_ms,
        "ratio_vs_ce_of_medians": {k: median_ms[k] / median_ms["ce"] for k in names},
        "ratio_vs_ce_of_p10": {k: p10_ms[k] / p10_ms["ce"] for k in names},
        "ratio_vs_ce_paired": paired,
        "minor_page_faults_per_call": {k: v / repeats for k, v in faults.items()},
    }


def _print_table(res: dict) -> None:
    print(
        f"\n{res['device']}  N={res['n']} C={res['c']} alpha={res['alpha']} "
        f"repeats={res['repeats']} threads={res['threads']}"
    )
    print(
        f"{'variant':<14}{'median ms':>11}{'p10 ms':>9}{'ratio (medians)':>17}"
        f"{'ratio (p10)':>13}{'ratio (paired)':>16}"
    )
    for k, ms in res["median_ms"].items():
        print(
            f"{k:<14}{ms:>11.4f}{res['p10_ms'][k]:>9.4f}{res['ratio_vs_ce_of_medians'][k]:>17.3f}"
            f"{res['ratio_vs_ce_of_p10'][k]:>13.3f}{res['ratio_vs_ce_paired'][k]:>16.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark on each requested device, print a table + JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="batch size (rows of the logits)")
    ap.add_argument("--c", type=int, default=1000, help="number of classes")
    ap.add_argument("--repeats", type=int, default=400, help="timed calls per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument(
        "--block", type=int, default=50, help="calls of one variant in a row (1: interleave calls)"
    )
    ap.add_argument("--alpha", type=float, default=0.25, help="PGT exponent for 'pgt'")
    ap.add_argument(
        "--device",
        default="all",
        choices=["cpu", "cuda", "all"],
        help="'all' = cpu, plus cuda when available",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's default)"
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if args.device == "all" and not torch.cuda.is_available():
        devices = ["cpu"]
    for dev in devices:
        res = bench(args.n, args.c, args.repeats, args.warmup, args.alpha, dev, args.block)
        _print_table(res)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
