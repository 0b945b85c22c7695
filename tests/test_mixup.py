"""Mixup / CutMix through timm's Mixup: soft targets into PGT's and the plain cross-entropy."""

import math

import pytest
import torch
from conftest import compose_train, tiny, train_in_process

from powergrad.config import ConfigError, validate_train
from powergrad.engine import build_mixup
from powergrad.pgt import PowerGradCrossEntropy


def test_mixed_targets_are_soft_and_carry_the_label_smoothing():
    assert build_mixup(0.0, 0.0, 0.1, 4) is None
    mixup = build_mixup(0.4, 1.0, 0.1, 4)
    images = torch.randn(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, target = mixup(images.clone(), labels)
    assert mixed.shape == images.shape and target.shape == (8, 4)
    assert torch.allclose(target.sum(dim=1), torch.ones(8))
    assert target.min() >= 0.1 / 4 - 1e-6  # smoothing is in the targets
    # The losses take the (N, C) float targets as they are.
    logits = torch.randn(8, 4, requires_grad=True)
    for loss_fn in (PowerGradCrossEntropy(0.25), torch.nn.CrossEntropyLoss()):
        loss = loss_fn(logits, target)
        assert math.isfinite(loss.item())
        loss.backward()


@pytest.mark.parametrize("method", ["pgt", "baseline"])
def test_a_run_trains_with_mixup_and_cutmix(tmp_path, method):
    args = [
        f"method={method}",
        "method.label_smoothing=0.1",
        "trainer.mixup_alpha=0.2",
        "trainer.cutmix_alpha=1.0",
    ]
    summary = train_in_process(tmp_path / "run", *tiny("data.synthetic_train_images=64", *args))
    assert summary["steps"] == 8
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    assert 0.0 <= summary["train_top1"] <= 100.0  # argmax of the mixed target


def test_mixup_needs_an_even_loader_batch_and_the_exact_transform():
    with pytest.raises(ConfigError, match="must be even"):
        validate_train(compose_train("trainer.batch_size=18", "trainer.mixup_alpha=0.2"), 2)
    validate_train(compose_train("trainer.batch_size=20", "trainer.mixup_alpha=0.2"), 2)
    hook = compose_train("method=pgt", "method.impl=authors_hook", "trainer.cutmix_alpha=1.0")
    with pytest.raises(ConfigError, match="authors_hook"):
        validate_train(hook, 1)
