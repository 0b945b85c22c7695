"""Benchmark: training-loader throughput (images/s) of DALI-CPU vs torchvision, in one run.

Both read the same generated ImageNet-like folder (500x375 JPEGs, quality 90) through
powergrad.data.build_loaders with the same augmentations (random-resized crop to 224, flip,
normalize) and the same number of threads (DALI threads = torch worker processes). Each round
builds each backend's loaders afresh, runs one untimed warm-up epoch (pipeline build, worker
start-up), then times --epochs consecutive epochs as one block, the gaps between epochs included
(where DALI builds the next epoch's pipeline); the backends alternate by round, the order
rotating, and a backend's loaders are torn down before the other's block starts, so neither
works during the other's clock. Reported: images/s per backend (median over rounds), and the
DALI-CPU / torch ratio as the geometric mean of the per-round ratios with a 95% t-interval;
DALI mixed (nvJPEG + GPU operators) too where CUDA is present.

With --stages, also where DALI-CPU's time goes: the train pipeline's operators (same arguments as
powergrad.data.dali_backend.train_pipeline) cut after each stage -- read, decode (full image),
decode of the random crop, + resize to 224 (antialiased; and without antialiasing), + flip and
normalize -- each timed by pipe.run() over the same batches, alternating over rounds.

Usage: python scripts/bench_data.py [--threads 2] [--images 512] [--batch 64] [--epochs 3]
                                    [--rounds 3] [--root DIR (reuse/keep the generated folder)]
                                    [--stages]
"""

from __future__ import annotations

import argparse
import gc
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

from bench_job import git_sha, ratio_ci  # scripts/ is on sys.path when run as a script

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


def stage_rates(data: DataConfig, threads: int, batch: int, rounds: int) -> dict[str, float]:
    """Images/s of the DALI-CPU train pipeline cut after each stage (median over rounds)."""
    from nvidia.dali import fn, pipeline_def, types

    from powergrad.data.layout import check_dataset

    files = check_dataset(data.root).files("train")

    @pipeline_def
    def cut(stage: str):
        encoded, _ = fn.readers.file(files=files, random_shuffle=False, name="Reader")
        if stage == "read":
            return encoded
        if stage == "decode_full":
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        images = fn.decoders.image_random_crop(
            encoded,
            device="cpu",
            output_type=types.RGB,
            random_area=[data.crop_scale_min, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
            num_attempts=10,
        )
        if stage == "decode_crop":
            return images
        images = fn.resize(
            images,
            resize_x=data.image_size,
            resize_y=data.image_size,
            interp_type=types.INTERP_LINEAR,
            antialias=stage != "resize_no_antialias",
        )
        if stage.startswith("resize"):
            return images
        return fn.crop_mirror_normalize(
            images,
            mirror=fn.random.coin_flip(probability=0.5),
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in data.mean],
            std=[255.0 * s for s in data.std],
        )

    stages = ["read", "decode_full", "decode_crop", "resize", "resize_no_antialias", "normalize"]
    pipes = {}
    for stage in stages:
        pipes[stage] = cut(stage, batch_size=batch, num_threads=threads, device_id=None, seed=1)
        pipes[stage].build()
    rates: dict[str, list[float]] = {stage: [] for stage in stages}
    runs = max(1, len(files) // batch)
    for _ in range(rounds):
        for stage, pipe in pipes.items():
            pipe.run()  # warm
            start = time.perf_counter()
            for _ in range(runs):
                pipe.run()
            rates[stage].append(runs * batch / (time.perf_counter() - start))
    return {stage: round(statistics.median(v), 1) for stage, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints one JSON line per backend and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = torch workers")
    parser.add_argument("--images", type=int, default=512, help="train images to generate")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per block")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per backend")
    parser.add_argument("--root", type=Path, help="folder to generate into / reuse")
    parser.add_argument("--stages", action="store_true", help="also time DALI-CPU per stage")
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
    rates: dict[str, list[float]] = {name: [] for name in runs}
    images_per_epoch = 0
    for r in range(args.rounds):
        names = list(runs)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            loader, device = runs[name]
            built = build_loaders(data, loader, Shard(args.batch, device=device))
            timed_epoch(built.train, 0, device)  # warm-up
            start, images = time.perf_counter(), 0
            for epoch in range(1, args.epochs + 1):
                images += timed_epoch(built.train, epoch, device)[0]
            rates[name].append(images / (time.perf_counter() - start))
            images_per_epoch = images // args.epochs
            # Tear down (DALI: the pipeline built ahead for the next epoch too) before the
            # other backend's clock starts.
            if name.startswith("dali"):
                built.train.close()
            del built
            gc.collect()
            time.sleep(0.5)
    summary = {
        "command": " ".join(["python", "scripts/bench_data.py", *(argv or sys.argv[1:])]),
        "git_sha": git_sha(),
        "threads": args.threads,
        "rounds": args.rounds,
        "epochs_per_block": args.epochs,
        "images_per_epoch": images_per_epoch,
        "image_size": "500x375 JPEG q90 -> 224 crops",
        "loadavg": round(os.getloadavg()[0], 2),
    }
    for name, values in rates.items():
        summary[f"{name}_images_per_s"] = round(statistics.median(values), 1)
    for name in ("dali_cpu", "dali_mixed"):
        if name in rates:
            ratio = ratio_ci(rates[name], rates["torch"])
            summary[f"ratio_{name}_over_torch"] = round(ratio["ratio"], 2)
            summary[f"ratio_{name}_over_torch_ci95"] = [round(x, 2) for x in ratio["ci95"]]
    if args.stages:
        summary["dali_cpu_stage_images_per_s"] = stage_rates(
            data, args.threads, args.batch, args.rounds
        )
    print(json.dumps(summary))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
