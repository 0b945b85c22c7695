"""Benchmark: training-loader throughput (images/s) of DALI-CPU vs torchvision, in one run.

Both read the same generated ImageNet-like folder (500x375 JPEGs, quality 90) through
powergrad.data.build_loaders with the same augmentations (random-resized crop to 224, flip,
normalize) and the same number of threads (DALI threads = torch worker processes). Each backend
runs one warm-up epoch (pipeline build, worker start-up), then --epochs timed epochs; the
backends alternate epoch by epoch so machine noise hits them alike. Reported: images/s per
backend and the DALI-CPU / torch ratio; DALI mixed (nvJPEG + GPU operators) too where CUDA is
present.

Usage: python scripts/bench_data.py [--threads 2] [--images 512] [--batch 64] [--epochs 3]
                                    [--root DIR (reuse/keep the generated folder)]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Running as `python scripts/bench_data.py` from the repo root: make `powergrad` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powergrad.data import DataConfig, LoaderConfig, Shard, build_loaders
from powergrad.data.generate import write_image_folder

CLASSES = 4


def timed_epoch(train, epoch: int, device: torch.device) -> tuple[int, float]:
    """(images, seconds) for one full epoch; waits for the device before stopping the clock."""
    start = time.perf_counter()
    images = 0
    for x, _ in train.epoch(epoch):
        images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints one JSON line per backend and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = torch workers")
    parser.add_argument("--images", type=int, default=512, help="train images to generate")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per backend")
    parser.add_argument("--root", type=Path, help="folder to generate into / reuse")
    args = parser.parse_args(argv)

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        root = Path(tmp.name) / "data"
        # Keep the start-up check's cache with the throwaway folder, not in the user's cache.
        os.environ["POWERGRAD_CACHE"] = str(Path(tmp.name) / "cache")
    if not (root / "train").is_dir():
        write_image_folder(
            root, classes=CLASSES, train_per_class=args.images // CLASSES, val_per_class=1
        )
    torch.set_num_threads(args.threads)
    data = DataConfig(name="imagenet", root=str(root))
    runs = {
        "dali_cpu": (LoaderConfig(backend="dali", workers=args.threads), torch.device("cpu")),
        "torch": (LoaderConfig(backend="torch", workers=args.threads), torch.device("cpu")),
    }
    if torch.cuda.is_available():
        runs["dali_mixed"] = (
            LoaderConfig(backend="dali", workers=args.threads),
            torch.device("cuda"),
        )
    loaders = {}
    for name, (loader, device) in runs.items():
        built = build_loaders(data, loader, Shard(args.batch, device=device))
        timed_epoch(built.train, 0, device)  # warm-up
        loaders[name] = built.train
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for epoch in range(1, args.epochs + 1):
        for name, (_, device) in runs.items():
            images, seconds = timed_epoch(loaders[name], epoch, device)
            rates[name].append(images / seconds)
    summary = {
        "threads": args.threads,
        "images_per_epoch": len(loaders["torch"]) * args.batch,
        "image_size": "500x375 JPEG q90 -> 224 crops",
    }
    for name, values in rates.items():
        summary[f"{name}_images_per_s"] = round(statistics.median(values), 1)
    summary["ratio_dali_cpu_over_torch"] = round(
        summary["dali_cpu_images_per_s"] / summary["torch_images_per_s"], 2
    )
    if "dali_mixed" in rates:
        summary["ratio_dali_mixed_over_torch"] = round(
            summary["dali_mixed_images_per_s"] / summary["torch_images_per_s"], 2
        )
    print(json.dumps(summary))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
