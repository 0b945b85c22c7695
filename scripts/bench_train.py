"""Benchmark: images/s of the trainer's step against a minimal hand-written PyTorch loop, and PGT on/off.

Three variants train the same timm model (same architecture, same seed, same synthetic batch,
same precision, channels_last and compile settings) and run interleaved in one process:

  minimal   a hand-written loop: forward, F.cross_entropy, zero_grad, backward, SGD step
            (plus GradScaler under fp16). No scheduler, no metrics, no checks. Its SGD is
            torch's default multi-tensor one; the trainer's is fused under fp32/bf16, so
            ours / minimal above 1 there is that kernel (scripts/bench_optim.py times it alone).
  ours_ce   powergrad.engine.train_one_epoch on a context from powergrad.build.build_context
            (method=baseline): the real step code path with the real components (timm
            scheduler, EpochMeter/LogitStats, clipper, tracker with logger=none).
  ours_pgt  the same with method=pgt (the exact PGT cross-entropy, alpha 0.25).

Each round runs one chunk of --steps optimizer steps per variant, rotating the order every round
so no variant always runs first; chunks are timed with a device sync at both ends. Reported: the
median images/s per variant and the median over rounds of the paired per-round ratio (a ratio
of two chunks that ran seconds apart, so slow drifts in machine load cancel), with a
distribution-free 95% interval of that median. On the CPU the same ratios are also given in
process CPU time ("cpu" rows): on a machine shared with other jobs, time slices lost to them
inflate wall time at random, while the CPU time a step consumes does not depend on them. Targets (see the issue): ours_ce / minimal >= 0.97,
ours_pgt / ours_ce >= 0.995.

With --rss it also reports peak resident memory (MiB) of a short main job (train.py on digits,
loader workers included) and of a ResNet-50 synthetic run, each in a subprocess.

With --self-check it instead checks, at toy sizes, that it measures what it claims (the tests run
it as a subprocess): same_training (after two steps the minimal loop and the trainer's chunk hold
the same weights, BN statistics and momentum), meter_losses (the trainer's steps and its
EpochMeter saw the minimal loop's losses), median_ci95 (the interval brackets the median),
peak_rss (the sampler sees a 300 MiB allocation in a child process) and, with --device cuda,
no_host_sync (the trainer's step at bf16 and fp32 never waits for the GPU: no .item(), no
blocking copy, no stream sync between log steps; fp16 is left out, its GradScaler's inf check
is one .item() per step by design). It prints one JSON line {"self_check": {name: {"ok": ...}}}
and exits 1 when any check fails.

Usage: python scripts/bench_train.py [--models resnet18,resnet50] [--image-size 128] [--batch 16]
       [--steps 3] [--rounds 21] [--precision fp32|bf16|fp16] [--channels-last] [--compile]
       [--compile-backend inductor|eager] [--device cpu|cuda] [--threads 1] [--rss] [--tiny]
       python scripts/bench_train.py --self-check same_training,meter_losses,median_ci95,peak_rss
       python scripts/bench_train.py --self-check no_host_sync --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# Running as `python scripts/bench_train.py` from a fresh clone: make `powergrad` importable.
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from powergrad import checkpoint  # noqa: E402
from powergrad import distributed as pgdist  # noqa: E402
from powergrad.checkpoint import TrainState  # noqa: E402
from powergrad.config import register_configs, validate_train  # noqa: E402
from powergrad.data import Shard, build_loaders  # noqa: E402
from powergrad.engine import AMP_DTYPES, EpochMeter, train_one_epoch  # noqa: E402
from powergrad.method import build_clipper, build_loss  # noqa: E402
from powergrad.models import build_model  # noqa: E402
from powergrad.optim import build_optimizer, build_scheduler  # noqa: E402

register_configs()

VARIANTS = ("minimal", "ours_ce", "ours_pgt")
PGT_ALPHA = 0.25  # the paper's ResNet-18 value; the cost of PGT does not depend on alpha in (0, 1)


def compose_config(
    model: str,
    method: str,
    *,
    image_size: int,
    batch: int,
    steps: int,
    precision: str,
    channels_last: bool,
    compile: bool,
    device: str,
    threads: int | None,
    extra: tuple[str, ...] = (),
) -> DictConfig:
    """The train config of one benchmark variant: synthetic data, ``steps`` batches per epoch."""
    overrides = [
        f"model={model}",
        f"method={method}",
        "data=synthetic",
        f"data.image_size={image_size}",
        f"data.synthetic_train_images={batch * steps}",
        f"data.synthetic_val_images={batch}",
        "logger=none",
        "trainer.progress=false",
        f"trainer.batch_size={batch}",
        f"trainer.precision={precision}",
        f"trainer.channels_last={channels_last}",
        f"trainer.compile={compile}",
        f"trainer.device={device}",
        f"trainer.threads={'null' if threads is None else threads}",
        # A long schedule so the lr stays near its peak however many chunks run.
        "trainer.epochs=100000",
        "trainer.warmup_epochs=0",
        *extra,
    ]
    if method == "pgt":
        overrides.append(f"method.alpha={PGT_ALPHA}")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate_train(cfg, world_size=1)
    return cfg


@dataclass
class Ours:
    """The trainer's pieces for one config, built as train.py builds them (one process)."""

    train_loader: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    clipper: Callable[[], None]
    device: torch.device
    amp_dtype: torch.dtype | None


def build_ours(
    cfg: DictConfig, run_dir: Path, compile_backend: str = "inductor"
) -> tuple[Ours, Callable[[], None]]:
    """train.py's components for ``cfg`` and a closure that trains one chunk (one epoch).

    ``compile_backend`` is torch.compile's backend when cfg.trainer.compile is set: train.py
    uses inductor; "eager" (dynamo's capture without code generation) checks the same path in
    seconds on a CPU, where inductor takes minutes.
    """
    t = cfg.trainer
    checkpoint.configure_runtime(t.threads, t.deterministic)
    checkpoint.seed_everything(cfg.seed)  # the same initial weights for every variant
    dist = pgdist.setup(t.device)
    shard = Shard(batch_size=t.batch_size, rank=0, world_size=1, device=dist.device, seed=cfg.seed)
    loader_cfg = OmegaConf.to_object(cfg.loader)  # synthetic data: workers are not used
    loader_cfg.workers = 0
    loaders = build_loaders(OmegaConf.to_object(cfg.data), loader_cfg, shard)
    model = build_model(cfg.model.name, loaders.num_classes, drop_rate=cfg.model.drop_rate)
    model = model.to(dist.device, memory_format=torch.channels_last if t.channels_last else None)
    optimizer = build_optimizer(
        model,
        global_batch=t.batch_size,
        lr_per_256=cfg.optim.lr_per_256,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov,
        fused=t.precision != "fp16",  # as train.py: no fused SGD under a GradScaler
    )
    ours = Ours(
        train_loader=loaders.train,
        model=torch.compile(model, backend=compile_backend) if t.compile else model,
        optimizer=optimizer,
        scheduler=build_scheduler(
            optimizer,
            cfg.sched,
            epochs=t.epochs,
            warmup_epochs=t.warmup_epochs,
            iters_per_epoch=len(loaders.train),
        ),
        scaler=torch.amp.GradScaler(dist.device.type, enabled=t.precision == "fp16"),
        loss_fn=build_loss(cfg.method),
        clipper=build_clipper(cfg.method, model),
        device=dist.device,
        amp_dtype=AMP_DTYPES[t.precision],
    )
    state, meter = TrainState(), EpochMeter(dist.device)

    def chunk() -> None:
        for _ in train_one_epoch(
            ours.model,
            ours.train_loader,
            ours.loss_fn,
            ours.optimizer,
            ours.scaler,
            ours.scheduler,
            ours.clipper,
            meter,
            state,
            amp_dtype=ours.amp_dtype,
            channels_last=t.channels_last,
        ):
            pass
        state.epoch += 1
        state.batch = 0

    return ours, chunk


def minimal_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.SGD:
    """Hand-written SGD setup with the trainer's hyper-parameters: no decay on 1-D parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.optim.lr_per_256 * cfg.trainer.batch_size / 256
    return torch.optim.SGD(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.optim.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
    )


def build_minimal(
    cfg: DictConfig,
    images: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    compile_backend: str = "inductor",
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[int], list[torch.Tensor]]]:
    """A minimal PyTorch training loop on the given batch; returns (model, optimizer, run).

    ``run(k)`` trains k steps and returns the k losses (device tensors, no host sync).
    """
    t = cfg.trainer
    # The same seed as the trainer's variants: the same initial weights.
    checkpoint.configure_runtime(t.threads, t.deterministic)
    checkpoint.seed_everything(cfg.seed)
    device = images.device
    model = build_model(cfg.model.name, num_classes, drop_rate=cfg.model.drop_rate)
    fmt = torch.channels_last if t.channels_last else torch.preserve_format
    model = model.to(device, memory_format=fmt)
    optimizer = minimal_optimizer(model, cfg)
    net = torch.compile(model, backend=compile_backend) if t.compile else model
    dtype = AMP_DTYPES[t.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    def run(steps: int) -> list[torch.Tensor]:
        net.train()
        losses = []
        for _ in range(steps):
            # Per step, as a loader's fresh batch would need it.
            x = images.contiguous(memory_format=fmt)
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                loss = F.cross_entropy(net(x), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
        return losses

    return model, optimizer, run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ci95(values: list[float]) -> tuple[float, float, float]:
    """Median and a distribution-free ~95% interval for it (binomial order statistics)."""
    xs = sorted(values)
    n = len(xs)
    half = 0.98 * math.sqrt(n)  # 1.96 * sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half) - 1)
    return statistics.median(xs), xs[lo], xs[hi]


def bench_model(model: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Time minimal / ours_ce / ours_pgt on ``model``, interleaved; returns medians and ratios."""
    common = {
        "image_size": args.image_size,
        "batch": args.batch,
        "steps": args.steps,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "device": args.device,
        "threads": args.threads,
    }
    wanted = args.variants.split(",")
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    backend = args.compile_backend
    ce_cfg = compose_config(model, "baseline", **common)
    chunks: dict[str, Callable[[], None]] = {}
    # The trainer's context is built even when ours_ce is not timed: its loader holds the batch.
    ce_ctx, ce_chunk = build_ours(ce_cfg, tmp / f"{model}-ce", backend)
    images, target = ce_ctx.train_loader.batch
    if "minimal" in wanted:
        _, _, minimal_run = build_minimal(ce_cfg, images, target, ce_cfg.data.num_classes, backend)
        chunks["minimal"] = lambda: minimal_run(args.steps)
    if "ours_ce" in wanted:
        chunks["ours_ce"] = ce_chunk
    if "ours_pgt" in wanted:
        chunks["ours_pgt"] = build_ours(
            compose_config(model, "pgt", **common), tmp / f"{model}-pgt", backend
        )[1]
    device = images.device
    names = list(chunks)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    cpu_seconds: dict[str, list[float]] = {k: [] for k in names}
    peak_mem: dict[str, int] = dict.fromkeys(names, 0)  # bytes, CUDA only
    first_chunk_s: dict[str, float] = {}  # compile, cuDNN autotuning, lazy initialisation
    load_before = os.getloadavg()
    for rnd in range(args.warmup + args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0, c0 = time.perf_counter(), time.process_time()
            chunks[name]()
            _sync(device)
            if rnd == 0:
                first_chunk_s[name] = time.perf_counter() - t0
            if rnd >= args.warmup:
                seconds[name].append(time.perf_counter() - t0)
                cpu_seconds[name].append(time.process_time() - c0)
            if device.type == "cuda":
                peak_mem[name] = max(peak_mem[name], torch.cuda.max_memory_allocated(device))
    images_per_chunk = args.steps * args.batch
    ips = {k: statistics.median(images_per_chunk / s for s in v) for k, v in seconds.items()}

    def paired(num: str, den: str, times: dict[str, list[float]]) -> dict[str, float]:
        # Throughput ratio num/den per round = time(den) / time(num).
        med, lo, hi = median_ci95([b / a for a, b in zip(times[num], times[den], strict=True)])
        return {"median": med, "ci95_lo": lo, "ci95_hi": hi}

    pairs = [
        (a, b)
        for a, b in (("ours_ce", "minimal"), ("ours_pgt", "ours_ce"), ("ours_pgt", "minimal"))
        if a in chunks and b in chunks
    ]
    ratios = {f"ratio_{a}_vs_{b}": paired(a, b, seconds) for a, b in pairs}
    if device.type == "cpu":
        # CPU time of this process (all its threads): what the step itself costs, unaffected
        # by time slices lost to other jobs on a shared machine, which inflate wall time.
        ratios.update({f"cpu_ratio_{a}_vs_{b}": paired(a, b, cpu_seconds) for a, b in pairs})
        ips_cpu = {
            k: statistics.median(images_per_chunk / s for s in v) for k, v in cpu_seconds.items()
        }
    return {
        "model": model,
        "device": str(device),
        "image_size": args.image_size,
        "batch": args.batch,
        "steps_per_chunk": args.steps,
        "rounds": args.rounds,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "compile_backend": backend if args.compile else None,
        "threads": torch.get_num_threads(),
        "images_per_s": ips,
        # The untimed first chunk per variant, seconds (with --compile: the compilation).
        "first_chunk_s": first_chunk_s,
        "images_per_cpu_s": ips_cpu if device.type == "cpu" else None,
        **ratios,
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "peak_rss_mib_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Peak allocated during each variant's chunks (the other variants' weights included).
        "peak_gpu_mem_gib": {k: v / 2**30 for k, v in peak_mem.items()}
        if device.type == "cuda"
        else None,
    }


def _tree_rss_kib(pid: int) -> tuple[int, int]:
    """(VmHWM of ``pid``, summed Pss of ``pid`` and its descendants), KiB, from /proc.

    Pss (proportional set size) splits pages shared between processes among them: forked loader
    workers share most of the parent's pages copy-on-write, so summing their RSS would count
    torch's ~0.5 GB of libraries once per worker.
    """

    def field(p: int, key: str, name: str = "status") -> int:
        try:
            for line in Path(f"/proc/{p}/{name}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def children(p: int) -> list[int]:
        try:
            tasks = Path(f"/proc/{p}/task").iterdir()
            kids = []
            for task in tasks:
                kids += [int(c) for c in (task / "children").read_text().split()]
            return kids
        except OSError:
            return []

    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += field(p, "Pss:", "smaps_rollup")
        todo += children(p)
    return field(pid, "VmHWM:"), total


def peak_rss(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run ``cmd``; sample its memory every 0.1 s. Returns peaks in MiB and the wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    hwm = tree = 0
    while proc.poll() is None:
        h, t = _tree_rss_kib(proc.pid)
        hwm, tree = max(hwm, h), max(tree, t)
        time.sleep(0.1)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {
        "command": " ".join(cmd),
        "peak_rss_main_mib": hwm / 1024,
        "peak_pss_tree_mib": tree / 1024,
        "wall_s": time.perf_counter() - t0,
    }


def rss_report(args: argparse.Namespace, tmp: Path) -> dict:
    """Peak RSS of a short main job (digits, loader workers) and of a ResNet-50 synthetic run."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    py = sys.executable

    def job(name: str, *overrides: str) -> list[str]:
        return [
            py,
            "train.py",
            "logger=none",
            "trainer.progress=false",
            f"hydra.run.dir={tmp}/rss-{name}",
            *overrides,
        ]

    main_job = job("main", f"trainer.epochs={1 if args.tiny else 2}", "trainer.warmup_epochs=0")
    r50 = job(
        "r50",
        "model=resnet50",
        "data=synthetic",
        f"data.image_size={16 if args.tiny else 224}",
        f"data.synthetic_train_images={32 if args.tiny else 64}",
        "data.synthetic_val_images=16",
        "trainer.batch_size=16",
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "trainer.device=cpu",
    )
    if args.tiny:
        main_job += ["model=resnet18", "trainer.batch_size=64", "loader.workers=0"]
    return {
        "main_job": peak_rss(main_job, ROOT, env),
        "resnet50_synthetic": peak_rss(r50, ROOT, env),
    }


def _toy_config(method: str, steps: int, device: str, precision: str = "fp32") -> DictConfig:
    """ResNet-18, 32 px, batch 4, ``steps`` steps per epoch, eager, one thread."""
    return compose_config(
        "resnet18",
        method,
        image_size=32,
        batch=4,
        steps=steps,
        precision=precision,
        channels_last=False,
        compile=False,
        device=device,
        threads=1,
    )


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    try:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    except AssertionError:
        return False
    return True


def check_same_training(device: str, tmp: Path) -> dict:
    """Same initial weights, batch and hyper-parameters: after two SGD steps (fp32) the minimal
    loop and the trainer's chunk hold the same weights, BN statistics and momentum buffers, so
    their timing ratio compares equal work."""
    cfg = _toy_config("baseline", steps=2, device=device)
    ours, chunk = build_ours(cfg, tmp / "same-ours")
    images, target = ours.train_loader.batch
    model, optimizer, run = build_minimal(cfg, images, target, cfg.data.num_classes)
    before = {k: v.clone() for k, v in ours.model.state_dict().items()}
    minimal_before = model.state_dict()
    initial_differ = [k for k, v in before.items() if not torch.equal(v, minimal_before[k])]
    run(2)
    chunk()
    after_ours, after_min = ours.model.state_dict(), model.state_dict()
    # The trainer's cosine lr leaves its peak over trainer.epochs=100000: at its 2nd step the
    # relative difference is ~1e-9 or less, far below the tolerance.
    state_differ = [k for k, v in after_min.items() if not _close(after_ours[k], v)]
    moved = sum(not torch.equal(v, before[k]) for k, v in after_min.items())
    ours_momentum = [ours.optimizer.state[p]["momentum_buffer"] for p in ours.model.parameters()]
    min_momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    momentum_differ = sum(
        not _close(a, b) for a, b in zip(ours_momentum, min_momentum, strict=True)
    )
    max_diff = max(
        (after_ours[k].double() - v.double()).abs().max().item()
        for k, v in after_min.items()
        if v.is_floating_point()
    )
    return {
        "ok": not initial_differ and not state_differ and moved > 0 and momentum_differ == 0,
        "initial_differ": initial_differ,
        "state_differ": state_differ,
        "state_tensors": len(after_min),
        "state_tensors_moved": moved,
        "momentum_buffers": len(min_momentum),
        "momentum_differ": momentum_differ,
        "max_abs_state_diff": max_diff,
    }


def check_meter_losses(device: str, tmp: Path) -> dict:
    """Three steps of the trainer (powergrad.engine.train_one_epoch, fp32) yield the minimal
    loop's losses, and its EpochMeter counts them: 12 samples, none non-finite, the same sum."""
    steps, batch = 3, 4
    cfg = _toy_config("baseline", steps=steps, device=device)
    ours, _ = build_ours(cfg, tmp / "meter-ours")
    images, target = ours.train_loader.batch
    _, _, run = build_minimal(cfg, images, target, cfg.data.num_classes)
    minimal = torch.stack(run(steps)).double().cpu()
    meter = EpochMeter(ours.device)
    trainer = [
        loss.detach()
        for loss in train_one_epoch(
            ours.model,
            ours.train_loader,
            ours.loss_fn,
            ours.optimizer,
            ours.scaler,
            ours.scheduler,
            ours.clipper,
            meter,
            TrainState(),
            amp_dtype=ours.amp_dtype,
            channels_last=cfg.trainer.channels_last,
        )
    ]
    trainer_losses = torch.stack(trainer).double().cpu()
    loss_sum, _, samples, nonfinite = meter.sums.tolist()
    return {
        "ok": len(trainer) == steps
        and samples == steps * batch
        and nonfinite == 0
        and math.isclose(loss_sum / batch, minimal.sum().item(), rel_tol=1e-5)
        and _close(trainer_losses, minimal, rtol=1e-5, atol=1e-6),
        "minimal_losses": minimal.tolist(),
        "trainer_losses": trainer_losses.tolist(),
        "meter_loss_sum_per_image": loss_sum / batch,
        "meter_samples": samples,
        "meter_nonfinite": nonfinite,
    }


def check_median_ci95() -> dict:
    """The interval of 1..21 brackets its median 11; one value is its own median."""
    med, lo, hi = median_ci95([float(x) for x in range(1, 22)])
    single = median_ci95([2.0])
    return {
        "ok": med == 11.0 and lo < med < hi and single[0] == 2.0,
        "median_lo_hi_1_to_21": [med, lo, hi],
        "median_lo_hi_single": list(single),
    }


def check_peak_rss(tmp: Path) -> dict:
    """The sampler sees a child write 300 MiB (written, not just reserved; held 0.6 s)."""
    code = "import time; b = b'x' * (300 * 2**20); time.sleep(0.6)"
    out = peak_rss([sys.executable, "-c", code], tmp, {})
    # A sample may land before the last pages are touched: the tree's PSS gets some slack.
    out["ok"] = out["peak_rss_main_mib"] >= 300 and out["peak_pss_tree_mib"] >= 250
    return out


def check_no_host_sync(device: str, tmp: Path) -> dict:
    """Between log steps the trainer's step (bf16 and fp32) never syncs the host with the GPU."""
    if device != "cuda" or not torch.cuda.is_available():
        return {"ok": False, "error": "no_host_sync needs --device cuda and a CUDA device"}
    out: dict[str, Any] = {}
    for precision in ("bf16", "fp32"):
        cfg = _toy_config("baseline", steps=6, device=device, precision=precision)
        ours, chunk = build_ours(cfg, tmp / f"sync-{precision}")
        chunk()  # warm-up: cuDNN autotuning and lazy initialisation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        error = None
        try:
            chunk()  # steps 7..12: no log step (log_every_steps=50) inside
        except RuntimeError as e:
            error = str(e)[:2000]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        steps = int(ours.train_loader.steps)
        out[precision] = {"ok": error is None and steps == 6, "error": error, "steps": steps}
    out["ok"] = all(r["ok"] for r in out.values())
    return out


SELF_CHECKS = ("same_training", "meter_losses", "median_ci95", "peak_rss", "no_host_sync")


def self_check(names: list[str], device: str) -> dict[str, dict]:
    """Run the named checks; a check that raises counts as failed, with its error."""
    unknown = set(names) - set(SELF_CHECKS)
    if unknown:
        raise SystemExit(f"unknown checks {sorted(unknown)}; choose from {', '.join(SELF_CHECKS)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train-check-") as tmp_dir:
        tmp = Path(tmp_dir)
        checks: dict[str, Callable[[], dict]] = {
            "same_training": lambda: check_same_training(device, tmp),
            "meter_losses": lambda: check_meter_losses(device, tmp),
            "median_ci95": check_median_ci95,
            "peak_rss": lambda: check_peak_rss(tmp),
            "no_host_sync": lambda: check_no_host_sync(device, tmp),
        }
        for name in names:
            try:
                results[name] = checks[name]()
            except Exception as e:  # a crash is a failed check, reported with the others
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    return results


def _print_table(res: dict) -> None:
    print(
        f"\n{res['model']}  {res['device']}  {res['image_size']}px batch={res['batch']} "
        f"{res['precision']} channels_last={res['channels_last']} compile={res['compile']} "
        f"threads={res['threads']} rounds={res['rounds']}x{res['steps_per_chunk']} steps  "
        f"load1={res['loadavg_1min_before_after'][0]:.2f}->{res['loadavg_1min_before_after'][1]:.2f}"
    )
    cpu = res.get("images_per_cpu_s") or {}
    for k, v in res["images_per_s"].items():
        extra = f"   {cpu[k]:>8.2f} images per CPU-second" if k in cpu else ""
        print(f"  {k:<10}{v:>10.2f} images/s{extra}")
    for prefix in ("ratio_", "cpu_ratio_"):
        for key, target in (
            ("ours_ce_vs_minimal", 0.97),
            ("ours_pgt_vs_ours_ce", 0.995),
            ("ours_pgt_vs_minimal", None),
        ):
            if prefix + key not in res:
                continue
            r = res[prefix + key]
            goal = f"  (target >= {target})" if target else ""
            label = f"{'wall' if prefix == 'ratio_' else 'cpu '} {key}"
            print(
                f"  {label:<25}{r['median']:>8.4f}  95% [{r['ci95_lo']:.4f}, {r['ci95_hi']:.4f}]"
                f"{goal}"
            )


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, bench each model, print a table and one JSON line per model."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50", help="comma-separated model names")
    ap.add_argument("--image-size", type=int, default=128, help="square image side, pixels")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed chunk")
    ap.add_argument("--rounds", type=int, default=21, help="timed rounds (chunks per variant)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile both loops")
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend with --compile (train.py's: inductor; eager: capture only)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (1, as the main job: on a shared 2-core CPU, 2 threads "
        "inflate timings through OpenMP barrier stalls); 0 leaves torch's default",
    )
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS)
    )
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS (subprocesses)")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: tiny sizes, few rounds")
    ap.add_argument(
        "--self-check",
        metavar="CHECKS",
        default=None,
        help="instead of timing, check that the benchmark measures what it claims: a "
        f"comma-separated subset of {','.join(SELF_CHECKS)}; prints one JSON line, exits 1 "
        "when a check fails",
    )
    args = ap.parse_args(argv)
    if args.self_check is not None:
        checks = self_check([c for c in args.self_check.split(",") if c], args.device)
        print(json.dumps({"self_check": checks}))
        failed = [name for name, r in checks.items() if not r["ok"]]
        if failed or not checks:
            raise SystemExit(f"self-check failed: {', '.join(failed) or 'no check named'}")
        return [{"self_check": checks}]
    if args.threads == 0:
        args.threads = None
    if args.tiny:
        args.image_size, args.batch, args.steps, args.rounds, args.warmup = 32, 4, 1, 3, 1
    random.seed(0)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        for model in [m for m in args.models.split(",") if m]:  # "" with --rss: memory only
            res = bench_model(model, args, Path(tmp))
            _print_table(res)
            print(json.dumps(res))
            results.append(res)
        if args.rss:
            rss = rss_report(args, Path(tmp))
            print("\npeak memory (MiB): main process RSS / process tree PSS incl. loader workers")
            for name, r in rss.items():
                print(
                    f"  {name:<20}{r['peak_rss_main_mib']:>9.1f} /{r['peak_pss_tree_mib']:>9.1f}"
                    f"   ({r['wall_s']:.0f} s: {r['command']})"
                )
            print(json.dumps({"peak_rss": rss}))
            results.append({"peak_rss": rss})
    return results


if __name__ == "__main__":
    main()
