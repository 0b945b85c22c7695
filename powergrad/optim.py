"""SGD with Nesterov momentum and the paper's per-iteration learning-rate schedules (Section 5.1).

Recipe: peak lr 0.1 per 256 images (0.4 at global batch 1024), momentum 0.9, weight decay 5e-4
on conv/linear weights only (biases and normalization parameters are exempt, as in the authors'
timm fork), linear warmup from 4e-4 over 5 epochs, then cosine decay or lr / 10 at epochs
30, 60 and 90.

The schedulers are timm's, driven per iteration (``t_in_epochs=False``). The trainer calls
``scheduler.step_update(num_updates)`` once after every optimizer step, with ``num_updates``
the global number of optimizer steps taken so far. Building the scheduler sets iteration 0's
lr, so iteration ``i`` (0-based) always trains with ``lr(i)`` as given in
:func:`build_scheduler`. On resume, restore the optimizer and scheduler state dicts (or call
``step_update(num_updates)`` once) before the first step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from powergrad.models import unwrap_model

__all__ = ["SCHEDULE_NAMES", "build_optimizer", "build_scheduler", "fused_sgd_allowed", "peak_lr"]

SCHEDULE_NAMES: tuple[str, ...] = ("cosine", "step")


def peak_lr(lr_per_256: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``lr_per_256 * global_batch / 256``.

    Args:
        lr_per_256: learning rate for 256 images per step (0.1 in the paper).
        global_batch: images per optimizer step summed over all ranks.
    """
    if not lr_per_256 > 0:
        raise ValueError(f"lr_per_256 must be > 0, got {lr_per_256}")
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
    return lr_per_256 * global_batch / 256


def fused_sgd_allowed(precision: str) -> bool:
    """Whether the trainer may use fused SGD at this precision: not under fp16's GradScaler.

    A step the scaler skips (routine while fp16 searches for its scale) must leave the optimizer
    state untouched. Fused SGD takes the skip inside its kernel instead, and when the skipped step
    is the first one its momentum buffers stay as ``torch.empty_like`` left them, uninitialized
    (tests/test_optim.py shows it on the CPU); on CUDA it is also reported to advance them on
    skipped steps (LibreYOLO/libreyolo#771, torch 2.11). fp32 and bf16 have no scaler.
    """
    return precision != "fp16"


def build_optimizer(
    model: nn.Module,
    *,
    lr_per_256: float = 0.1,
    global_batch: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = True,
    fused: bool = False,
) -> torch.optim.SGD:
    """SGD over two parameter groups: decayed weights and non-decayed biases/norm parameters.

    Grouping is timm's ``param_groups_weight_decay``: every 1-D parameter (biases, BN/GN
    scales and shifts) and anything the model lists in ``no_weight_decay()`` get no decay.
    Every group starts at the peak lr; the scheduler then overwrites it each iteration.

    Args:
        model: the bare or DDP-wrapped model (DDP shares the same parameter tensors).
        lr_per_256: lr per 256 images; the peak lr is :func:`peak_lr` of it.
        global_batch: images per optimizer step over all ranks.
        momentum: SGD momentum.
        weight_decay: L2 coefficient on conv/linear weights.
        nesterov: Nesterov momentum (the paper's setting).
        fused: torch's single-kernel SGD: the default multi-tensor update up to float
            rounding (after 4 ResNet-18 steps: identical on 1 CPU thread, 4e-9 apart on 2), in
            about 40% of its CPU time (scripts/bench_optim.py: 2.6-2.7x for ResNet-18/50).
            Never with an fp16 GradScaler (see :func:`fused_sgd_allowed`).
    """
    lr = peak_lr(lr_per_256, global_batch)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0")
    bare = unwrap_model(model)
    no_decay_names = bare.no_weight_decay() if hasattr(bare, "no_weight_decay") else ()
    groups = param_groups_weight_decay(bare, weight_decay, no_weight_decay_list=no_decay_names)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: float = 5,
    warmup_lr: float = 4e-4,
    min_lr: float = 0.0,
    cooldown_epochs: int = 0,
    milestones: Sequence[int] = (30, 60, 90),
    decay_rate: float = 0.1,
) -> Scheduler:
    """Per-iteration warmup + cosine or step schedule as a timm scheduler.

    With ``W = round(warmup_epochs * iters_per_epoch)``,
    ``T = (epochs - cooldown_epochs) * iters_per_epoch`` and ``peak`` the optimizer's lr,
    iteration ``i`` (0-based, the ``num_updates`` value before its step) trains with:

    - ``i < W``: ``warmup_lr + (peak - warmup_lr) * i / W`` (so ``lr(W) = peak``);
    - cosine, ``W <= i``: ``min_lr + (peak - min_lr) * (1 + cos(pi * (i - W) / (T - W))) / 2``,
      the warmup being a prefix, so the last iteration ``T - 1`` is within
      ``(peak - min_lr) * (pi / (T - W))**2 / 4`` of ``min_lr`` (and ``lr(i >= T) = min_lr``,
      which is the whole cooldown: timm train.py's ``--cooldown-epochs``);
    - step, ``W <= i``: ``peak * decay_rate**k`` with ``k`` the number of milestones ``m``
      with ``m * iters_per_epoch <= i``; milestones count epochs from the start of training,
      so epoch 30's first iteration is the first one at ``peak / 10``.

    Args:
        optimizer: from :func:`build_optimizer`; its current lr is taken as the peak.
        name: ``"cosine"`` or ``"step"``.
        epochs: total training epochs.
        iters_per_epoch: optimizer steps per epoch.
        warmup_epochs: warmup length in epochs (may be fractional; 0 disables warmup).
        warmup_lr: lr at iteration 0.
        min_lr: cosine floor (ignored by ``"step"``).
        cooldown_epochs: cosine only: the last epochs, trained at ``min_lr`` after the decay
            (the authors' README: 90 cosine epochs + 10 cooldown epochs = 100).
        milestones: step-schedule decay epochs, strictly increasing, within ``(warmup, epochs)``.
        decay_rate: step-schedule factor per milestone.

    Raises:
        ValueError: for an unknown schedule or inconsistent lengths/rates.
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    for label, value in (("epochs", epochs), ("iters_per_epoch", iters_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup_epochs}")
    if isinstance(cooldown_epochs, bool) or not isinstance(cooldown_epochs, int):
        raise ValueError(f"cooldown_epochs must be an int, got {cooldown_epochs!r}")
    if cooldown_epochs and name != "cosine":
        raise ValueError(f"cooldown_epochs applies to the cosine schedule, not {name!r}")
    if not 0 <= cooldown_epochs < epochs - warmup_epochs:
        raise ValueError(
            f"cooldown_epochs={cooldown_epochs} must leave some decay after "
            f"warmup_epochs={warmup_epochs} within epochs={epochs}"
        )
    if warmup_lr < 0 or min_lr < 0:
        raise ValueError(f"warmup_lr and min_lr must be >= 0, got {warmup_lr}, {min_lr}")
    peaks = {g.get("initial_lr", g["lr"]) for g in optimizer.param_groups}
    if len(peaks) != 1:
        raise ValueError(f"param groups must share one peak lr, found {sorted(peaks)}")
    peak = peaks.pop()
    if name == "cosine" and min_lr > peak:
        raise ValueError(f"min_lr={min_lr} exceeds the peak lr {peak}")

    warmup = round(warmup_epochs * iters_per_epoch)
    if name == "cosine":
        decay_end = (epochs - cooldown_epochs) * iters_per_epoch
        return CosineLRScheduler(
            optimizer,
            t_initial=decay_end - warmup,  # past it (the cooldown), timm holds lr_min
            lr_min=min_lr,
            warmup_t=warmup,
            warmup_lr_init=warmup_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )

    milestones = list(milestones)
    if any(not isinstance(m, int) or isinstance(m, bool) for m in milestones):
        raise ValueError(f"milestones must be ints (epochs), got {milestones}")
    if milestones != sorted(set(milestones)):
        raise ValueError(f"milestones must be strictly increasing, got {milestones}")
    if milestones and not (warmup_epochs < milestones[0] and milestones[-1] < epochs):
        raise ValueError(
            f"milestones {milestones} must lie after warmup ({warmup_epochs}) "
            f"and before the end of training ({epochs} epochs)"
        )
    if not 0 < decay_rate < 1:
        raise ValueError(f"decay_rate must be in (0, 1), got {decay_rate}")
    # timm applies milestone t when num_updates + 1 >= t (its documented historical offset);
    # +1 moves each decay to the first iteration of the milestone epoch.
    decay_t = [m * iters_per_epoch + 1 for m in milestones]
    return MultiStepLRScheduler(
        optimizer,
        decay_t=decay_t,
        decay_rate=decay_rate,
        warmup_t=warmup,
        warmup_lr_init=warmup_lr,
        warmup_prefix=False,
        t_in_epochs=False,
    )
