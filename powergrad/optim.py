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
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from powergrad.models import unwrap_model

__all__ = [
    "SCHEDULES",
    "build_optimizer",
    "build_scheduler",
    "milestone_epochs",
    "peak_lr",
]

SCHEDULES: tuple[str, ...] = ("cosine", "step")


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


def build_optimizer(
    model: nn.Module,
    *,
    lr_per_256: float = 0.1,
    peak: float | None = None,
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
        peak: the peak lr whatever the batch (the authors' fork: no scaling); overrides
            ``lr_per_256``.
        global_batch: images per optimizer step over all ranks.
        momentum: SGD momentum.
        weight_decay: L2 coefficient on conv/linear weights.
        nesterov: Nesterov momentum (the paper's setting).
        fused: torch's single-kernel SGD: the default multi-tensor update up to float
            rounding (after 4 ResNet-18 steps: identical on 1 CPU thread, 4e-9 apart on 2), in
            about 40% of its CPU time (scripts/bench_optim.py: 2.6-2.7x for ResNet-18/50).
            Never under a GradScaler: a step the scaler skips must leave the optimizer
            state untouched, but fused SGD takes the skip inside its kernel, and when the
            skipped step is the first one its momentum buffers stay as ``torch.empty_like``
            left them (tests/test_optim.py shows it on the CPU); on CUDA it is also reported
            to advance them on skipped steps (LibreYOLO/libreyolo#771, torch 2.11).
    """
    lr = peak if peak is not None else peak_lr(lr_per_256, global_batch)
    bare = unwrap_model(model)
    no_decay_names = bare.no_weight_decay() if hasattr(bare, "no_weight_decay") else ()
    groups = param_groups_weight_decay(bare, weight_decay, no_weight_decay_list=no_decay_names)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)


def milestone_epochs(fractions: Sequence[float], epochs: int) -> list[int]:
    """Step-schedule decay epochs: ``round(f * epochs)`` for each fraction, deduplicated."""
    return sorted({round(f * epochs) for f in fractions})


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched,
    *,
    epochs: int,
    warmup_epochs: float,
    iters_per_epoch: int,
) -> Scheduler:
    """Per-iteration warmup + cosine or step schedule (``cfg.sched``) as a timm scheduler.

    With ``W = round(warmup_epochs * iters_per_epoch)``,
    ``T = (epochs - sched.cooldown_epochs) * iters_per_epoch`` and ``peak`` the optimizer's lr,
    iteration ``i`` (0-based, the ``num_updates`` value before its step) trains with:

    - ``i < W``: ``warmup_lr + (peak - warmup_lr) * i / W`` (so ``lr(W) = peak``);
    - cosine, ``W <= i``: ``min_lr + (peak - min_lr) * (1 + cos(pi * (i - W) / (T - W))) / 2``,
      the warmup being a prefix, so the last iteration ``T - 1`` is within
      ``(peak - min_lr) * (pi / (T - W))**2 / 4`` of ``min_lr`` (and ``lr(i >= T) = min_lr``,
      which is the whole cooldown: timm train.py's ``--cooldown-epochs``);
    - step, ``W <= i``: ``peak * decay_rate**k`` with ``k`` the number of milestone epochs
      ``m`` (:func:`milestone_epochs`) with ``m * iters_per_epoch <= i``; milestones count
      epochs from the start of training, so epoch 30's first iteration is the first at
      ``peak / 10``.

    Args:
        optimizer: from :func:`build_optimizer`; its current lr is taken as the peak.
        sched: ``cfg.sched`` (name, warmup_lr, min_lr, cooldown_epochs, milestones,
            decay_rate), validated by :func:`powergrad.config.validate_train`.
        epochs: total training epochs.
        warmup_epochs: warmup length in epochs (may be fractional; 0 disables warmup).
        iters_per_epoch: optimizer steps per epoch.
    """
    if sched.stepping == "fork_epoch":
        return ForkEpochScheduler(optimizer, sched, epochs, warmup_epochs, iters_per_epoch)
    warmup = round(warmup_epochs * iters_per_epoch)
    if sched.name == "cosine":
        decay_end = (epochs - sched.cooldown_epochs) * iters_per_epoch
        return CosineLRScheduler(
            optimizer,
            t_initial=decay_end - warmup,  # past it (the cooldown), timm holds lr_min
            lr_min=sched.min_lr,
            warmup_t=warmup,
            warmup_lr_init=sched.warmup_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )
    # timm applies milestone t when num_updates + 1 >= t (its documented historical offset);
    # +1 moves each decay to the first iteration of the milestone epoch.
    decay_t = [m * iters_per_epoch + 1 for m in milestone_epochs(sched.milestones, epochs)]
    return MultiStepLRScheduler(
        optimizer,
        decay_t=decay_t,
        decay_rate=sched.decay_rate,
        warmup_t=warmup,
        warmup_lr_init=sched.warmup_lr,
        warmup_prefix=False,
        t_in_epochs=False,
    )


class ForkEpochScheduler:
    """The authors' fork's lr stepping (docs/fork_evidence.md): timm 0.4's epoch schedules,
    set once per epoch, one epoch late.

    timm's ``CosineLRScheduler`` / ``StepLRScheduler`` in epoch units (``t_in_epochs=True``,
    warmup overlapping the decay: ``warmup_prefix=False``; cosine over
    ``epochs - cooldown_epochs``, then ``min_lr``; step: lr / decay_rate every ``k`` epochs, ``k``
    the first milestone). The fork's loop sets epoch 0's lr at construction and, after epoch e,
    calls ``step(e + 2)``: so epoch ``e >= 1`` trains with ``lr(e + 1)``. Same interface as the
    iteration schedules: the trainer calls :meth:`step_update` after every optimizer step.
    """

    def __init__(self, optimizer, sched, epochs: int, warmup_epochs: float, iters_per_epoch: int):
        common = dict(
            warmup_t=warmup_epochs,
            warmup_lr_init=sched.warmup_lr,
            warmup_prefix=False,
            t_in_epochs=True,
        )
        if sched.name == "cosine":
            self.scheduler = CosineLRScheduler(
                optimizer,
                t_initial=epochs - sched.cooldown_epochs,
                lr_min=sched.min_lr,
                cycle_limit=1,
                **common,
            )
        else:
            self.scheduler = StepLRScheduler(
                optimizer,
                decay_t=milestone_epochs(sched.milestones, epochs)[0],
                decay_rate=sched.decay_rate,
                **common,
            )
        self.iters_per_epoch = iters_per_epoch

    def step_update(self, num_updates: int) -> None:
        """Set the lr of the epoch that optimizer step ``num_updates`` belongs to."""
        epoch = num_updates // self.iters_per_epoch
        self.scheduler.step(epoch + 1 if epoch else 0)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()
