"""The authors' released lr schedule (docs/fork_evidence.md): a pure per-epoch function, checked
against timm's CosineLRScheduler driven the way the authors' train.py drives it."""

from __future__ import annotations

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler

# The README command and the fork's parser defaults (docs/fork_evidence.md cites each line).
PEAK, WARMUP_LR, WARMUP_EPOCHS, COSINE_EPOCHS, MIN_LR, COOLDOWN_EPOCHS = 0.1, 0.01, 5, 90, 1e-4, 10


def authors_sched(t: int) -> float:
    """timm 0.4's CosineLRScheduler._get_lr(t) as the fork builds it (warmup_prefix False)."""
    if t < WARMUP_EPOCHS:
        return WARMUP_LR + t * (PEAK - WARMUP_LR) / WARMUP_EPOCHS
    if t < COSINE_EPOCHS:
        return MIN_LR + 0.5 * (PEAK - MIN_LR) * (1 + math.cos(math.pi * t / COSINE_EPOCHS))
    return MIN_LR


def authors_lr(epoch: int) -> float:
    """The lr of 0-based training epoch ``epoch`` (0..99): the constructor's warmup_lr for epoch 0,
    then ``sched(epoch + 1)`` because the fork increments ``epoch`` before ``step(epoch + 1)``."""
    return WARMUP_LR if epoch == 0 else authors_sched(epoch + 1)


def _simulate_fork_loop(iters_per_epoch: int = 3) -> list[float]:
    """The fork's train.py epoch loop (train_continuous = 1) with timm's scheduler; returns the
    lr each epoch trained with."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=PEAK, momentum=0.9, nesterov=True)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=COSINE_EPOCHS,
        lr_min=MIN_LR,
        cycle_decay=0.1,
        warmup_lr_init=WARMUP_LR,
        warmup_t=WARMUP_EPOCHS,
        cycle_limit=1,
        t_in_epochs=True,
    )
    num_epochs = scheduler.get_cycle_length() + COOLDOWN_EPOCHS
    lrs, epoch, num_updates = [], 0, 0
    while True:
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(iters_per_epoch):
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)  # a no-op with t_in_epochs=True
            assert optimizer.param_groups[0]["lr"] == lrs[-1]
        epoch += 1
        scheduler.step(epoch + 1, 0.0)
        if epoch >= num_epochs:
            break
    return lrs


def test_authors_lr_matches_the_forks_loop_every_epoch():
    lrs = _simulate_fork_loop()
    assert len(lrs) == 100
    assert lrs == [authors_lr(e) for e in range(100)]


@pytest.mark.parametrize(
    ("epoch", "lr"),
    [
        (0, 0.01),
        (1, 0.046),
        (4, 0.0992411),
        (5, 0.0989085),
        (30, 0.0735001),
        (60, 0.0235805),
        (88, 0.000130428),
        (89, 1e-4),
        (99, 1e-4),
    ],
)
def test_authors_lr_values(epoch, lr):
    assert authors_lr(epoch) == pytest.approx(lr, rel=1e-5)


def test_authors_run_never_reaches_its_nominal_peak():
    assert max(authors_lr(e) for e in range(100)) == authors_lr(4) < PEAK
    assert [e for e in range(100) if authors_lr(e) == MIN_LR] == list(range(89, 100))
