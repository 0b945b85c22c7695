"""Wire the builders into a :class:`powergrad.engine.TrainContext` and run it (used by train.py).

Order matters: the dataset is checked (``build_loaders``) before any model is built, so a bad
data folder fails in seconds; the config was validated before that.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from powergrad import distributed as pgdist
from powergrad.checkpoint import LAST, load_checkpoint
from powergrad.config import milestone_epochs
from powergrad.data import Loaders, Shard, build_loaders
from powergrad.data.sampling import STREAM_RANK, derive_seed
from powergrad.engine import EpochMeter, TrainContext, TrainState, fit, restore
from powergrad.method import build_clipper, build_criterion, method_tags
from powergrad.models import build_model
from powergrad.optim import build_optimizer, build_scheduler, fused_sgd_allowed
from powergrad.preemption import MARKER, Preempted, PreemptionWatcher
from powergrad.tracking import Tracker, git_sha

__all__ = [
    "CONFIG_FILE",
    "build_context",
    "build_run_loaders",
    "prepare_runtime",
    "run_training",
]

# The resolved config of the run's first start; trainer.resume checks against it.
CONFIG_FILE = "config.yaml"


def prepare_runtime(cfg: DictConfig) -> None:
    """CPU threads, determinism switches and every seed, before anything random happens."""
    t = cfg.trainer
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.use_deterministic_algorithms(t.deterministic)
    torch.backends.cudnn.benchmark = not t.deterministic
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)


def build_run_loaders(cfg: DictConfig, info: pgdist.DistInfo, global_batch: int) -> Loaders:
    """cfg.data / cfg.loader's loaders for this process, seeded by cfg.seed.

    `global_batch` is split evenly over the ranks; the callers check it is a multiple of the
    world size (validate_train, eval.py).
    """
    shard = Shard(
        batch_size=global_batch // info.world_size,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        seed=cfg.seed,
    )
    return build_loaders(OmegaConf.to_object(cfg.data), OmegaConf.to_object(cfg.loader), shard)


def build_context(
    cfg: DictConfig,
    run_dir: Path,
    info: pgdist.DistInfo,
    *,
    group: str | None = None,
    job_type: str | None = None,
    wandb_id: str | None = None,
) -> TrainContext:
    """Loaders, model (DDP / compiled as configured), optimizer, schedule, method, tracker."""
    t, m, s = cfg.trainer, cfg.method, cfg.sched
    loaders = build_run_loaders(cfg, info, t.batch_size)
    model = build_model(cfg.model.name, loaders.num_classes, drop_rate=cfg.model.drop_rate)
    model = model.to(info.device, memory_format=torch.channels_last if t.channels_last else None)
    if info.rank:
        # Own random streams per rank from here on (dropout masks, ...): the same seed would
        # repeat one rank's draws on all. Rank 0 keeps cfg.seed's, so one process is unchanged.
        # The weights above were drawn with cfg.seed on every rank (DDP broadcasts rank 0's).
        rank_seed = derive_seed(cfg.seed, info.rank, STREAM_RANK)
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        torch.manual_seed(rank_seed)
    optimizer = build_optimizer(
        model,
        global_batch=t.batch_size,
        **{k: cfg.optim[k] for k in ("lr_per_256", "momentum", "weight_decay", "nesterov")},
        fused=fused_sgd_allowed(t.precision),
    )
    scheduler = build_scheduler(
        optimizer,
        name=s.name,
        epochs=t.epochs,
        iters_per_epoch=len(loaders.train),
        warmup_epochs=t.warmup_epochs,
        warmup_lr=s.warmup_lr,
        min_lr=s.min_lr,
        cooldown_epochs=s.cooldown_epochs,
        milestones=milestone_epochs(list(s.milestones), t.epochs),
        decay_rate=s.decay_rate,
    )
    net = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if t.compile:
        net = torch.compile(net)
    config = OmegaConf.to_container(cfg, resolve=True)
    sha = git_sha()
    tracker = Tracker(
        run_dir,
        config,
        cfg.logger,
        tags=[f"model:{cfg.model.name}", *method_tags(m), f"sched:{s.name}"],
        group=cfg.experiment_name or group,
        job_type=job_type,
        run_id=wandb_id,
        enabled=info.is_main,
        git_sha=sha,
    )
    meta = {
        "model": cfg.model.name,
        "method": m.name,
        "alpha": m.alpha,
        "sched": s.name,
        "label_smoothing": m.label_smoothing,
        "clip_mode": m.clip_mode,
        "seed": cfg.seed,
        "dataset": cfg.data.name,
        "batch_size": t.batch_size,
        "precision": t.precision,
        "world_size": info.world_size,
        "train_images": loaders.train_images,
        "_label": m.name if m.alpha is None else f"{m.name} a={m.alpha:g}",
    }
    return TrainContext(
        model=net,
        train_loader=loaders.train,
        val_loader=loaders.val,
        criterion=build_criterion(m),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16"),
        clipper=build_clipper(m, model),
        tracker=tracker,
        dist=info,
        trainer=t,
        run_dir=run_dir,
        config=config,
        git_sha=sha,
        meta=meta,
    )


def run_training(
    cfg: DictConfig,
    run_dir: Path,
    info: pgdist.DistInfo,
    *,
    group: str | None = None,
    job_type: str | None = None,
) -> dict[str, Any]:
    """Train (or, with ``trainer.resume``, continue) the run in ``run_dir``; returns the summary.

    The wandb run is finished with exit code 1 if anything fails after it started, marked
    preempting when a preemption signal stopped it (:class:`powergrad.preemption.Preempted`
    propagates to train.py, which exits for the requeue).
    """
    prepare_runtime(cfg)
    ckpt_path = run_dir / LAST
    ckpt = load_checkpoint(ckpt_path) if cfg.trainer.resume and ckpt_path.exists() else None
    if info.is_main and not (run_dir / CONFIG_FILE).exists():
        OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
    ctx = build_context(
        cfg,
        run_dir,
        info,
        group=group,
        job_type=job_type,
        wandb_id=ckpt["wandb_id"] if ckpt else None,
    )
    try:
        meter = EpochMeter(info.device)
        state = restore(ctx, ckpt, meter) if ckpt else TrainState()
        with PreemptionWatcher(info, cfg.trainer.preempt_check_every_steps) as watcher:
            ctx.preemption = watcher
            summary = fit(ctx, state, meter)
    except Preempted:
        ctx.tracker.finish(exit_code=1, preempted=True)
        raise
    except BaseException:
        ctx.tracker.finish(exit_code=1)
        raise
    ctx.tracker.finish(exit_code=0)
    if info.is_main:
        (run_dir / MARKER).unlink(missing_ok=True)  # finished: a later start must not resume
    return summary
