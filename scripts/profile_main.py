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
  parts    one digits train sample's CPU time split: read + decode (torchvision.io), the
           per-sample seeding (SeedSequence + fork_rng + manual_seed), the transforms v2 crop;
           against the plain script's PIL open + transforms v1 crop + ToTensor.
  save     one epoch-end checkpoint of the main job: torch.save of last.pt (weights + momentum)
           and best.pt (weights) to memory, and atomic_write (write + fsync + rename) to disk.
  threads  one main-job step (no loader) at 1 and 2 intra-op threads, and 2 with
           OMP_WAIT_POLICY=PASSIVE, each in a fresh process, alternating.
  job      the whole job (train.py through scripts/bench_job.py's runner, checkpoints and
           per-epoch eval off) over intra-op threads x loader workers, alternating per round:
           steady train images/s and epoch wall per setting (issue 14 item 3).

For a whole-process picture of the main job use py-spy (not a project dependency):
    pip install py-spy
    py-spy record --format raw -o main.txt --subprocesses -- \
        python train.py logger=none trainer.progress=false trainer.epochs=3

Usage: python scripts/profile_main.py [--sections sample,loader,step,overhead,parts,save]
       [--rounds 15]
       python scripts/profile_main.py --sections job --rounds 3 [--job-epochs 3]
       [--grid 1x0,1x1,1x2,2x0,2x1,2x2,2x1p]   (threads x workers, p: OMP_WAIT_POLICY=PASSIVE)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
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


def _git_sha() -> str:
    import bench_job

    return bench_job.git_sha()


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

    from powergrad.engine import EpochMeter, autocast

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
                with autocast(ctx.device, ctx.amp_dtype):
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


def section_parts(rounds: int, tmp: Path) -> dict:
    """CPU us per digits train sample, split by stage; the plain script's PIL path beside it."""
    from PIL import Image
    from torchvision import transforms as v1

    # The main job's train augmentation (configs/data/digits.yaml): 32x32 crops, no flip; both
    # paths crop to the same size.
    data = DataConfig(name="digits", image_size=32, crop_scale_min=0.35, hflip=False)
    listing = check_dataset(
        str(materialize_digits()),
        on_bad_file="skip",
        bad_manifest=None,
        cache_dir=default_cache_dir(),
    )
    files = listing.files("train")[:128]
    v2_crop = train_transform(data)
    v1_crop = v1.Compose(
        [
            v1.RandomResizedCrop(
                data.image_size, scale=(data.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3)
            ),
            v1.ToTensor(),
        ]
    )
    decoded = [load_rgb(f) for f in files]

    def seeding() -> None:
        for i in range(len(files)):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(derive_seed(0, 0, i, STREAM_AUGMENT))

    def pil_path() -> None:
        for f in files:
            with open(f, "rb") as fh:
                img = Image.open(fh).convert("RGB")
            v1_crop(img)

    stages = {
        "decode_torchvision_io": lambda: [load_rgb(f) for f in files],
        "seed_fork_rng": seeding,
        "crop_v2": lambda: [v2_crop(x) for x in decoded],
        "ours_whole_sample": lambda: [
            ImageFiles(files, [0] * len(files), v2_crop, seed=0, substitute=True)[(0, i)]
            for i in range(len(files))
        ],
        "plain_pil_v1_whole_sample": pil_path,
    }
    times: dict[str, list[float]] = {k: [] for k in stages}
    for r in range(max(rounds, 3)):
        names = list(stages)[r % len(stages) :] + list(stages)[: r % len(stages)]
        for name in names:
            c0 = time.process_time()
            stages[name]()
            times[name].append((time.process_time() - c0) / len(files) * 1e6)
    out = {f"{k}_us": statistics.median(v) for k, v in times.items()}
    for k, v in out.items():
        print(f"{k:<32}{v:8.0f} us/sample (CPU)")
    return out


def section_save(rounds: int, tmp: Path) -> dict:
    """One epoch-end checkpoint of the main job (ResNet-18, 10 classes, SGD momentum)."""
    import io

    from powergrad.fileio import atomic_write
    from powergrad.models import build_model
    from powergrad.optim import build_optimizer

    model = build_model("resnet18", 10)
    opt = build_optimizer(model, global_batch=128)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # creates the momentum buffers
    last = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    best = {"model": model.state_dict()}
    times: dict[str, list[float]] = {
        "serialize_last_s": [],
        "serialize_best_s": [],
        "write_last_s": [],
        "write_best_s": [],
    }
    sizes = {}
    for _ in range(max(rounds, 3)):
        for name, obj in (("last", last), ("best", best)):
            t0 = time.perf_counter()
            buf = io.BytesIO()
            torch.save(obj, buf)
            times[f"serialize_{name}_s"].append(time.perf_counter() - t0)
            sizes[f"{name}_mb"] = buf.tell() / 1e6
            t0 = time.perf_counter()
            atomic_write(tmp / f"{name}.pt", lambda f, obj=obj: torch.save(obj, f))
            times[f"write_{name}_s"].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()} | sizes
    print(json.dumps(out))
    return out


STEP_SNIPPET = r"""
import json, sys, time, timm, torch, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = timm.create_model("resnet18", num_classes=10)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
times = []
for i in range(int(sys.argv[2]) + 2):
    t0, c0 = time.perf_counter(), time.process_time()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i >= 2:
        times.append([time.perf_counter() - t0, time.process_time() - c0])
print(json.dumps(times))
"""


def section_threads(rounds: int, tmp: Path, steps: int = 6) -> dict:
    """One main-job training step (ResNet-18, batch 128, 32 px, no loader) at 1 and 2 intra-op
    threads, and at 2 with OMP_WAIT_POLICY=PASSIVE (waiting OpenMP threads sleep instead of
    spinning), each in a fresh process, alternating; wall and CPU seconds per step."""
    variants = {
        "t1": ("1", {}),
        "t2": ("2", {}),
        "t2_passive": ("2", {"OMP_WAIT_POLICY": "PASSIVE"}),
    }
    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            threads, env = variants[name]
            out = subprocess.run(
                [sys.executable, "-c", STEP_SNIPPET, threads, str(steps)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            got = json.loads(out.splitlines()[-1])
            walls[name] += [w for w, _ in got]
            cpus[name] += [c for _, c in got]
            print(f"round {r} {name}: median step {statistics.median(w for w, _ in got):.3f} s")
    out = {}
    for name in names:
        out[name] = {
            "step_wall_s_median": statistics.median(walls[name]),
            "step_wall_s_min": min(walls[name]),
            "step_cpu_s_median": statistics.median(cpus[name]),
            "images_per_s_median": 128 / statistics.median(walls[name]),
            "images_per_s_best": 128 / min(walls[name]),
        }
    out["loadavg"] = os.getloadavg()[0]
    return out


def section_job(
    rounds: int, tmp: Path, epochs: int = 3, grid: str = "1x0,1x1,1x2,2x0,2x1,2x2"
) -> dict:
    """train.py (bench_job's variant c: no checkpoints, val after the last epoch only) over
    threads x workers (a trailing "p": with OMP_WAIT_POLICY=PASSIVE), alternating; median
    steady train images/s and epoch wall per setting, and the per-round ratio to the defaults
    (threads=1 workers=2)."""
    import bench_job

    settings = grid.split(",")
    runs: dict[str, list[dict]] = {
        f"t{g.rstrip('p')}".replace("x", "w") + ("_passive" if g.endswith("p") else ""): []
        for g in settings
    }
    names = dict(zip(settings, runs, strict=True))
    for r in range(rounds):
        k = r % len(settings)
        for g in settings[k:] + settings[:k]:
            threads, workers = (int(x) for x in g.rstrip("p").split("x"))
            args = argparse.Namespace(
                epochs=epochs,
                threads=threads,
                workers=workers,
                batch_size=bench_job.DEFAULT_BATCH,
                root=None,
                extra=[],
            )
            env = {"OMP_WAIT_POLICY": "PASSIVE"} if g.endswith("p") else {}
            res = bench_job.run_variant("c", args, tmp, r, env=env)
            res["loadavg"] = os.getloadavg()[0]
            runs[names[g]].append(res)
            print(
                f"round {r} {names[g]}: "
                f"{res['train_images_per_s']:.0f} img/s, epoch {res['epoch_s']:.2f} s, "
                f"wall {res['wall_s']:.1f} s, loader wait "
                f"{bench_job.steady(res['loader_wait_s']):.2f} s/epoch, load {res['loadavg']:.1f}",
                flush=True,
            )
    ref = runs.get("t1w2")
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "train_images_per_s": statistics.median(r["train_images_per_s"] for r in rs),
            "epoch_s": statistics.median(r["epoch_s"] for r in rs),
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "loader_wait_s_per_epoch": statistics.median(
                bench_job.steady(r["loader_wait_s"]) for r in rs
            ),
            "peak_pss_mib": statistics.median(r["peak_pss_mib"] for r in rs),
            "images_per_s_rounds": [r["train_images_per_s"] for r in rs],
            "loadavg_rounds": [r["loadavg"] for r in rs],
        }
        if ref:
            out[name]["speedup_vs_t1w2"] = bench_job.ratio_ci(
                [r["train_images_per_s"] for r in rs], [r["train_images_per_s"] for r in ref]
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="sample,loader,step,overhead")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--job-epochs", type=int, default=3, help="job: epochs per run")
    ap.add_argument("--grid", default="1x0,1x1,1x2,2x0,2x1,2x2", help="job: THREADSxWORKERS")
    ap.add_argument("--out", help="also write the report (JSON) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "scripts"))
    # kill / timeout: unwind, so the job section's running train.py is taken down too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    fns = {
        "sample": section_sample,
        "loader": section_loader,
        "step": section_step,
        "overhead": section_overhead,
        "parts": section_parts,
        "threads": section_threads,
        "save": section_save,
        "job": functools.partial(section_job, epochs=args.job_epochs, grid=args.grid),
    }
    # The commit that runs, taken before the report files (tracked) are written.
    sha = _git_sha()
    report = {"loadavg_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="profile_main-") as tmp:
        for name in args.sections.split(","):
            report[name] = fns[name](args.rounds, Path(tmp))
            print(name, json.dumps(report[name], indent=1))
    report["loadavg_1min_after"] = os.getloadavg()[0]
    print(json.dumps(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report["command"] = " ".join(["python", "scripts/profile_main.py", *(argv or sys.argv[1:])])
        report["git_sha"] = sha
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
