"""The training loop: :func:`train_one_epoch`, :func:`evaluate`, :func:`fit`.

One step, one copy: autocast (bf16/fp16, or disabled for fp32) around the forward and the loss,
``GradScaler(enabled=precision == "fp16")`` around backward/step, gradient clipping between
``unscale_`` and ``step``, and a per-iteration lr update. Metrics accumulate in device tensors;
the host syncs only every ``trainer.log_every_steps`` steps, at checkpoints and at epoch ends.

Non-finite losses: under fp16 the scaler skips those steps and they are counted; in fp32/bf16
the run stops at the next sync point with :class:`NonFiniteLossError`, before any checkpoint
with bad weights is written, so ``last.pt`` stays the last good state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from powergrad import distributed as pgdist
from powergrad.checkpoint import BEST, LAST, atomic_save, capture_rng, restore_rng
from powergrad.diagnostics import LogitStats, filter_norm_record
from powergrad.models import unwrap_model

__all__ = [
    "AMP_DTYPES",
    "EpochMeter",
    "NonFiniteLossError",
    "TrainContext",
    "TrainState",
    "evaluate",
    "fit",
    "restore",
    "save_checkpoint",
    "train_one_epoch",
]

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
CHECKPOINT_FORMAT = "powergrad-checkpoint-v1"
# best.pt: weights and what identifies them, under its own format so restore() refuses it.
WEIGHTS_FORMAT = "powergrad-weights-v1"
BEST_KEYS = (
    "model",
    "epoch",
    "step",
    "best_val_top1",
    "history",
    "config",
    "wandb_id",
    "git_sha",
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf without fp16 loss scaling to skip the step."""


@dataclass
class TrainState:
    """Where training stands; everything here goes into the checkpoint."""

    epoch: int = 0  # epoch in progress (0-based)
    batch: int = 0  # next batch of that epoch
    step: int = 0  # optimizer steps taken (the scheduler's num_updates)
    best_val_top1: float = float("-inf")
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0  # training wall time of earlier starts of this run, seconds
    nonfinite_losses: int = 0  # over finished epochs


class EpochMeter:
    """Per-epoch training sums on the device: loss (finite only), correct, samples, non-finite."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.logits = LogitStats(device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch (mean-reduced ``loss``) without a host sync."""
        n = target.shape[0]
        finite = torch.isfinite(loss)
        correct = (logits.argmax(dim=1) == target).sum()
        batch = torch.stack(
            [
                torch.where(finite, loss.double() * n, 0.0),
                correct.double(),
                # Filled on the device: new_tensor(n) copies a host scalar with a blocking
                # H2D memcpy, a host sync every step on CUDA.
                torch.full((), n, dtype=torch.float64, device=loss.device),
                (~finite).double(),
            ]
        )
        self.sums += batch
        self.logits.update(logits)

    def nonfinite(self) -> int:
        """Non-finite losses so far this epoch on this rank (host sync)."""
        return int(self.sums[3])

    def reduced_state(self) -> dict[str, Any]:
        """Sums over all ranks as CPU tensors (a collective: every rank must call it)."""
        sums = pgdist.all_reduce_sum(self.sums.clone())
        logit = self.logits.state_dict()
        return {
            "sums": sums.cpu(),
            "logit_sums": pgdist.all_reduce_sum(logit["sums"].to(self.sums.device)).cpu(),
            "logit_max": pgdist.all_reduce_max(logit["max"].to(self.sums.device)).cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`reduced_state` (load on rank 0 only; others start at zero)."""
        self.sums.copy_(state["sums"])
        self.logits.load_state_dict({"sums": state["logit_sums"], "max": state["logit_max"]})

    def compute(self) -> dict[str, float]:
        """Epoch metrics over all ranks: train_loss, train_top1 (%), train_logit_*, counts."""
        loss_sum, correct, samples, nonfinite = pgdist.all_reduce_sum(self.sums.clone()).tolist()
        finite = samples - nonfinite
        out = {
            "train_loss": loss_sum / finite if finite else float("nan"),
            "train_top1": 100.0 * correct / samples if samples else float("nan"),
            "train_images": int(samples),
            "nonfinite_losses": int(nonfinite),
        }
        out.update({f"train_{k}": v for k, v in self.logits.compute().items()})
        return out


@dataclass
class TrainContext:
    """Everything the loop needs, built by train.py.

    ``trainer`` is the ``cfg.trainer`` node; ``config`` the resolved config as a plain dict
    (stored in every checkpoint); ``meta`` extra summary fields (model, method, alpha, ...).
    """

    model: nn.Module
    train_loader: Any
    val_loader: Any
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    clipper: Any
    tracker: Any
    dist: pgdist.DistInfo
    trainer: Any
    run_dir: Path
    config: dict[str, Any]
    git_sha: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)
    # powergrad.preemption.PreemptionWatcher: stop cleanly on SIGTERM / SIGUSR1 (None: never).
    preemption: Any = None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype, None for fp32."""
        return AMP_DTYPES[self.trainer.precision]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _check_finite(
    ctx: TrainContext, state: TrainState, meter: EpochMeter, *, check_weights: bool = False
) -> None:
    """Stop (fp32/bf16) when a non-finite loss was seen; fp16's scaler skipped those steps."""
    if ctx.trainer.precision == "fp16":
        return
    bad = int(pgdist.all_reduce_sum(meter.sums[3:4].clone()).item())
    if not bad and check_weights:
        # A finite loss can still be followed by an update that made the weights inf/NaN.
        total = torch.stack([p.detach().float().sum() for p in ctx.model.parameters()]).sum()
        bad = int(not torch.isfinite(total))
    if bad:
        raise NonFiniteLossError(
            f"non-finite loss or weights in epoch {state.epoch + 1} by step {state.step} with "
            f"precision={ctx.trainer.precision}; stopping. Last good checkpoint: "
            f"{ctx.run_dir / LAST} (weights before the divergence). Lower optim.lr_per_256, "
            "enable clipping (method=gc / agc) or use trainer.precision=fp16 to skip such steps."
        )


def save_checkpoint(
    ctx: TrainContext, state: TrainState, meter: EpochMeter, *, best: bool = False
) -> None:
    """Write last.pt (and best.pt) atomically on rank 0; every rank must call it."""
    _check_finite(ctx, state, meter, check_weights=True)
    meters = meter.reduced_state()
    data_states = pgdist.gather_objects(ctx.train_loader.state_dict())
    rng_states = pgdist.gather_objects(capture_rng())  # ranks draw from their own streams
    if not ctx.dist.is_main:
        return
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap_model(ctx.model).state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict(),
        "scheduler": ctx.scheduler.state_dict(),
        "epoch": state.epoch,
        "batch": state.batch,
        "step": state.step,
        "best_val_top1": state.best_val_top1,
        "history": state.history,
        "wall_s": state.wall_s + (time.perf_counter() - ctx.meta["_start"]),
        "nonfinite_losses": state.nonfinite_losses,
        "meters": meters,
        "rng": rng_states,
        "data": data_states,
        "world_size": ctx.dist.world_size,
        "config": ctx.config,
        "wandb_id": ctx.tracker.run_id,
        "git_sha": ctx.git_sha,
    }
    atomic_save(ckpt, ctx.run_dir / LAST)
    if best:
        # best.pt is for evaluation and fine-tuning: the weights and what identifies them. The
        # optimizer, RNG and loader states (half the bytes for SGD with momentum) live in last.pt.
        best_ckpt = {"format": WEIGHTS_FORMAT, **{k: ckpt[k] for k in BEST_KEYS}}
        atomic_save(best_ckpt, ctx.run_dir / BEST)


def restore(ctx: TrainContext, ckpt: dict[str, Any], meter: EpochMeter) -> TrainState:
    """Load a checkpoint into the context's objects and return the state to continue from."""
    if ckpt.get("format") == WEIGHTS_FORMAT:
        raise ValueError(f"a {BEST} holds weights only; resume from the run's {LAST}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a powergrad training checkpoint (format {ckpt.get('format')!r})")
    unwrap_model(ctx.model).load_state_dict(ckpt["model"])
    ctx.optimizer.load_state_dict(ckpt["optimizer"])
    ctx.scaler.load_state_dict(ckpt["scaler"])
    ctx.scheduler.load_state_dict(ckpt["scheduler"])
    ctx.scheduler.step_update(num_updates=ckpt["step"])
    if ctx.dist.is_main:
        meter.load_state_dict(ckpt["meters"])
    if ckpt["world_size"] == ctx.dist.world_size:
        ctx.train_loader.load_state_dict(ckpt["data"][ctx.dist.rank])
    rng = ckpt["rng"]
    if isinstance(rng, list):  # one state per rank (older checkpoints: rank 0's dict)
        rng = rng[ctx.dist.rank] if ctx.dist.rank < len(rng) else rng[0]
    restore_rng(rng)
    return TrainState(
        epoch=ckpt["epoch"],
        batch=ckpt["batch"],
        step=ckpt["step"],
        best_val_top1=ckpt["best_val_top1"],
        history=list(ckpt["history"]),
        wall_s=ckpt["wall_s"],
        nonfinite_losses=ckpt["nonfinite_losses"],
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss (plain CE), top-1 / top-5 (%) and logit statistics over the whole val split.

    Every rank evaluates its shard; sums are all-reduced, so each image counts exactly once.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    stats = LogitStats(device)
    for images, target in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == target[:, None]
        sums += torch.stack(
            [
                F.cross_entropy(logits, target, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.full((), target.shape[0], dtype=sums.dtype, device=device),  # no H2D sync
            ]
        )
        stats.update(logits)
    loss, top1, top5, n = pgdist.all_reduce_sum(sums).tolist()
    nan = float("nan")
    return {
        "loss": loss / n if n else nan,
        "top1": 100.0 * top1 / n if n else nan,
        "top5": 100.0 * top5 / n if n else nan,
        "images": int(n),
        **stats.compute(),
    }


def train_one_epoch(
    ctx: TrainContext, state: TrainState, meter: EpochMeter, progress: Any = None
) -> None:
    """Train from ``state.batch`` to the end of epoch ``state.epoch``, updating ``state``.

    Checkpoints every ``trainer.checkpoint_every_steps`` steps; logs step loss / lr every
    ``trainer.log_every_steps`` steps (the only per-step host syncs).
    """
    t, device = ctx.trainer, ctx.dist.device
    model, optimizer, scaler = ctx.model, ctx.optimizer, ctx.scaler
    model.train()
    for images, target in ctx.train_loader.epoch(state.epoch, start_batch=state.batch):
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, ctx.amp_dtype):
            logits = model(images)
            loss = ctx.criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        ctx.clipper()
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        state.batch += 1
        ctx.scheduler.step_update(num_updates=state.step)
        meter.update(loss.detach(), logits.detach(), target)
        if progress is not None:
            progress.update(1)
        if state.step % t.log_every_steps == 0:
            _check_finite(ctx, state, meter)
            values = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
            ctx.tracker.log_step(state.step, values)
            if progress is not None:
                progress.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        every = t.filter_norms_every_steps
        if every and state.step % every == 0 and ctx.dist.is_main:
            record = filter_norm_record(model)
            ctx.tracker.log_filter_norms({"step": state.step, "epoch": state.epoch, **record})
        if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0:
            save_checkpoint(ctx, state, meter)
        if ctx.preemption is not None and ctx.preemption.should_stop(state.step):
            save_checkpoint(ctx, state, meter)
            ctx.preemption.stop(ctx.run_dir, state.step)  # raises Preempted


def _epoch_record(
    ctx: TrainContext, state: TrainState, train: dict[str, float], val: dict[str, float] | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "lr": ctx.optimizer.param_groups[0]["lr"],
        **train,
    }
    if val is not None:
        record.update({f"val_{k}": v for k, v in val.items()})
    return record


def fit(ctx: TrainContext, state: TrainState, meter: EpochMeter | None = None) -> dict[str, Any]:
    """Train until ``trainer.epochs``, evaluating, logging and checkpointing each epoch.

    Args:
        ctx: the built components.
        state: where to start (``TrainState()`` or what :func:`restore` returned).
        meter: the unfinished epoch's sums when resuming mid-epoch.

    Returns:
        The run summary (also written to summary.json).
    """
    from tqdm.auto import tqdm

    t = ctx.trainer
    ctx.meta["_start"] = time.perf_counter()
    meter = meter or EpochMeter(ctx.dist.device)
    steps_per_epoch = len(ctx.train_loader)
    progress = None
    if t.progress and ctx.dist.is_main:
        progress = tqdm(
            total=t.epochs * steps_per_epoch,
            initial=state.step,
            desc=ctx.meta.get("_label", "train"),
            unit="step",
            dynamic_ncols=True,
        )
    ctx.tracker.write_history(state.history)
    ctx.tracker.truncate_filter_norms(state.step)
    while state.epoch < t.epochs:
        epoch_start, images_before = time.perf_counter(), float(meter.sums[2])
        train_one_epoch(ctx, state, meter, progress)
        _check_finite(ctx, state, meter)
        train = meter.compute()
        if train["nonfinite_losses"] >= steps_per_epoch * ctx.dist.world_size:
            # fp16: the scaler skipped every step of the epoch; the weights themselves are bad.
            raise NonFiniteLossError(
                f"every loss of epoch {state.epoch + 1} was non-finite; stopping. Last good "
                f"checkpoint: {ctx.run_dir / LAST}"
            )
        train_s = time.perf_counter() - epoch_start
        last = state.epoch + 1 == t.epochs
        val = None
        if last or (state.epoch + 1) % t.eval_every_epochs == 0:
            val = evaluate(
                ctx.model,
                ctx.val_loader,
                device=ctx.dist.device,
                amp_dtype=ctx.amp_dtype,
                channels_last=t.channels_last,
            )
        record = _epoch_record(ctx, state, train, val)
        record["images_per_s"] = (train["train_images"] - images_before) / max(train_s, 1e-9)
        record["epoch_s"] = time.perf_counter() - epoch_start
        state.history.append(record)
        state.nonfinite_losses += train["nonfinite_losses"]
        improved = val is not None and val["top1"] > state.best_val_top1
        if improved:
            state.best_val_top1 = val["top1"]
        state.epoch += 1
        state.batch = 0
        meter = EpochMeter(ctx.dist.device)
        ctx.tracker.log_epoch(state.history)
        save_checkpoint(ctx, state, meter, best=improved)
        # A signal during evaluation: the epoch-end checkpoint above is the one to resume from.
        watcher = ctx.preemption
        if watcher is not None and state.epoch < t.epochs and watcher.should_stop(None):
            watcher.stop(ctx.run_dir, state.step)  # raises Preempted
        if progress is not None:
            shown = {"loss": f"{train['train_loss']:.3f}", "train": f"{train['train_top1']:.1f}"}
            if val is not None:
                shown["val"] = f"{val['top1']:.1f}"
            progress.set_postfix(shown)
    if progress is not None:
        progress.close()
    return summarize(ctx, state)


def summarize(ctx: TrainContext, state: TrainState) -> dict[str, Any]:
    """summary.json: final metrics of the last epoch plus provenance; written on rank 0."""
    final = state.history[-1] if state.history else {}
    summary = {
        **{k: v for k, v in ctx.meta.items() if not k.startswith("_")},
        "train_top1": final.get("train_top1"),
        "val_top1": final.get("val_top1"),
        "val_top5": final.get("val_top5"),
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "logit_norm": final.get("val_logit_norm"),
        "train_logit_norm": final.get("train_logit_norm"),
        "best_val_top1": state.best_val_top1,
        "epochs": state.epoch,
        "steps": state.step,
        "val_images": final.get("val_images"),
        "nonfinite_losses": state.nonfinite_losses,
        "git_sha": ctx.git_sha,
        "wandb_id": ctx.tracker.run_id,
        "wall_s": state.wall_s + (time.perf_counter() - ctx.meta["_start"]),
        "run_dir": str(ctx.run_dir),
    }
    ctx.tracker.write_summary(summary)
    return summary
