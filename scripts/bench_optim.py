"""Benchmark: one SGD step, torch's fused kernel against its default multi-tensor path.

The trainer uses fused SGD under fp32 and bf16 (powergrad.optim.fused_sgd_allowed). Both
optimizers are built by powergrad.optim.build_optimizer on copies of one timm model (the paper's
decay groups, Nesterov, lr 0.4) and step on the same fresh gradients; rounds alternate the two so
machine drift cancels. Printed per model: the median ms per step of each, the median of the
per-round ratios multi-tensor / fused, and the largest weight difference after all rounds
(float rounding: zero on one thread).

Usage: python scripts/bench_optim.py [--models resnet18,resnet50] [--rounds 31] [--steps 5]
       [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powergrad.models import build_model
from powergrad.optim import build_optimizer

VARIANTS = ("multi_tensor", "fused")


def bench_model(name: str, rounds: int, steps: int) -> dict:
    """Time ``steps`` optimizer steps per variant per round; return medians and the ratio."""
    base = build_model(name, num_classes=1000)
    models = {v: copy.deepcopy(base) for v in VARIANTS}
    optimizers = {
        v: build_optimizer(models[v], global_batch=1024, fused=v == "fused") for v in VARIANTS
    }
    generator = torch.Generator().manual_seed(0)
    params = {v: list(models[v].parameters()) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds + 1):  # round 0 warms up (momentum buffers, allocator)
        grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params["fused"]]
        order = VARIANTS if r % 2 else VARIANTS[::-1]
        for v in order:
            for p, g in zip(params[v], grads, strict=True):
                p.grad = g.clone()  # the multi-tensor Nesterov path writes into .grad
            start = time.perf_counter()
            for _ in range(steps):
                optimizers[v].step()
            if r:
                times[v].append((time.perf_counter() - start) / steps)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(params["multi_tensor"], params["fused"], strict=True)
    )
    ratios = [m / f for m, f in zip(times["multi_tensor"], times["fused"], strict=True)]
    return {
        "model": name,
        "ms_per_step": {v: 1e3 * statistics.median(times[v]) for v in VARIANTS},
        "ratio_multi_tensor_vs_fused": statistics.median(ratios),
        "max_weight_diff": diff,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50", help="comma-separated model names")
    ap.add_argument("--rounds", type=int, default=31, help="timed rounds per variant")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per timed chunk")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in filter(None, args.models.split(",")):
        res = bench_model(name, args.rounds, args.steps)
        ms = res["ms_per_step"]
        print(
            f"{name:10s} threads={args.threads} rounds={args.rounds}x{args.steps}  "
            f"multi-tensor {ms['multi_tensor']:.2f} ms  fused {ms['fused']:.2f} ms  "
            f"ratio {res['ratio_multi_tensor_vs_fused']:.2f}  "
            f"max weight diff {res['max_weight_diff']:.1e}"
        )
        results.append(res)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
