"""Benchmark: the DALI train loader at an epoch boundary at ImageNet scale, old design vs new.

Data: a train list of --images entries (1,281,167: ImageNet-1K's train split) pointing, round
robin, at a few real JPEGs written by powergrad.data.generate (--image-px square: tiny, so that
whole epochs decode in seconds on 2 CPU cores), cropped to --crop pixels. World size
--world-size (8), simulated by shard: this process is rank --rank (0) and reads that rank's
--batch images per batch (128: the paper's global batch 1024 on 8 GPUs). The DALI CPU pipeline
with --threads threads and prefetch 2.

Designs, run one after the other in this process on the same list (--epochs epochs each):
  old  the DALI train loader before this change, rebuilt here: every epoch one pipeline over the
       whole epoch list (fn.readers.file(files=..., labels=..., shard_id=rank,
       num_shards=world_size)), its DALI checkpoint taken after every batch, the next epoch's
       built on a thread once `prefetch` batches are left, the finished one dropped (freed
       once nothing refers to it, never shut down explicitly);
  new  powergrad.data.dali_backend.DaliTrainLoader.

The consumer is the training thread: it takes a batch, then sleeps --step-ms (a training step
that waits on its GPU, GIL released) for the last and the first --window batches of each epoch;
elsewhere it takes batches as fast as DALI makes them (only the boundaries are timed). Meanwhile
a ticker thread sleeps 1 ms in a loop and records the gaps between its ticks: anything holding
the GIL (e.g. a pipeline build on another thread) freezes the training thread as long.
Printed per design (JSON), over the boundary windows:
  max_gil_gap_ms      the ticker's largest gap;
  boundary_wait_ms    per boundary, the consumer's wait from asking for the batch after epoch
                      e's last to holding epoch e + 1's first (close, build, first decode);
  max_batch_wait_ms   its longest wait for one batch;
  stall_ms            the largest of the three: the longest main-thread stall at a boundary;
  max_live_pipelines  DALI pipelines built and not shut down, sampled at every tick (on a GPU
                      each holds device memory); live_after_close after the loader's close().
  first_batch_s       the run's first batch (the first build; not part of any boundary).
throughput: images/s of each design mid-epoch (--rate-batches batches taken as fast as DALI
makes them; with tiny JPEGs that is the per-batch and per-sample cost of reading rather than
decoding), --rounds rounds alternating, and the new/old ratio (geometric mean, 95% interval).
build_costs: each way to hand DALI one epoch's order at this size, in seconds and the largest GIL
gap meanwhile: the lists of paths and labels, the pipeline definition (DALI converts the
arguments), Pipeline.build() (C++), for the whole list sharded by the reader (old), one rank's
slice (num_shards=1), a file_list text file of that slice (written, then parsed by the build),
and the external source (new). labels_equal: both designs yielded the same labels in the
windows (the sampling contract: the same order).

Not measured here: the mixed (GPU) decoder's build and first batch, device memory (run it with
--device cuda on a GPU: it then also prints the device memory in use after each boundary, flat
when no pipeline leaks), the decode rate of real ImageNet JPEGs (scripts/bench_data.py), disk
reads (the few files stay in the page cache), validation between epochs (which the new design's
build ahead overlaps; here only the last step, --step-ms, lies between two epochs).

Usage: python scripts/bench_dali_epochs.py [--images 1281167] [--world-size 8] [--rank 0]
           [--batch 128] [--epochs 2] [--window 10] [--step-ms 20] [--threads 2]
           [--image-px 32] [--crop 16] [--device cpu] [--rounds 3] [--rate-batches 200]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

# Running as `python scripts/bench_dali_epochs.py` from the repo root: make `powergrad` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_job import git_sha, ratio_ci  # scripts/ is on sys.path when run as a script
from nvidia.dali import fn, pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from powergrad.data.badfiles import BadFileLog
from powergrad.data.config import DataConfig, LoaderConfig, Shard
from powergrad.data.dali_backend import (
    DaliTrainLoader,
    EpochFeed,
    live_pipelines,
    pipeline_kwargs,
    train_augment,
    train_pipeline,
)
from powergrad.data.generate import write_image_folder
from powergrad.data.sampling import (
    STREAM_DALI,
    derive_seed,
    epoch_permutation,
    rank_batches,
    sharded_order,
    train_steps,
)


@pipeline_def(enable_checkpointing=True)
def reader_pipeline(reader: dict, data: DataConfig, gpu: bool):
    """The old train pipeline: fn.readers.file with `reader`'s list arguments, then the same
    operators as powergrad.data.dali_backend.train_pipeline (train_augment)."""
    encoded, label = fn.readers.file(
        **reader, random_shuffle=False, pad_last_batch=True, name="Reader"
    )
    images = train_augment(encoded, data, gpu, channels_last=False)
    return images, label.gpu() if gpu else label


class OldDesignLoader:
    """The old DaliTrainLoader's pipeline handling, its DALI checkpoint after every batch
    included (no bad files, no resume)."""

    def __init__(self, files, labels, data: DataConfig, loader: LoaderConfig, shard: Shard):
        self.files, self.labels = files, labels
        self.data, self.loader, self.shard = data, loader, shard
        self.steps = train_steps(len(files), shard.batch_size, shard.world_size)
        self._ahead: tuple[int, threading.Thread, dict] | None = None

    def _build(self, epoch: int) -> DALIGenericIterator:
        s = self.shard
        order = sharded_order(
            epoch_permutation(len(self.files), s.seed, epoch), s.batch_size, s.world_size
        )
        reader = {
            "files": [self.files[i] for i in order],
            "labels": [self.labels[i] for i in order],
            "shard_id": s.rank,
            "num_shards": s.world_size,
        }
        pipe = reader_pipeline(
            reader,
            self.data,
            s.device.type == "cuda",
            seed=derive_seed(s.seed, epoch, s.rank, s.world_size, STREAM_DALI),
            **pipeline_kwargs(self.loader, s.batch_size, s.device),
        )
        pipe.build()
        return DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP
        )

    def _build_ahead(self, epoch: int) -> None:
        built: dict = {}
        thread = threading.Thread(target=lambda: built.update(iterator=self._build(epoch)))
        thread.start()
        self._ahead = (epoch, thread, built)

    def _take_ahead(self, epoch: int | None) -> DALIGenericIterator | None:
        if self._ahead is None:
            return None
        (ahead_epoch, thread, built), self._ahead = self._ahead, None
        thread.join()
        return built.get("iterator") if ahead_epoch == epoch else None

    def close(self) -> None:
        self._take_ahead(None)  # as the old close(): drop the reference, no shutdown

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        iterator = self._take_ahead(epoch) or self._build(epoch)
        for b in range(self.steps):
            batch = next(iterator)[0]
            iterator.checkpoints()
            if b + 1 == max(1, self.steps - self.loader.prefetch):
                self._build_ahead(epoch + 1)
            yield batch["images"], batch["labels"].reshape(-1)


class Ticker:
    """A thread that ticks every 1 ms: gaps between ticks (GIL stalls) and live DALI pipelines."""

    def __init__(self) -> None:
        self.events: list[tuple[float, float, int]] = []  # (time, gap s, live pipelines)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            self.events.append((now, now - last, live_pipelines()))
            last = now

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def within(self, spans: list[tuple[float, float]]) -> list[tuple[float, float, int]]:
        """Ticks that ended inside one of `spans` (start, stop)."""
        return [e for e in self.events if any(a <= e[0] <= b for a, b in spans)]

    def max_gap_since(self, start: float) -> float:
        """The largest gap between ticks that ended after `start` (seconds), once the ticker
        has ticked again (a gap still open is recorded when the GIL comes back)."""
        time.sleep(0.005)
        return max((gap for t, gap, _ in self.events if t >= start), default=0.0)


def read_epochs(
    loader, steps: int, epochs: int, window: int, step_s: float, device: torch.device
) -> dict:
    """Consume `epochs` epochs as the training thread; time the boundary windows."""
    waits: list[float] = []  # per batch in a window
    boundary: list[float] = []
    spans: list[tuple[float, float]] = []  # each boundary's window, in perf_counter time
    labels: list[list[int]] = []
    memory: list[int] = []
    with Ticker() as ticker:
        asked = span_start = time.perf_counter()
        for e in range(epochs):
            batches = loader.epoch(e)
            for b in range(steps + 1):
                start = time.perf_counter()
                try:
                    _, target = next(batches)
                except StopIteration:
                    asked = start  # the boundary starts with the request after the last batch
                    break
                got = time.perf_counter()
                if e == 0 and b == 0:
                    first_batch_s = got - asked
                if e > 0 and b == 0:
                    boundary.append(got - asked)
                    if device.type == "cuda":
                        free, total = torch.cuda.mem_get_info(device)
                        memory.append((total - free) // 2**20)
                if e + 1 < epochs and b == steps - window:
                    span_start = start
                if (e > 0 and b < window) or (e + 1 < epochs and b >= steps - window):
                    waits.append(got - start)
                    labels.append(target.cpu().tolist())
                    time.sleep(step_s)
                if e > 0 and b == window - 1:
                    spans.append((span_start, time.perf_counter()))
        loader.close()
        live_after_close = live_pipelines()
    max_gap = max((gap for _, gap, _ in ticker.within(spans)), default=0.0)
    result = {
        "first_batch_s": round(first_batch_s, 3),
        "max_gil_gap_ms": round(1e3 * max_gap, 1),
        "boundary_wait_ms": [round(1e3 * w, 1) for w in boundary],
        "max_batch_wait_ms": round(1e3 * max(waits, default=0.0), 1),
        "median_batch_wait_ms": round(1e3 * statistics.median(waits), 2) if waits else None,
        "stall_ms": round(1e3 * max([max_gap, *boundary, *waits]), 1),
        "max_live_pipelines": max((n for _, _, n in ticker.events), default=0),
        "live_after_close": live_after_close,
    }
    if memory:
        result["device_memory_used_after_boundary_mib"] = memory
    return result | {"labels": labels}


def rates(designs: dict[str, Callable], rounds: int, batches: int) -> dict:
    """Images/s of each design mid-epoch (batches taken as fast as DALI makes them), the designs
    alternating over rounds, the order rotating; the new/old ratio per round."""
    seen: dict[str, list[float]] = {name: [] for name in designs}
    names = list(designs)
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            loader = designs[name]()
            epoch = loader.epoch(0)
            for _ in range(3):  # the build and the first batches
                next(epoch)
            start, images = time.perf_counter(), 0
            for _ in range(batches):
                images += len(next(epoch)[1])
            seen[name].append(images / (time.perf_counter() - start))
            epoch.close()
            loader.close()
            gc.collect()
    ratio = ratio_ci(seen["new"], seen["old"])
    return {
        **{f"{name}_images_per_s": round(statistics.median(v), 1) for name, v in seen.items()},
        "ratio_new_over_old": round(ratio["ratio"], 2),
        "ratio_new_over_old_ci95": [round(x, 2) for x in ratio["ci95"]],
    }


def build_costs(files, labels, data, loader: LoaderConfig, shard: Shard, tmp: Path) -> dict:
    """Seconds and largest GIL gap of each phase of building one epoch's pipeline, per way of
    handing DALI the order (see the module docstring)."""
    s, gpu = shard, shard.device.type == "cuda"
    kwargs = {"seed": 1, **pipeline_kwargs(loader, s.batch_size, s.device)}
    out: dict = {}

    def measure(name: str, make_lists: Callable, define: Callable) -> None:
        phases: dict[str, dict] = {}
        with Ticker() as ticker:
            time.sleep(0.01)

            def phase(name: str, step: Callable) -> object:
                start = time.perf_counter()
                result = step()
                seconds = time.perf_counter() - start
                gap = ticker.max_gap_since(start)
                phases[name] = {"s": round(seconds, 3), "max_gil_gap_ms": round(1e3 * gap, 1)}
                return result

            lists = phase("lists", make_lists)
            pipe = phase("define", lambda: define(lists))
            phase("build", pipe.build)
        pipe._shutdown()
        out[name] = phases | {"total_s": round(sum(p["s"] for p in phases.values()), 3)}

    permutation = epoch_permutation(len(files), s.seed, 0)
    laid_out = sharded_order(permutation, s.batch_size, s.world_size)
    mine = rank_batches(permutation, s.batch_size, s.rank, s.world_size)
    measure(
        "whole_list_sharded_by_reader (old)",
        lambda: ([files[i] for i in laid_out], [labels[i] for i in laid_out]),
        lambda fl: reader_pipeline(
            {"files": fl[0], "labels": fl[1], "shard_id": s.rank, "num_shards": s.world_size},
            data,
            gpu,
            **kwargs,
        ),
    )
    measure(
        "rank_slice_one_shard",
        lambda: ([files[i] for i in mine], [labels[i] for i in mine]),
        lambda fl: reader_pipeline({"files": fl[0], "labels": fl[1]}, data, gpu, **kwargs),
    )
    listing = tmp / "file_list.txt"

    def write_list() -> None:
        with open(listing, "w") as f:
            f.writelines(f"{files[i]} {labels[i]}\n" for i in mine)

    measure(
        "rank_slice_file_list",
        write_list,
        lambda _: reader_pipeline({"file_list": str(listing)}, data, gpu, **kwargs),
    )
    label_array = np.asarray(labels, dtype=np.int32)
    measure(
        "external_source (new)",
        lambda: rank_batches(
            epoch_permutation(len(files), s.seed, 0), s.batch_size, s.rank, s.world_size
        ),
        lambda order: train_pipeline(
            EpochFeed(files, label_array, order, s.batch_size), data, gpu, False, **kwargs
        ),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1_281_167, help="train list entries")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128, help="images per batch per rank")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per design")
    parser.add_argument("--window", type=int, default=10, help="timed batches each side")
    parser.add_argument("--step-ms", type=float, default=20.0, help="training step in windows")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    parser.add_argument("--image-px", type=int, default=32, help="side of the JPEGs written")
    parser.add_argument("--crop", type=int, default=16, help="crop side (data.image_size)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the mixed decoder")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per design")
    parser.add_argument("--rate-batches", type=int, default=200, help="batches timed per round")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_dali_epochs_") as tmp:
        root = write_image_folder(
            Path(tmp) / "data",
            classes=4,
            train_per_class=2,
            val_per_class=0,
            size=(args.image_px, args.image_px),
        )
        real = sorted(str(p) for p in (root / "train").rglob("*.JPEG"))
        files = [real[i % len(real)] for i in range(args.images)]
        labels = [i % 1000 for i in range(args.images)]
        data = DataConfig(name="imagenet", root=str(root), image_size=args.crop)
        loader = LoaderConfig(backend="dali", workers=args.threads, prefetch=2)
        shard = Shard(args.batch, args.rank, args.world_size, device)
        steps = train_steps(args.images, args.batch, args.world_size)
        window = min(args.window, steps // 2)
        results = {
            "build_costs": build_costs(files, labels, data, loader, shard, Path(tmp)),
        }
        gc.collect()
        designs = {
            "old": lambda: OldDesignLoader(files, labels, data, loader, shard),
            "new": lambda: DaliTrainLoader(
                files, labels, data, loader, shard, BadFileLog(str(root), "skip")
            ),
        }
        for name, make in designs.items():
            results[name] = read_epochs(
                make(), steps, args.epochs, window, args.step_ms / 1e3, device
            )
            gc.collect()  # the old design's dropped pipelines, before the next design runs
        rate_batches = min(args.rate_batches, steps - 4)
        results["throughput"] = rates(designs, args.rounds, rate_batches) | {
            "batches": rate_batches
        }
    seen = {name: results[name].pop("labels") for name in designs}
    summary = {
        "command": " ".join(["python", "scripts/bench_dali_epochs.py", *(argv or sys.argv[1:])]),
        "git_sha": git_sha(),
        "images": args.images,
        "world_size": args.world_size,
        "rank": args.rank,
        "batch": args.batch,
        "steps_per_epoch": steps,
        "epochs": args.epochs,
        "window": window,
        "step_ms": args.step_ms,
        "threads": args.threads,
        "image": f"{args.image_px}x{args.image_px} JPEG -> {args.crop} crops",
        "device": str(device),
        "loadavg": round(os.getloadavg()[0], 2),
        **results,
        "labels_equal": seen["old"] == seen["new"],
        "ratio_stall_old_over_new": round(
            results["old"]["stall_ms"] / max(results["new"]["stall_ms"], 1e-3), 1
        ),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
