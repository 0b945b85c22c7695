"""Profile the main job's hot paths and measure the overheads removed from them (CPU).

Sections (each prints a table and one JSON line):
  sample   per-sample cost of the torch backend's ImageFiles.__getitem__ on the digits train
           split (the main job's loader) and on an ImageNet-shaped JPEG folder, as now vs. as
           before the seeding fix (torch.manual_seed, which also queues a CUDA reseed with a
           formatted stack trace per call), interleaved in one process.
  loader   images/s of a TorchTrainLoader epoch (2 workers) consumed as fast as possible, as now
           vs. before the seeding fix, interleaved.
  step     where one main-job training step's time goes (torch.profiler, CPU): forward,
           backward, optimizer, the trainer's per-step bookkeeping (meter, scheduler).
  overhead the trainer's per-step work beyond a minimal loop, timed alone (us per step) and
           as a fraction of the minimal step's CPU time on the same shapes.

For a whole-process picture of the main job use py-spy (not a project dependency):
    pip install py-spy
    py-spy record --format raw -o main.txt --subprocesses -- \
        python train.py logger=none trainer.progress=false trainer.epochs=3

Usage: python scripts/profile_main.py [--sections sample,loader,step,overhead] [--rounds 15]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from powergrad.data import DataConfig, LoaderConfig, Shard, build_loaders  # noqa: E402
from powergrad.data.digits import materialize_digits  # noqa: E402
from powergrad.data.layout import check_dataset, default_cache_dir  # noqa: E402
from powergrad.data.sampling import STREAM_AUGMENT, derive_seed  # noqa: E402
from powergrad.data.torch_backend import ImageFiles, load_rgb, train_transform  # noqa: E402


class ImageFilesBeforeFix(ImageFiles):
    """ImageFiles.__getitem__ as it was before the seeding fix (for the before/after ratio)."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        image = load_rgb(self.files[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index, STREAM_AUGMENT))
            image = self.transform(image)
        return image, self.labels[index]


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _imagenet_folder(tmp: Path) -> Path:
    """A small ImageNet-shaped folder: 500x375 JPEGs (ImageNet's typical size), 4 classes."""
    from powergrad.data.generate import write_image_folder

    root = tmp / "imagenet-like"
    write_image_folder(root, classes=4, train_per_class=32, val_per_class=4, size=(500, 375))
    return root


def section_sample(rounds: int, tmp: Path) -> dict:
    out = {}
    datasets = {"digits": (str(materialize_digits()), DataConfig())}
    datasets["imagenet_like"] = (
        str(_imagenet_folder(tmp)),
        DataConfig(name="imagenet", root="x", num_classes=4),
    )
    for name, (root, data) in datasets.items():
        listing = check_dataset(
            root, on_bad_file="skip", bad_manifest=None, cache_dir=default_cache_dir()
        )
        files, labels = listing.files("train"), listing.labels("train")
        now = ImageFiles(files, labels, train_transform(data), seed=0)
        before = ImageFilesBeforeFix(files, labels, train_transform(data), seed=0)
        assert torch.equal(now[(0, 1)][0], before[(0, 1)][0]), "same augmentation expected"
        n = min(len(files), 64)
        times: dict[str, list[float]] = {"now": [], "before": []}
        for r in range(rounds):
            order = [("now", now), ("before", before)][:: 1 if r % 2 else -1]
            for label, ds in order:
                t0 = time.perf_counter()
                for i in range(n):
                    ds[(0, i)]
                times[label].append((time.perf_counter() - t0) / n * 1e6)
        out[name] = {
            "us_per_sample_now": statistics.median(times["now"]),
            "us_per_sample_before": statistics.median(times["before"]),
            "speedup_paired": _median_ratio(times["before"], times["now"]),
        }
    return out


def section_loader(rounds: int, tmp: Path) -> dict:
    """Loader-only images/s with 2 workers (the main job's setting), now vs before, interleaved."""
    data = DataConfig()
    loader_cfg = LoaderConfig(backend="torch", workers=2, prefetch=2)
    now = build_loaders(data, loader_cfg, Shard(128)).train
    before = build_loaders(data, loader_cfg, Shard(128)).train
    # Same object layout: swapping the class before the workers fork gives the old __getitem__.
    before.loader.dataset.__class__ = ImageFilesBeforeFix
    times: dict[str, list[float]] = {"now": [], "before": []}
    images = len(now) * 128
    for r in range(rounds + 1):
        order = [("now", now), ("before", before)][:: 1 if r % 2 else -1]
        for label, loader in order:
            t0 = time.perf_counter()
            for _ in loader.epoch(r):
                pass
            if r:  # round 0 forks the persistent workers
                times[label].append(time.perf_counter() - t0)
    return {
        "images_per_s_now": images / statistics.median(times["now"]),
        "images_per_s_before": images / statistics.median(times["before"]),
        "speedup_paired": _median_ratio(times["before"], times["now"]),
    }


def section_step(rounds: int, tmp: Path) -> dict:
    """torch.profiler breakdown of main-job steps (digits batch, ResNet-18, 1 thread)."""
    from bench_train import build_ours, compose_config

    cfg = compose_config(
        "resnet18",
        "baseline",
        image_size=32,
        batch=128,
        steps=rounds,
        precision="fp32",
        channels_last=False,
        compile=False,
        device="cpu",
        threads=1,
    )
    _, chunk = build_ours(cfg, tmp / "step")
    chunk()  # warm-up epoch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        chunk()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return {
        "steps": rounds,
        "total_self_cpu_ms": total / 1e3,
        "top_ops_self_cpu_pct": {e.key: 100 * e.self_cpu_time_total / total for e in top},
    }


def section_overhead(rounds: int, tmp: Path) -> dict:
    """The trainer's per-step work beyond a minimal loop, timed alone on real components.

    Per step, train_one_epoch adds to forward / loss / zero_grad / backward / optimizer.step:
    a disabled autocast context, GradScaler calls (no-ops unless fp16), the clipper (no-op for
    method=baseline/pgt), the timm scheduler's step_update, EpochMeter.update (loss, top-1 and
    LogitStats sums on the device) and the loader generator. Timed here in a loop of 1000 steps
    against the minimal step's time on the same shapes, so the ratio is not buried in the noise
    of whole-step timings on a shared CPU. The PGT loss's extra cost is scripts/bench_pgt.py's.
    """
    from bench_train import build_minimal, build_ours, compose_config

    from powergrad.engine import EpochMeter, _autocast

    out = {}
    for label, model, size, batch, classes in (
        ("main_job_resnet18_32px_b128_c10", "resnet18", 32, 128, 10),
        ("bench_resnet18_128px_b16_c1000", "resnet18", 128, 16, 1000),
        ("bench_resnet50_128px_b16_c1000", "resnet50", 128, 16, 1000),
    ):
        cfg = compose_config(
            model,
            "baseline",
            image_size=size,
            batch=batch,
            steps=1,
            precision="fp32",
            channels_last=False,
            compile=False,
            device="cpu",
            threads=1,
            extra=(f"data.num_classes={classes}",),
        )
        ctx, _ = build_ours(cfg, tmp / label)
        images, target = ctx.train_loader.batch
        _, _, run = build_minimal(cfg, images, target, classes)
        run(1)
        step_s = []
        for _ in range(3):
            c0 = time.process_time()
            run(1)
            step_s.append(time.process_time() - c0)
        logits = torch.randn(batch, classes)
        loss = torch.nn.functional.cross_entropy(logits, target)
        meter = EpochMeter(torch.device("cpu"))

        def loader(batch=(images, target)):
            while True:
                yield batch

        batches = loader()
        reps, samples = 1000, []
        for _ in range(max(rounds, 5)):
            c0 = time.process_time()
            for step in range(reps):
                _, y = next(batches)
                with _autocast(ctx.dist.device, ctx.amp_dtype):
                    z = logits.float()
                scaled = ctx.scaler.scale(loss)
                ctx.scaler.unscale_(ctx.optimizer)
                ctx.clipper()
                ctx.scaler.update()
                ctx.scheduler.step_update(num_updates=step)
                meter.update(scaled.detach(), z.detach(), y)
            samples.append((time.process_time() - c0) / reps)
        overhead = statistics.median(samples)
        step = statistics.median(step_s)
        out[label] = {
            "trainer_overhead_us_per_step": overhead * 1e6,
            "minimal_step_ms": step * 1e3,
            "overhead_fraction_of_step": overhead / step,
        }
        print(
            f"{label:<34} overhead {overhead * 1e6:8.1f} us/step   minimal step "
            f"{step * 1e3:8.1f} ms   fraction {overhead / step:.5%}"
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="sample,loader,step,overhead")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "scripts"))
    fns = {
        "sample": section_sample,
        "loader": section_loader,
        "step": section_step,
        "overhead": section_overhead,
    }
    report = {"loadavg_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="profile_main-") as tmp:
        for name in args.sections.split(","):
            report[name] = fns[name](args.rounds, Path(tmp))
            print(name, json.dumps(report[name], indent=1))
    report["loadavg_1min_after"] = os.getloadavg()[0]
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
