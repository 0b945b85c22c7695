"""Train one model: ``python train.py [group=option ...] [key=value ...]`` (Hydra).

With no argument: ResNet-18 baseline on the embedded digits dataset, on CPU. The main job is
``python train.py -m method=baseline,pgt``. See configs/train.yaml for the groups.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from powergrad import distributed as pgdist
from powergrad.checkpoint import LAST, load_checkpoint
from powergrad.config import ConfigError, milestone_epochs, register_configs, validate_train
from powergrad.data import DatasetError, build_loaders
from powergrad.engine import EpochMeter, TrainContext, TrainState, fit, restore
from powergrad.method import build_clipper, build_criterion, method_tags
from powergrad.models import build_model
from powergrad.optim import build_optimizer, build_scheduler
from powergrad.tracking import Tracker, git_sha

register_configs()


def train(cfg: DictConfig) -> dict:
    """Build everything from ``cfg`` and run :func:`powergrad.engine.fit`; returns the summary."""
    validate_train(cfg)
    t, info = cfg.trainer, pgdist.setup(cfg.trainer.device)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(pgdist.broadcast_object(hydra_cfg.runtime.output_dir)).resolve()
    if not t.resume and ((run_dir / "config.yaml").exists() or (run_dir / LAST).exists()):
        raise ConfigError(
            f"{run_dir} already holds a run; use trainer.resume={run_dir} to continue"
        )
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.use_deterministic_algorithms(t.deterministic)
    torch.backends.cudnn.benchmark = not t.deterministic
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    loaders = build_loaders(
        OmegaConf.to_object(cfg.data),
        OmegaConf.to_object(cfg.loader),
        batch_size=t.batch_size // info.world_size,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        seed=cfg.seed,
    )
    model = build_model(cfg.model.name, loaders.num_classes, drop_rate=cfg.model.drop_rate)
    model = model.to(info.device, memory_format=torch.channels_last if t.channels_last else None)
    optimizer = build_optimizer(
        model,
        global_batch=t.batch_size,
        **{k: cfg.optim[k] for k in ("lr_per_256", "momentum", "weight_decay", "nesterov")},
    )
    s = cfg.sched
    scheduler = build_scheduler(
        optimizer,
        name=s.name,
        epochs=t.epochs,
        iters_per_epoch=len(loaders.train),
        warmup_epochs=t.warmup_epochs,
        warmup_lr=s.warmup_lr,
        min_lr=s.min_lr,
        milestones=milestone_epochs(list(s.milestones), t.epochs),
        decay_rate=s.decay_rate,
    )
    net = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if t.compile:
        net = torch.compile(net)

    ckpt = load_checkpoint(run_dir / LAST) if t.resume and (run_dir / LAST).exists() else None
    config = OmegaConf.to_container(cfg, resolve=True)
    if info.is_main and not (run_dir / "config.yaml").exists():
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    m = cfg.method
    tracker = Tracker(
        run_dir,
        config,
        cfg.logger,
        tags=[f"model:{cfg.model.name}", *method_tags(m), f"sched:{s.name}"],
        group=cfg.experiment_name or (Path(hydra_cfg.sweep.dir).name if multirun else None),
        run_id=ckpt["wandb_id"] if ckpt else None,
        enabled=info.is_main,
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
    ctx = TrainContext(
        net,
        loaders.train,
        loaders.val,
        build_criterion(m),
        optimizer,
        scheduler,
        torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16"),
        build_clipper(m, model),
        tracker,
        info,
        t,
        run_dir,
        config,
        git_sha(),
        meta,
    )
    try:
        meter = EpochMeter(info.device)
        state = restore(ctx, ckpt, meter) if ckpt else TrainState()
        summary = fit(ctx, state, meter)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)
    return summary


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: clear one-line errors for bad configs and datasets."""
    try:
        return train(cfg)["val_top1"]
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        pgdist.cleanup()


if __name__ == "__main__":
    main()
