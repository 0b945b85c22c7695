"""The measures of scripts/gpu_check.py, run in its child processes; the parent (gpu_check.py)
starts them, enforces the caps, writes the JSON and renders the table.

``python scripts/gpu_measures.py NAME,NAME... [--device cuda|cpu] [--tiny]`` runs the named
measures in order and prints, for each, one protocol line when it starts and one with its result
(``GPU_CHECK {json}``); a measure that raises reports its traceback and the next one runs. Module
level imports are the standard library's only: each measure imports torch and the rest itself,
so the parent can read this file's names without a CUDA context.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

WHEELS = ROOT / ".whl"
SOURCE_FILE = WHEELS / "SOURCE.json"  # written by gpu_check.py --prepare
PROTOCOL = "GPU_CHECK "  # prefix of the protocol lines on stdout

DALI_SKIPPED = "skipped: DALI is not on the GPU image and too large to carry (64 MiB limit)"


@dataclass(frozen=True)
class Sizes:
    """What the measures run: the GPU sizes, or toy ones for a dry run on a CPU."""

    model: str
    image_size: int  # pixels, square
    batch: int  # images per optimizer step
    steps: int  # optimizer steps per timed chunk
    rounds: int  # timed chunks per variant
    warmup: int  # untimed chunks per variant first
    compile_backend: str
    sync_steps: int  # trainer steps counted for host syncs
    big_batch: int  # the memory measure's batch
    epochs: int  # train.py's epochs
    epoch_steps: int  # train.py's steps per epoch
    val_images: int
    jpegs: int  # distinct generated JPEGs (500x375)
    links: int  # hard links per JPEG: the loader reads jpegs * links files
    threads: int | None  # CPU intra-op threads (None: torch's default)


GPU_SIZES = Sizes(
    model="resnet50",
    image_size=224,
    batch=256,
    steps=5,  # a chunk of ~0.45 s at the goal's 3,000 images/s
    rounds=11,  # the median's 95% interval then runs from the 3rd to the 9th of 11 ratios
    warmup=2,
    compile_backend="inductor",
    sync_steps=6,
    big_batch=1024,
    epochs=4,
    epoch_steps=24,
    val_images=512,
    jpegs=256,
    links=48,
    threads=None,
)
DRY_SIZES = Sizes(
    model="resnet18",
    image_size=32,
    batch=4,
    steps=2,
    rounds=2,
    warmup=1,
    compile_backend="eager",
    sync_steps=2,
    big_batch=8,
    epochs=2,
    epoch_steps=2,
    val_images=8,
    jpegs=8,
    links=2,
    threads=1,
)


# --------------------------------------------------------------------------------------------
# Measures (run in the child process; each imports what it needs)


def _release_memory() -> None:
    """Between measures: drop the last one's tensors and cached GPU blocks."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def source_revision() -> dict[str, Any]:
    """The commit being checked: git's, or (no .git on the device) the one --prepare recorded."""
    from powergrad.tracking import git_sha

    sha = git_sha(ROOT)
    if sha != "unknown":
        return {"sha": sha, "from": "git"}
    if SOURCE_FILE.exists():
        source = json.loads(SOURCE_FILE.read_text())
        return {"sha": source["git_sha"], "from": f".whl/SOURCE.json of {source['prepared_utc']}"}
    return {"sha": "unknown", "from": "no git, no .whl/SOURCE.json"}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package (nvidia for nvidia.dali) is missing
        return False


def measure_environment(s: Sizes, device: str, work: Path) -> dict:
    """Versions, the GPU, the commit; and how long the training stack takes to import."""
    t0 = time.perf_counter()
    import bench_train  # noqa: F401  (torch, Hydra, timm and the package, as the measures use)
    import hydra
    import omegaconf
    import timm
    import torch
    import torchvision

    env: dict[str, Any] = {
        "import_s": time.perf_counter() - t0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "hydra": hydra.__version__,
        "omegaconf": omegaconf.__version__,
        "cpu_count": os.cpu_count(),
        "commit": source_revision(),
        "carried_wheels": sorted(p.name for p in WHEELS.glob("*.whl")),
        "importable": {name: _importable(name) for name in ("wandb", "submitit", "nvidia.dali")},
        "sizes": s.__dict__,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            gpu_memory_gib=props.total_memory / 2**30,
        )
    return env


def _bench_args(
    s: Sizes,
    device: str,
    precision: str,
    *,
    compile: bool = False,
    variants: str = "minimal,ours_ce,ours_pgt",
    batch: int | None = None,
    steps: int | None = None,
    rounds: int | None = None,
    warmup: int | None = None,
) -> argparse.Namespace:
    """bench_train.bench_model's arguments for one measure (channels_last always)."""
    return argparse.Namespace(
        image_size=s.image_size,
        batch=batch or s.batch,
        steps=steps or s.steps,
        rounds=rounds or s.rounds,
        warmup=warmup or s.warmup,
        precision=precision,
        channels_last=True,
        compile=compile,
        compile_backend=s.compile_backend,
        device=device,
        threads=s.threads,
        variants=variants,
    )


def _runnable_precision(precision: str, device: str) -> tuple[str, str | None]:
    """fp16 needs CUDA (the trainer refuses it on a CPU): a CPU dry run uses fp32 instead."""
    if precision == "fp16" and device == "cpu":
        return "fp32", "fp16 needs CUDA: this CPU dry run ran fp32"
    return precision, None


def measure_eager(precision: str) -> Callable[[Sizes, str, Path], dict]:
    """Minimal loop vs the trainer's step (CE, PGT) at ``precision``, eager."""

    def measure(s: Sizes, device: str, work: Path) -> dict:
        from bench_train import bench_model

        run_precision, note = _runnable_precision(precision, device)
        res = bench_model(s.model, _bench_args(s, device, run_precision), work)
        return {**res, "note": note} if note else res

    return measure


SYNC_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",  # the synchronous copy (cudaMemcpyAsync is not counted)
    "cudaFree",  # frees wait for the whole device
)


def count_host_syncs(run: Callable[[], Any], cuda: bool) -> dict[str, Any]:
    """Host syncs while ``run()`` runs: CUDA's sync debug mode (one warning per synchronizing
    call made from Python) and the profiler's synchronizing runtime calls (any thread, but the
    profiler's own stop adds its synchronize: compare with an empty region)."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    calls = Counter(e.name for e in prof.events() if e.name in SYNC_CALLS)
    return {
        "sync_debug_warnings": len(messages) if cuda else None,
        "first_warnings": messages[:3],
        "profiler_sync_calls": dict(calls),
        "profiler_sync_total": sum(calls.values()),
    }


def measure_no_host_sync(s: Sizes, device: str, work: Path) -> dict:
    """Host syncs in s.sync_steps trainer steps at bf16 (no log step among them), beside an
    empty region and a control that syncs once (.item()): the counters must see the control."""
    import torch
    from bench_train import build_ours, compose_config

    cfg = compose_config(
        s.model,
        "baseline",
        image_size=s.image_size,
        batch=s.batch,
        steps=s.sync_steps,
        precision="bf16",
        channels_last=True,
        compile=False,
        device=device,
        threads=s.threads,
    )
    ours, chunk = build_ours(cfg, work / "sync")
    cuda = ours.device.type == "cuda"
    chunk()  # warm-up: cuDNN autotuning, lazy initialisation and allocator growth may sync
    if cuda:
        torch.cuda.synchronize()
    count_host_syncs(lambda: None, cuda)  # the profiler's first start initializes CUPTI
    empty = count_host_syncs(lambda: None, cuda)
    control = count_host_syncs(lambda: torch.ones(1, device=ours.device).sum().item(), cuda)
    steps = count_host_syncs(chunk, cuda)
    out: dict[str, Any] = {
        "model": s.model,
        "batch": s.batch,
        "precision": "bf16",
        "channels_last": True,
        "steps": s.sync_steps,
        "empty_region": empty,
        "control_one_item": control,
        "trainer_steps": steps,
    }
    if cuda:
        extra = steps["profiler_sync_total"] - empty["profiler_sync_total"]
        out["control_seen"] = (
            control["sync_debug_warnings"] >= 1
            and control["profiler_sync_total"] > empty["profiler_sync_total"]
        )
        out["host_syncs"] = max(steps["sync_debug_warnings"], extra)
    else:
        out["control_seen"] = None
        out["host_syncs"] = None
        out["note"] = "no CUDA: a CPU step has no host-device syncs to count"
    return out


def measure_compile(s: Sizes, device: str, work: Path) -> dict:
    """The trainer's step under torch.compile at bf16: images/s, compile time, graph breaks."""
    import torch
    from bench_train import bench_model

    res = bench_model(
        s.model,
        _bench_args(s, device, "bf16", compile=True, variants="ours_ce", warmup=1),
        work,
    )
    counters = torch._dynamo.utils.counters  # private, stable for years; diagnostics only
    res["dynamo"] = {
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": dict(list(counters["graph_break"].items())[:5]),
        "unique_graphs": counters["stats"].get("unique_graphs"),
    }
    return res


def measure_batch1024(s: Sizes, device: str, work: Path) -> dict:
    """The trainer's step at the paper's global batch on one device, bf16: peak memory."""
    from bench_train import bench_model

    res = bench_model(
        s.model,
        _bench_args(
            s, device, "bf16", variants="ours_ce", batch=s.big_batch, steps=2, rounds=2, warmup=1
        ),
        work,
    )
    if device == "cuda":
        import torch

        res["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return res


def gpu_memory_mib(pid: int) -> tuple[float | None, str | None]:
    """GPU memory used by process ``pid`` (MiB) and where the number came from; the device's
    total use where per-process numbers are not reported; (None, None) without a GPU."""
    with contextlib.suppress(Exception):
        import pynvml  # nvidia-ml-py, on the GPU image

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory / 2**20, "nvml process"
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20, "nvml device"
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            p, used = (x.strip() for x in line.split(",")[:2])
            if int(p) == pid:
                return float(used.split()[0]), "nvidia-smi process"
    return None, None


def _rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


# train.py, run as __main__ by runpy, with a record of who imports the watched packages: a
# meta-path finder notes the first module to ask for each (it finds nothing itself), and at
# exit the ones that were imported are printed on stderr as one JSON line.
WATCHED_IMPORTS = ("wandb", "nvidia.dali", "submitit")
TRAIN_PY_WATCHED = f"""
import atexit, json, runpy, sys
asked = {{}}
class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name in {WATCHED_IMPORTS!r} and name not in asked:
            frame = sys._getframe(1)
            while frame and frame.f_globals.get("__name__", "").startswith("importlib"):
                frame = frame.f_back
            asked[name] = frame.f_globals.get("__name__") if frame else None
sys.meta_path.insert(0, Recorder())
atexit.register(lambda: print("IMPORTED_BY " + json.dumps(
    {{n: asked.get(n) if n in sys.modules else None for n in {WATCHED_IMPORTS!r}}}),
    file=sys.stderr, flush=True))
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def imported_by(log: str) -> dict[str, str | None]:
    """The TRAIN_PY_WATCHED report in ``log``: per watched package, the module that imported
    it, or None (not imported)."""
    (line,) = [x for x in log.splitlines() if x.startswith("IMPORTED_BY ")]
    return json.loads(line.removeprefix("IMPORTED_BY "))


def _spread_mib(values: list[float]) -> float | None:
    return max(values) - min(values) if values else None


def measure_train_py(s: Sizes, device: str, work: Path) -> dict:
    """train.py on synthetic data for s.epochs epochs (bf16, channels_last, logger=none), its
    GPU memory and RSS sampled every 0.2 s and attributed to the epoch in progress, and which
    module imported wandb, DALI or submitit, if any (TRAIN_PY_WATCHED)."""
    run_dir = work / "run"
    overrides = [
        f"model={s.model}",
        "data=synthetic",
        f"data.image_size={s.image_size}",
        f"data.synthetic_train_images={s.batch * s.epoch_steps}",
        f"data.synthetic_val_images={s.val_images}",
        f"trainer.batch_size={s.batch}",
        "trainer.precision=bf16",
        "trainer.channels_last=true",
        f"trainer.epochs={s.epochs}",
        "trainer.warmup_epochs=0",
        f"trainer.device={device}",
        f"trainer.threads={s.threads or 'auto'}",
        "trainer.progress=false",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    cmd = [sys.executable, "-c", TRAIN_PY_WATCHED, *overrides]
    log = work / "train_py.log"
    work.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    samples: list[tuple[int, float | None, float | None]] = []  # (epoch, GPU MiB, RSS MiB)
    source = None
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            gpu, where = gpu_memory_mib(proc.pid) if device == "cuda" else (None, None)
            source = where or source
            samples.append((done + 1, gpu, _rss_mib(proc.pid)))
            time.sleep(0.2)
    wall_s = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"train.py exited {proc.returncode}: {' '.join(cmd)}\n{text[-3000:]}")
    records = [json.loads(x) for x in metrics.read_text().splitlines()]

    def per_epoch(column: int) -> list[float | None]:
        return [
            max((x[column] for x in samples if x[0] == e and x[column] is not None), default=None)
            for e in range(1, s.epochs + 1)
        ]

    gpu_mib, rss_mib = per_epoch(1), per_epoch(2)
    after_first = [v for v in gpu_mib[1:] if v is not None]
    keep = ("epoch", "step", "train_loss", "val_top1", "images_per_s", "epoch_s")
    return {
        "command": " ".join(["python", "train.py", *overrides]),
        "wall_s": wall_s,
        "epochs": [{k: r.get(k) for k in keep} for r in records],
        "summary_written": (run_dir / "summary.json").exists(),
        "checkpoints": sorted(p.name for p in run_dir.glob("*.pt")),
        "gpu_memory_mib_per_epoch": gpu_mib,
        "gpu_memory_source": source,
        # Flat: after the first epoch (cuDNN autotuning, the first evaluation) memory stays put.
        "gpu_memory_spread_after_epoch1_mib": _spread_mib(after_first),
        "rss_mib_per_epoch": rss_mib,
        "samples": len(samples),
        "imported_by": imported_by(text),
    }


def measure_torch_loader(s: Sizes, device: str, work: Path) -> dict:
    """loader=torch's train batches/s on generated 500x375 JPEGs, loader.workers=auto, batches
    normalized on the device as in training; one warm-up epoch starts the workers."""
    import torch

    from powergrad.data import DataConfig, LoaderConfig, Shard, build_loaders
    from powergrad.data.generate import write_image_folder
    from powergrad.resources import resolve

    root = work / "jpegs"
    t0 = time.perf_counter()
    write_image_folder(root, classes=4, train_per_class=s.jpegs // 4, val_per_class=1)
    # Every JPEG again under other names: a long epoch from few encodes (decoding a file costs
    # the same the 1st or the 48th time; the page cache holds them, as for a hot dataset).
    for jpeg in sorted((root / "train").glob("*/*.JPEG")):
        for k in range(1, s.links):
            os.link(jpeg, jpeg.with_name(f"{jpeg.stem}-{k:02d}{jpeg.suffix}"))
    generate_s = time.perf_counter() - t0
    os.environ["POWERGRAD_CACHE"] = str(work / "cache")  # the start-up check's cache
    _, workers = resolve(None, "auto", accelerator=device == "cuda")
    dev = torch.device(device)
    t0 = time.perf_counter()
    loaders = build_loaders(
        DataConfig(name="imagenet", root=str(root)),
        LoaderConfig(backend="torch", workers=workers),
        Shard(s.batch, device=dev),
    )
    build_s = time.perf_counter() - t0
    train = loaders.train

    def epoch(e: int) -> tuple[float, list[tuple[float, int]], float]:
        start, arrivals = time.perf_counter(), []
        for images, _ in train.epoch(e):
            arrivals.append((time.perf_counter(), images.shape[0]))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return start, arrivals, time.perf_counter()

    t0 = time.perf_counter()
    epoch(0)
    warmup_s = time.perf_counter() - t0
    start, arrivals, end = epoch(1)
    images = sum(n for _, n in arrivals)
    # From the first batch on: the epoch start's wait for the workers' first batches left out,
    # which an ImageNet epoch of 5,000 batches amortizes.
    after_first = sum(n for _, n in arrivals[1:]) / (end - arrivals[0][0])
    return {
        "files": s.jpegs * s.links,
        "distinct_jpegs": s.jpegs,
        "jpeg": "500x375, quality 90 -> random-resized crop 224, flip, normalize on the device",
        "batch": s.batch,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "generate_s": generate_s,
        "build_s": build_s,
        "warmup_epoch_s": warmup_s,
        "images": images,
        "images_per_s": images / (end - start),
        "images_per_s_after_first_batch": after_first,
        "dali": DALI_SKIPPED,
    }


MEASURES: dict[str, Callable[[Sizes, str, Path], dict]] = {
    "environment": measure_environment,
    "r50_bf16_eager": measure_eager("bf16"),
    "r50_fp16_eager": measure_eager("fp16"),
    "no_host_sync": measure_no_host_sync,
    "compile": measure_compile,
    "batch1024_memory": measure_batch1024,
    "train_py": measure_train_py,
    "torch_loader": measure_torch_loader,
}


def _emit(kind: str, **fields: Any) -> None:
    print(PROTOCOL + json.dumps({"kind": kind, **fields}, default=str), flush=True)


def _exit_with_parent() -> None:
    """Kill this process group (this child, its train.py run, loader workers) once the parent
    is gone: a child in its own session would otherwise run on, holding the GPU, after the
    device tool killed the check at its time limit."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def child(names: list[str], sizes: Sizes, device: str) -> None:
    """Run ``names`` in order, one protocol line at each start and each result."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    if os.getpgrp() == os.getpid():  # started in its own session by gpu_check.py
        _exit_with_parent()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in names:
            _emit("start", name=name)
            t0 = time.perf_counter()
            try:
                result, status, error = MEASURES[name](sizes, device, Path(tmp) / name), "ok", None
            except Exception:  # one failing measure must not lose the others
                result, status, error = None, "error", traceback.format_exc()[-4000:]
            _emit(
                "result",
                name=name,
                status=status,
                result=result,
                error=error,
                wall_s=time.perf_counter() - t0,
            )
            _release_memory()


def main(argv: list[str] | None = None) -> int:
    """Run the named measures (the check's child process)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("measures", help="comma-separated, from: " + ",".join(MEASURES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (DRY_SIZES)")
    args = ap.parse_args(argv)
    names = [n for n in args.measures.split(",") if n]
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        print(f"error: unknown measures {unknown}; choose from {list(MEASURES)}", file=sys.stderr)
        return 2
    child(names, DRY_SIZES if args.tiny else GPU_SIZES, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
