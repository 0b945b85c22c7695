"""Train one model: ``python train.py [group=option ...] [key=value ...]`` (Hydra).

With no argument: ResNet-18 baseline on the embedded digits dataset, on CPU. The main job is
``python train.py -m method=baseline,pgt`` (one multirun over the method; a side-by-side table
and an accuracy-vs-epoch plot land in the sweep directory). See configs/train.yaml.

The run reads top to bottom: settle the run directory, build the loaders, model, optimizer,
schedule, loss, clipper and tracker, restore a checkpoint when continuing, then the epoch loop.
"""

from __future__ import annotations

import os

# Before torch is imported (libgomp reads it once): idle OpenMP threads sleep instead of
# spinning, so 2 intra-op threads beside a loader worker do not thrash (powergrad.resources).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3

from powergrad import checkpoint, resources, rundir
from powergrad import distributed as pgdist
from powergrad.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    NonFiniteError,
    TrainState,
    rank_best,
)
from powergrad.command_line import exit_on_bad_command_line
from powergrad.config import ConfigError, TrainConfig, register_configs, validate_train
from powergrad.data import DatasetError, Shard, build_loaders, file_list_change
from powergrad.diagnostics import filter_norm_record
from powergrad.engine import (
    AMP_DTYPES,
    EpochMeter,
    build_mixup,
    check_finite,
    evaluate,
    make_grad_scaler,
    optimizer_steps,
    share_rank0_buffers,
    train_one_epoch,
)
from powergrad.fileio import DiskFullError
from powergrad.method import (
    build_clipper,
    build_loss,
    initial_loss_scale,
    method_label,
    method_tags,
)
from powergrad.models import build_model, pretrained_file
from powergrad.optim import build_optimizer, build_scheduler
from powergrad.preemption import MARKER, Preempted, PreemptionWatcher, exit_for_requeue
from powergrad.tracking import Progress, Tracker, config_key, git_sha, run_name

register_configs()


def settle_run_dir(
    cfg: DictConfig, dist: pgdist.DistInfo
) -> tuple[DictConfig, Path, dict[str, Any] | None, list[str]]:
    """Claim the run directory (rank 0, for the run's life) and, when continuing a run, take
    the config stored in its last.pt (or, for a run that died before any checkpoint, its
    config.yaml) with this command's overrides; returns (cfg, run_dir, last.pt or None,
    changes)."""
    hydra_cfg = HydraConfig.get()
    # Rank 0's directory is the run's (other ranks only read from it).
    run_dir = Path(cfg.trainer.resume or pgdist.broadcast_object(hydra_cfg.runtime.output_dir))
    run_dir = run_dir.expanduser().resolve()
    decision: tuple[bool, str | None] = (False, None)
    if dist.is_main:
        try:
            held = rundir.claim(
                run_dir, resume=bool(cfg.trainer.resume), auto_resume=cfg.trainer.auto_resume
            )
            decision = (held.resume, None)
        except ConfigError as e:
            decision = (False, str(e))
    resume, error = pgdist.broadcast_object(decision)  # every rank raises the same error
    if error:
        raise ConfigError(error)
    changes: list[str] = []
    try:
        # last.pt is the run's authority: its config, and its ranking of the best epochs.
        ckpt = checkpoint.load_for_resume(run_dir) if resume else None
        saved = ckpt["config"] if ckpt else None
        if ckpt and dist.is_main:
            rundir.report_config_copy(run_dir, saved)
        if saved is None and cfg.trainer.resume:  # the run died before its first checkpoint
            saved = rundir.read_config(run_dir)
        if saved is not None:
            cfg, changes = rundir.resume_config(
                cfg, saved, list(hydra_cfg.overrides.task), allow_changes=cfg.trainer.allow_changes
            )
            validate_train(cfg)
        if ckpt:  # accepted: best files that a kill or a full disk cut off are put right
            checkpoint.agree_best(run_dir, ckpt)
    except BaseException:
        rundir.release(run_dir)  # refused: nothing of this start is written, nothing held
        raise
    if ckpt and dist.is_main:
        print(rundir.resume_note(run_dir, ckpt, cfg.trainer.epochs), file=sys.stderr)
    return cfg, run_dir, ckpt, changes


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, settle the run directory and train; returns the run summary. A new
    run that fails before its first checkpoint leaves nothing behind (rundir.abandon)."""
    if HydraConfig.get().mode == RunMode.MULTIRUN and cfg.trainer.resume:
        raise ConfigError("trainer.resume continues one run; run it without -m / --multirun")
    validate_train(cfg)
    dist = pgdist.setup(cfg.trainer.device, timeout_min=cfg.trainer.dist_timeout_min)
    cfg, run_dir, ckpt, changes = settle_run_dir(cfg, dist)
    try:
        return run(cfg, dist, run_dir, ckpt, changes)
    except BaseException:
        if dist.is_main:
            rundir.abandon(run_dir)
        raise


def run(
    cfg: DictConfig,
    dist: pgdist.DistInfo,
    run_dir: Path,
    ckpt: dict[str, Any] | None,
    changes: list[str],
) -> dict[str, Any]:
    """Train in the settled ``run_dir``, continuing from ``ckpt`` (last.pt) when given."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    t, device = cfg.trainer, dist.device
    threads, workers = resources.resolve(
        t.threads, cfg.loader.workers, accelerator=device.type != "cpu"
    )
    checkpoint.configure_runtime(threads, t.deterministic)
    checkpoint.seed_everything(cfg.seed)

    # Data first: a bad dataset folder fails in seconds, before any model is built.
    shard = Shard(
        batch_size=t.batch_size // (dist.world_size * t.accum_steps),  # loader batch per rank
        rank=dist.rank,
        world_size=dist.world_size,
        device=device,
        seed=cfg.seed,
        local_rank=dist.local_rank,
        channels_last=t.channels_last,  # DALI then hands out channels_last batches, no copy
    )
    loader_cfg = dataclasses.replace(OmegaConf.to_object(cfg.loader), workers=workers)
    loaders = build_loaders(OmegaConf.to_object(cfg.data), loader_cfg, shard, run_dir=run_dir)
    if ckpt and (change := file_list_change(ckpt.get("file_list"), loaders.file_list_digest())):
        print(f"warning: {change}", file=sys.stderr)
    model = build_model(
        cfg.model.name,
        loaders.num_classes,
        drop_rate=cfg.model.drop_rate,
        zero_init_last=cfg.model.zero_init_last,
    )
    init = cfg.model.init or (pretrained_file(cfg.model.name) if cfg.model.pretrained else None)
    # Fine-tuning (a continued run has its own weights): the head is reset on a class change.
    if init and not ckpt and checkpoint.init_weights(model, Path(init).expanduser()):
        print(f"{init}: classifier re-initialised for {loaders.num_classes} classes")
    model = model.to(device, memory_format=torch.channels_last if t.channels_last else None)
    # EMA of the weights (timm), updated after each optimizer step; None when off.
    ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema_decay is not None else None
    if dist.rank:
        # Own random streams per rank from here on (dropout masks, ...); the weights above were
        # drawn with cfg.seed on every rank (DDP broadcasts rank 0's anyway).
        checkpoint.seed_everything(cfg.seed, rank=dist.rank)
    scaler = make_grad_scaler(
        device,
        t.precision,
        skip_nonfinite_steps=t.skip_nonfinite_steps,
        init_scale=initial_loss_scale(cfg.method, shard.batch_size),  # the authors' hook: N^2
    )
    optimizer = build_optimizer(
        model,
        global_batch=t.batch_size,
        lr_per_256=cfg.optim.lr_per_256,
        peak=cfg.optim.peak_lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov,
        fused=not scaler.is_enabled(),  # fused SGD mishandles skipped steps (build_optimizer)
    )
    steps_per_epoch = optimizer_steps(len(loaders.train), t.accum_steps)
    scheduler = build_scheduler(
        optimizer,
        cfg.sched,
        epochs=t.epochs,
        warmup_epochs=t.warmup_epochs,
        iters_per_epoch=steps_per_epoch,
    )
    # Mixup / CutMix (None when off) carry method.label_smoothing in their soft targets.
    mixup = build_mixup(
        t.mixup_alpha, t.cutmix_alpha, cfg.method.label_smoothing, loaders.num_classes
    )
    loss_fn = build_loss(
        cfg.method if mixup is None else OmegaConf.merge(cfg.method, {"label_smoothing": 0.0})
    )
    clip = build_clipper(cfg.method, model)
    amp_dtype = AMP_DTYPES[t.precision]
    net = model
    if dist.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if t.compile:
        net = torch.compile(net)

    config = OmegaConf.to_container(cfg, resolve=True)
    sha = git_sha()
    file_list = loaders.file_list_digest()  # in every checkpoint: a resume says if it changed
    tracker = Tracker(
        run_dir,
        config,
        cfg.logger,
        tags=[f"model:{cfg.model.name}", *method_tags(cfg.method), f"sched:{cfg.sched.name}"],
        group=cfg.experiment_name or (Path(HydraConfig.get().sweep.dir).name if multirun else None),
        # Seeds of one configuration share the wandb job_type (-m or launched one by one), so
        # the dashboard averages them; logger.job_type wins when set.
        job_type=config_key(config),
        name=run_name(config),
        run_id=ckpt["wandb_id"] if ckpt else None,
        enabled=dist.is_main,
        git_sha=sha,
    )
    meter = EpochMeter(device)
    state = TrainState()
    if ckpt:
        state = checkpoint.restore(
            ckpt,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            scheduler=scheduler,
            meter=meter,
            loader=loaders.train,
            ema=ema,
            accum_steps=t.accum_steps,
        )
        if changes:  # opted in with trainer.allow_changes: on record in wandb and metrics.jsonl
            print(f"continuing with changed settings: {'; '.join(changes)}", file=sys.stderr)
            tracker.record_changes(state.step, changes)
    if dist.is_main:
        # config.yaml (this start's config, as its checkpoints store it) and .hydra/: once the
        # start is under way, so a start refused or failed before here has written neither.
        rundir.write_provenance(run_dir, cfg, resume=ckpt is not None)

    # Checkpoints are written on a background thread (serialization + fsync overlap training).
    writer = checkpoint.Writer()

    def save(best: bool = False) -> None:
        checkpoint.save(
            run_dir,
            model=net,
            optimizer=optimizer,
            scaler=scaler,
            scheduler=scheduler,
            state=state,
            meters=meter.reduced_state(),
            loader_state=loaders.train.state_dict(),
            config=config,
            wandb_id=tracker.run_id,
            git_sha=sha,
            file_list=file_list,
            best=best,
            ema=ema,
            writer=writer,
        )

    def validate(module: torch.nn.Module, compiled: bool = False) -> dict[str, float]:
        return evaluate(
            module,
            loaders.val,
            device=device,
            amp_dtype=amp_dtype,
            channels_last=t.channels_last,
            pad_last_batch=compiled,  # one input shape: no recompilation for the last batch
        )

    label = method_label(cfg.method.alpha, cfg.method.clip_mode, cfg.method.impl)
    progress = Progress(
        total=t.epochs * steps_per_epoch,
        done=state.step,
        epochs=t.epochs,
        images_per_step=t.batch_size,
        # On a terminal a bar; else (a cluster's log file) one line per log_every_steps steps.
        bar=t.progress and sys.stderr.isatty(),
        desc=label if cfg.method.alpha is None else f"{label} a={cfg.method.alpha:g}",
        enabled=dist.is_main,
    )
    tracker.write_history(state.history)
    tracker.truncate_filter_norms(state.step)
    try:
        with PreemptionWatcher(dist, t.preempt_check_every_steps) as watcher:
            while state.epoch < t.epochs:
                epoch_start, images_before = time.perf_counter(), meter.images()
                for loss in train_one_epoch(
                    net,
                    loaders.train,
                    loss_fn,
                    optimizer,
                    scaler,
                    scheduler,
                    clip,
                    meter,
                    state,
                    amp_dtype=amp_dtype,
                    channels_last=t.channels_last,
                    accum_steps=t.accum_steps,
                    ema=ema,
                    mixup=mixup,
                ):
                    progress.update()
                    if state.step % t.log_every_steps == 0:
                        check_finite(meter, state, skipped_by_scaler=scaler.is_enabled())
                        lr, loss = optimizer.param_groups[0]["lr"], loss.item()
                        tracker.log_step(state.step, {"loss": loss, "lr": lr})
                        progress.log_step(state.epoch, state.step, loss, lr)
                    every = t.filter_norms_every_steps
                    if every and state.step % every == 0 and dist.is_main:
                        record = filter_norm_record(model)
                        tracker.log_filter_norms(
                            {"step": state.step, "epoch": state.epoch, **record}
                        )
                    if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0:
                        save()
                    if watcher.should_stop(state.step):
                        save()
                        writer.wait()
                        watcher.stop(run_dir, state.step)  # raises Preempted

                check_finite(meter, state, skipped_by_scaler=scaler.is_enabled())
                train = meter.compute()
                batches = steps_per_epoch * t.accum_steps * dist.world_size
                if train["nonfinite_losses"] >= batches:
                    # fp16: the scaler skipped every step of the epoch; the weights are bad.
                    raise NonFiniteError(f"every loss of epoch {state.epoch + 1} was non-finite")
                train_s = time.perf_counter() - epoch_start
                val = val_ema = None
                if state.epoch + 1 == t.epochs or (state.epoch + 1) % t.eval_every_epochs == 0:
                    val = validate(net, compiled=t.compile)
                    if ema is not None:
                        share_rank0_buffers(ema.module)  # every rank scores rank 0's EMA
                        val_ema = validate(ema.module)
                record = {
                    "epoch": state.epoch + 1,
                    "step": state.step,
                    "lr": optimizer.param_groups[0]["lr"],
                    **train,
                    **{f"val_{k}": v for k, v in (val or {}).items()},
                    **{f"val_ema_{k}": v for k, v in (val_ema or {}).items()},
                    "images_per_s": (train["train_images"] - images_before) / max(train_s, 1e-9),
                    "epoch_s": time.perf_counter() - epoch_start,
                }
                if changes:
                    record["config_changes"] = changes
                    changes = []
                state.history.append(record)
                state.nonfinite_losses += train["nonfinite_losses"]
                # Among the trainer.keep_best best by val top-1: its weights file is written.
                ranks = val is not None and rank_best(
                    state, val["top1"], state.epoch + 1, t.keep_best
                )
                state.epoch, state.batch = state.epoch + 1, 0
                meter = EpochMeter(device)
                tracker.log_epoch(state.history)
                progress.log_epoch(record)
                save(best=ranks)
                # A signal during evaluation: the checkpoint above is the one to resume from.
                if state.epoch < t.epochs and watcher.should_stop(None):
                    writer.wait()
                    watcher.stop(run_dir, state.step)  # raises Preempted
            writer.wait()  # the last checkpoint is on disk before the run reports success
    except NonFiniteError as e:
        _wait_quietly(writer)
        tracker.finish(exit_code=1)
        last = run_dir / LAST
        where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written"
        raise NonFiniteError(
            f"{e} (precision={t.precision}); {where}. Lower optim.lr_per_256, clip "
            "(method=gc / agc), or use trainer.precision=fp16 to skip such steps"
        ) from None
    except Preempted:
        tracker.finish(exit_code=1, preempted=True)
        raise
    except BaseException:
        _wait_quietly(writer)
        tracker.finish(exit_code=1)
        raise
    finally:
        progress.close()
        # Pipelines, threads and workers go now, also on errors and preemption (the loaders
        # start none before the first epoch or evaluation above).
        loaders.close()

    summary = summarize(cfg, state, dist, loaders.train_images, tracker, sha, run_dir)
    if cfg.logger.log_checkpoints != "none":  # opt-in: a wandb Artifact of type "model"
        file = run_dir / (BEST if cfg.logger.log_checkpoints == "best" else LAST)
        tracker.log_checkpoint(file, cfg.logger.log_checkpoints, {"epoch": state.epoch, **summary})
    tracker.finish(exit_code=0)
    if dist.is_main:
        (run_dir / MARKER).unlink(missing_ok=True)  # finished: a later start must not resume
    return summary


def _wait_quietly(writer: checkpoint.Writer) -> None:
    """Let the checkpoint write in flight finish; the error being raised is the one to report."""
    try:
        writer.wait()
    except Exception as e:
        print(f"warning: the last checkpoint write failed too: {e}", file=sys.stderr)


def summarize(cfg, state, dist, train_images, tracker, sha, run_dir) -> dict[str, Any]:
    """summary.json: what ran, the last epoch's metrics, the best epoch, provenance."""
    final = state.history[-1] if state.history else {}
    summary = {
        "model": cfg.model.name,
        "method": method_label(cfg.method.alpha, cfg.method.clip_mode, cfg.method.impl),
        "alpha": cfg.method.alpha,
        "sched": cfg.sched.name,
        "label_smoothing": cfg.method.label_smoothing,
        "clip_mode": cfg.method.clip_mode,
        "seed": cfg.seed,
        "dataset": cfg.data.name,
        "batch_size": cfg.trainer.batch_size,
        "accum_steps": cfg.trainer.accum_steps,
        "precision": cfg.trainer.precision,
        "world_size": dist.world_size,
        "train_images": train_images,
        "train_top1": final.get("train_top1"),
        # val_top1 is the last epoch's (val_top1_final); the paper's tables report the best.
        "val_top1": final.get("val_top1"),
        "val_top1_final": final.get("val_top1"),
        "val_top1_best": state.best_val_top1 if state.best_epoch else None,
        "best_epoch": state.best_epoch or None,
        "val_top5": final.get("val_top5"),
        "val_ema_top1": final.get("val_ema_top1"),  # trainer.ema_decay: the EMA weights'
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "logit_norm": final.get("val_logit_norm"),
        "train_logit_norm": final.get("train_logit_norm"),
        "best_val_top1": state.best_val_top1,
        "epochs": state.epoch,
        "steps": state.step,
        "val_images": final.get("val_images"),
        "nonfinite_losses": state.nonfinite_losses,
        "git_sha": sha,
        "wandb_id": tracker.run_id,
        "wall_s": state.elapsed_s(),
        "run_dir": str(run_dir),
    }
    tracker.write_summary(summary)
    return summary


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: one-line errors for bad configs, datasets and checkpoints."""
    try:
        return train(cfg)["val_top1"]
    except (ConfigError, DatasetError, CheckpointError, NonFiniteError, DiskFullError) as e:
        hydra_cfg, rank = HydraConfig.get(), pgdist.env_world()[0]
        if rank == 0:
            # A refused start leaves nothing behind (Hydra made its directories before we ran).
            rundir.discard_if_empty(Path(hydra_cfg.runtime.output_dir))
            if hydra_cfg.mode == RunMode.MULTIRUN:
                rundir.discard_sweep_if_empty(Path(hydra_cfg.sweep.dir))
        # Every rank raises a config error alike (validation, the claim's broadcast decision):
        # rank 0 says it once; other errors may be a rank's own.
        if rank == 0 or not isinstance(e, ConfigError):
            print(f"error: {e}", file=sys.stderr)
        if pgdist.in_submitit_job():
            # Raised, submitit stores the error as the job's result and the sweep reports it as
            # soon as the job ends; after a bare exit the sweep would wait for sacct to say
            # FAILED (polled minutes apart, and never on a cluster without accounting).
            raise
        sys.exit(2)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        pgdist.cleanup()
        exit_for_requeue(e)
    finally:
        # A multirun's jobs share the process (and its process group): leave it at exit.
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            pgdist.cleanup()


if __name__ == "__main__":
    # A typo or bad value (any job of a sweep) ends here in one line, before Hydra writes.
    exit_on_bad_command_line(
        Path(__file__).parent / "configs", "train", schema=TrainConfig, validate=validate_train
    )
    main()
