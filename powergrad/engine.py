"""One training epoch and one evaluation pass; train.py's epoch loop calls them.

One step, one copy: autocast (bf16/fp16, or disabled for fp32) around the forward and the loss,
``GradScaler(enabled=precision == "fp16")`` around backward/step, gradient clipping between
``unscale_`` and ``step``, and a per-iteration lr update. Metrics accumulate in device tensors,
so the step itself never waits for the device; callers sync at log points and epoch ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn

from powergrad import distributed as pgdist
from powergrad.checkpoint import NonFiniteError, TrainState
from powergrad.diagnostics import FeatureStats, LogitStats, pooled_features
from powergrad.models import unwrap_model

__all__ = [
    "AMP_DTYPES",
    "EpochMeter",
    "autocast",
    "build_mixup",
    "check_finite",
    "evaluate",
    "make_grad_scaler",
    "optimizer_steps",
    "share_rank0_buffers",
    "train_one_epoch",
]

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a disabled one for fp32 (``dtype=None``)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def make_grad_scaler(
    device: torch.device,
    precision: str,
    *,
    skip_nonfinite_steps: bool = False,
    init_scale: float | None = None,
) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaling, starting at ``init_scale`` (None: torch's 2**16) with
    torch's growth and backoff; or, with ``skip_nonfinite_steps`` in fp32 / bf16, a scaler
    whose only job is GradScaler's skip of steps with NaN/inf gradients (scale 1, halved at each
    skip: powers of two, so the unscaled gradients are the same numbers); else disabled."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type, init_scale=init_scale or 2.0**16)
    return torch.amp.GradScaler(
        device.type, init_scale=1.0, growth_interval=2**30, enabled=skip_nonfinite_steps
    )


def build_mixup(
    mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int
) -> Mixup | None:
    """timm's Mixup / CutMix over each train batch (soft (N, C) targets, ``label_smoothing``
    folded in, so the loss must not smooth again), or None when both alphas are 0."""
    if not (mixup_alpha or cutmix_alpha):
        return None
    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


class EpochMeter:
    """Per-epoch training sums on the device: loss (finite only), correct, samples, non-finite;
    logit statistics; pooled-feature statistics (fed by :func:`train_one_epoch`'s hook)."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.logits = LogitStats(device)
        self.features = FeatureStats(device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch (mean-reduced ``loss``) without a host sync."""
        n = target.shape[0]
        finite = torch.isfinite(loss)
        # Soft targets (mixup) have no class index: count the argmax class as the label.
        labels = target if target.ndim == 1 else target.argmax(dim=1)
        correct = (logits.argmax(dim=1) == labels).sum()
        batch = torch.stack(
            [
                torch.where(finite, loss.double() * n, 0.0),
                correct.double(),
                # Filled on the device: new_tensor(n) would copy a host scalar with a blocking
                # H2D memcpy, a host sync every step on CUDA.
                torch.full((), n, dtype=torch.float64, device=loss.device),
                (~finite).double(),
            ]
        )
        self.sums += batch
        self.logits.update(logits)

    def images(self) -> float:
        """Images counted so far this epoch on this rank (host sync)."""
        return float(self.sums[2])

    def reduced_state(self) -> dict[str, Any]:
        """Sums over all ranks as CPU tensors (a collective: every rank must call it)."""
        device = self.sums.device
        sums = pgdist.all_reduce_sum(self.sums.clone())
        logit, feature = self.logits.state_dict(), self.features.state_dict()
        state = {
            "sums": sums.cpu(),
            "logit_sums": pgdist.all_reduce_sum(logit["sums"].to(device)).cpu(),
            "logit_max": pgdist.all_reduce_max(logit["max"].to(device)).cpu(),
            "logit_per_image": pgdist.all_reduce_sum(logit["per_image"].to(device)).cpu(),
            "feature_sums": pgdist.all_reduce_sum(feature["sums"].to(device)).cpu(),
        }
        channel_max = self.features.channel_max_all_ranks()
        if channel_max is not None:
            state["feature_channel_max"] = channel_max.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`reduced_state` (load on rank 0 only; others start at zero).
        A checkpoint written before the per-image and feature sums existed leaves them at zero."""
        self.sums.copy_(state["sums"])
        logit = {"sums": state["logit_sums"], "max": state["logit_max"]}
        if "logit_per_image" in state:
            logit["per_image"] = state["logit_per_image"]
        self.logits.load_state_dict(logit)
        if "feature_sums" in state:
            feature = {"sums": state["feature_sums"]}
            if "feature_channel_max" in state:
                feature["channel_max"] = state["feature_channel_max"]
            self.features.load_state_dict(feature)

    def compute(self) -> dict[str, float]:
        """Epoch metrics over all ranks: train_loss, train_top1 (%), train_logit_*,
        train_feature_*, counts."""
        loss_sum, correct, samples, nonfinite = pgdist.all_reduce_sum(self.sums.clone()).tolist()
        finite = samples - nonfinite
        out = {
            "train_loss": loss_sum / finite if finite else float("nan"),
            "train_top1": 100.0 * correct / samples if samples else float("nan"),
            "train_images": int(samples),
            "nonfinite_losses": int(nonfinite),
        }
        out.update({f"train_{k}": v for k, v in self.logits.compute().items()})
        out.update({f"train_{k}": v for k, v in self.features.compute().items()})
        return out


def check_finite(meter: EpochMeter, state: TrainState, *, skipped_by_scaler: bool) -> None:
    """Raise :class:`NonFiniteError` once a NaN/inf loss was seen this epoch (a collective).

    Under fp16 (``skipped_by_scaler``) the GradScaler skipped those steps: training goes on.
    """
    if skipped_by_scaler:
        return
    bad = int(pgdist.all_reduce_sum(meter.sums[3:4].clone()).item())
    if bad:
        raise NonFiniteError(
            f"non-finite loss in epoch {state.epoch + 1} by step {state.step}; stopping"
        )


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any,
    clip: Callable[[], None],
    meter: EpochMeter,
    state: TrainState,
    *,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    accum_steps: int = 1,
    ema: Any = None,
    mixup: Mixup | None = None,
) -> Iterator[torch.Tensor]:
    """Train from ``state.batch`` to the end of epoch ``state.epoch``, updating ``state``.

    A generator: it yields each optimizer step's loss (the mean over its micro-batches; a
    device tensor, reading it syncs) right after the step, so the caller can log, checkpoint
    or stop between steps, which are always group boundaries.

    Gradient accumulation: each optimizer step sums the gradients of ``accum_steps`` loader
    batches, each loss scaled by 1 / accum_steps (the mean over the global batch, as one big
    batch gives). Under DDP the gradients are all-reduced on a group's last micro-batch only
    (``no_sync`` before). ``state.batch`` counts loader batches, ``state.step`` optimizer steps.
    The epoch's last ``len(loader) % accum_steps`` batches (a partial group) are read but not
    trained on: every optimizer step sees the full global batch, and an epoch has as many
    steps as it has without accumulation (:func:`optimizer_steps`).

    ``ema`` (timm's ``ModelEmaV3`` of the bare model, or None) is updated after each optimizer
    step, with the step count (its first update copies the weights). ``mixup`` (timm's, or
    None) mixes each loader batch and turns its targets into soft (N, C) ones; it draws from
    numpy's global RNG, which checkpoints capture.
    """
    device = meter.sums.device
    model.train()
    end = optimizer_steps(len(loader), accum_steps) * accum_steps
    no_sync = getattr(model, "no_sync", None)  # DDP (also through torch.compile)
    bare = unwrap_model(model)
    pending, loss_sum = 0, None  # micro-batches of the current group, their summed loss
    # The loss in fp32 whatever the autocast dtype: PGT's softmax(alpha z) and the logged
    # cross-entropy need fp32's range. A loss that must see the model's own output (the
    # authors' hook reads the fp16 logits gradient, as in their fork) takes it as is and
    # computes in fp32 itself.
    on_output = getattr(loss_fn, "on_model_output", False)
    # The pooled features (Fig. 4c/f) of every forward, while this epoch trains.
    with pooled_features(model, meter.features):
        for images, target in loader.epoch(state.epoch, start_batch=state.batch):
            if state.batch + pending >= end:
                continue  # the partial group at the epoch's end (read for the loader's sake)
            last = pending + 1 == accum_steps
            if mixup is not None:
                images, target = mixup(images, target)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if pending == 0:
                optimizer.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with autocast(device, amp_dtype):
                    logits = model(images)
                    z = logits if on_output else logits.float()
                    loss = loss_fn(z, target)
                scaler.scale(loss / accum_steps if accum_steps > 1 else loss).backward()
            meter.update(loss.detach(), logits.detach(), target)
            pending += 1
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            if not last:
                continue
            scaler.unscale_(optimizer)
            clip()
            scaler.step(optimizer)
            scaler.update()
            state.step += 1
            state.batch += accum_steps
            scheduler.step_update(num_updates=state.step)
            if ema is not None:
                ema.update(bare, step=state.step)
            step_loss = loss_sum / accum_steps if accum_steps > 1 else loss_sum
            pending, loss_sum = 0, None
            yield step_loss


@torch.no_grad()
def share_rank0_buffers(module: nn.Module) -> None:
    """Overwrite ``module``'s buffers with rank 0's, on every rank (a collective; no-op on one
    rank).

    For the EMA under DDP: DDP hands every rank rank 0's BatchNorm buffers at each forward, but
    each rank's forward then updates them with its own batch, and each rank's EMA averages its
    own; the parameters are the same on all ranks (identical all-reduced gradients). After
    this call every rank holds the EMA that rank 0 saves, so ``val_ema_*`` scores one model.
    """
    if pgdist.world_size() > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def optimizer_steps(loader_batches: int, accum_steps: int) -> int:
    """Optimizer steps per epoch: full groups of ``accum_steps`` loader batches (the partial
    group at the end is dropped). With a loader batch of global / accum_steps this equals the
    steps per epoch of the same global batch without accumulation."""
    return loader_batches // accum_steps


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    pad_last_batch: bool = False,
) -> dict[str, float]:
    """Loss (plain CE), top-1 / top-5 (%), logit and pooled-feature statistics over the whole
    val split.

    Every rank evaluates its shard; sums are all-reduced, so each image counts exactly once.

    ``pad_last_batch`` (for a ``torch.compile``d model): a batch smaller than the first is
    padded with zero images to the first's size and the padding's logits are cut off before
    any metric, so the model sees one input shape (no recompilation for the last, smaller
    batch) and the metrics are those of the real images only. In eval mode every image's
    output depends on that image alone, so the padding changes no real image's logits.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    stats, features = LogitStats(device), FeatureStats(device)
    full = None  # the first batch's size: the shape the model is compiled for
    # (Padding is for compiled models, which pooled_features leaves unhooked: the zero rows
    # never reach the feature statistics.)
    with pooled_features(model, features):
        for images, target in loader:
            n = target.shape[0]
            full = full or n
            if pad_last_batch and n < full:
                images = torch.cat([images, images.new_zeros((full - n, *images.shape[1:]))])
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                logits = model(images)
            logits = logits[:n].float()
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == target[:, None]
            sums += torch.stack(
                [
                    F.cross_entropy(logits, target, reduction="sum").double(),
                    hits[:, 0].sum().double(),
                    hits.any(dim=1).sum().double(),
                    # Filled on the device: no H2D sync.
                    torch.full((), target.shape[0], dtype=sums.dtype, device=device),
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
        **features.compute(),
    }
