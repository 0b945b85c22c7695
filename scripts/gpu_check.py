"""One prepared GPU check (run through scripts/gpu_check.sh): throughput, PGT cost, memory, tests.

Prints one JSON object (and writes it to --out): for ResNet-50 and ResNet-18 on synthetic
ImageNet-shaped data (224 px, batch 256 per GPU, channels_last):
  - images/s of the trainer's step (powergrad.engine.train_one_epoch, method=baseline) and of a
    minimal hand-written loop, at bf16 and fp16, eager; the paired ratio between them;
  - the PGT (alpha 0.25) vs cross-entropy step ratio of the trainer;
  - the trainer's step under torch.compile (bf16, then fp16 while time is left);
  - peak GPU memory per variant; the GPU-marked tests of the suite (DALI's excluded: DALI is
    too large to travel to a lent machine).
Every measurement comes from scripts/bench_train.py's bench_model (interleaved variants, paired
ratios). A time budget (--budget-s) skips what would not finish; skipped items are listed.
``--device cpu --tiny`` runs the same code at toy sizes, to check the script itself anywhere.

Anchors (images/s, ResNet-50 training, one GPU): NVIDIA's PyTorch reference 2,470 on an A100
(AMP); MLPerf's best ~7,050 on an H100; a well-built PyTorch trainer ~5,000 on an H100 (estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

ANCHORS_RESNET50_IMAGES_PER_S = {
    "nvidia_pytorch_reference_a100_amp": 2470,
    "mlperf_best_per_h100": 7050,
    "well_built_pytorch_h100_estimate": 5000,
}


def import_check() -> dict:
    """The training path (run dir, checkpoint, torch/synthetic data, engine) imports no DALI.

    wandb shows up only where it is installed: timm.utils tries it, optionally, at import time;
    the trainer imports it only for logger=wandb, so the GPU image needs no wandb.
    """
    import powergrad.checkpoint
    import powergrad.data
    import powergrad.engine
    import powergrad.rundir  # noqa: F401

    return {
        "dali_imported_by_training_path": any(m.startswith("nvidia.dali") for m in sys.modules),
        "wandb_imported_by_training_path": "wandb" in sys.modules,
    }


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return env


def run_tests(timeout_s: float) -> dict:
    """The GPU-marked tests (DALI's deselected), in a subprocess with a time limit."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-k",
        "not dali",
        "-p",
        "no:cacheprovider",
        "tests/test_pgt.py",
        "tests/test_engine.py",
        "tests/test_bench.py",
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout_s, 1)
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        return {"command": " ".join(cmd[1:]), "timed_out": True, "tail": out[-1500:]}
    lines = proc.stdout.strip().splitlines()
    return {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else "",
        "wall_s": time.perf_counter() - t0,
        "tail": proc.stdout[-1500:] if proc.returncode else "",
    }


# Rough H100 seconds per item at the default sizes (model build, warm-up, compile, timing):
# an item is skipped when it would run past the budget.
_ESTIMATE_S = {
    ("resnet50", False): 50,
    ("resnet18", False): 25,
    ("resnet50", True): 110,
    ("resnet18", True): 70,
}
TESTS_TIMEOUT_S = 120


def plan(tiny: bool, models: tuple[str, ...] = ("resnet50", "resnet18")) -> list[dict]:
    """Work in order of importance: eager ratios, the GPU tests, then compile."""
    items: list[dict] = [
        {"model": m, "precision": p, "compile": False, "variants": "minimal,ours_ce,ours_pgt"}
        for m in models
        for p in ("bf16", "fp16")
    ]
    items.append({"tests": True})
    items += [
        {"model": m, "precision": p, "compile": True, "variants": "ours_ce"}
        for p in ("bf16", "fp16")
        for m in models
    ]
    if tiny:
        # fp16 autocast is CUDA-only in this trainer; compile at toy size is still slow on a CPU.
        items = [
            i for i in items if "tests" in i or (i["precision"] == "bf16" and not i["compile"])
        ]
    return items


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU")
    ap.add_argument("--budget-s", type=float, default=330, help="stop starting work after this")
    ap.add_argument("--batch", type=int, default=256, help="images per step (per GPU)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per timed chunk")
    ap.add_argument("--models", default="resnet50,resnet18", help="comma-separated model names")
    ap.add_argument("--no-tests", action="store_true", help="skip the GPU-marked tests")
    ap.add_argument("--out", default=None, help="also write the JSON here ($OUT/gpu_check.json)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "disabled")

    report: dict = {"imports": import_check()}
    from bench_train import bench_model

    report["environment"] = environment()
    report["anchors_resnet50_images_per_s"] = ANCHORS_RESNET50_IMAGES_PER_S
    if args.device == "cuda" and not report["environment"]["cuda_available"]:
        raise SystemExit("no CUDA device: use --device cpu --tiny to check the script itself")
    size, batch, rounds, steps = args.image_size, args.batch, args.rounds, args.steps
    if args.tiny:
        size, batch, rounds, steps = 32, 4, 2, 1
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for item in plan(args.tiny, tuple(args.models.split(","))):
            elapsed = time.perf_counter() - t_start
            if "tests" in item:
                if not args.no_tests:
                    report["gpu_tests"] = run_tests(
                        min(TESTS_TIMEOUT_S, args.budget_s - elapsed + 30)
                    )
                    print(json.dumps({"gpu_tests": report["gpu_tests"]}), flush=True)
                continue
            label = f"{item['model']} {item['precision']} compile={item['compile']}"
            estimate = 0 if args.tiny else _ESTIMATE_S[(item["model"], item["compile"])]
            if elapsed + estimate > args.budget_s:
                skipped.append(label)
                continue
            ns = argparse.Namespace(
                image_size=size,
                batch=batch,
                steps=steps,
                rounds=rounds,
                warmup=2,
                precision=item["precision"],
                channels_last=True,
                compile=item["compile"],
                device=args.device,
                threads=1 if args.device == "cpu" else None,
                variants=item["variants"],
            )
            t0 = time.perf_counter()
            try:
                res = bench_model(item["model"], ns, Path(tmp))
            except Exception as e:  # one failing config must not lose the others' numbers
                res = {"model": item["model"], "error": f"{type(e).__name__}: {e}"[:2000]}
            res["wall_s"] = time.perf_counter() - t0
            res["label"] = label
            print(json.dumps(res), flush=True)
            results.append(res)
            if args.device == "cuda":
                import torch

                torch.cuda.empty_cache()
    report["benchmarks"] = results
    report["skipped_for_time"] = skipped
    report["wall_s"] = time.perf_counter() - t_start
    text = json.dumps(report)
    print("GPU_CHECK_JSON " + text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
