"""Diagnostics beside the logit norms (issue 23, item 5): the fork's per-image logit statistics
and the pooled features of Fig. 4c/f, against direct computations on a real timm model."""

import pytest
import torch
from fork_code import logit_statistics

from powergrad.data import Shard, build_loaders
from powergrad.data.config import DataConfig, LoaderConfig
from powergrad.diagnostics import FeatureStats, LogitStats
from powergrad.engine import evaluate
from powergrad.models import build_model

CPU = torch.device("cpu")


def test_per_image_logit_statistics_are_the_forks():
    logits = torch.randn(40, 7) * 3 + 1
    stats = LogitStats()
    for chunk in logits.split(16):  # 16, 16, 8: every image counts once
        stats.update(chunk)
    out = stats.compute()
    fork = [float(x) for x in logit_statistics(logits.double())]
    assert out["logit_norm"] == pytest.approx(fork[0], rel=1e-9)
    assert out["logit_mean_per_image"] == pytest.approx(fork[1], rel=1e-9)
    assert out["logit_max_per_image"] == pytest.approx(fork[2], rel=1e-9)
    assert out["logit_var_per_image"] == pytest.approx(fork[3], rel=1e-9)
    # This project's definitions stay over all N x C entries (signed mean, max, population var).
    assert out["logit_mean"] == pytest.approx(logits.double().mean().item(), rel=1e-9)
    resumed = LogitStats()
    resumed.load_state_dict({k: v for k, v in stats.state_dict().items() if k != "per_image"})
    assert resumed.compute()["logit_var_per_image"] == 0.0  # an older checkpoint's epoch


def test_evaluate_reports_the_pooled_features_of_every_val_image():
    data = DataConfig(
        name="synthetic", num_classes=5, image_size=32, synthetic_train_images=8,
        synthetic_val_images=24,
    )  # fmt: skip
    loaders = build_loaders(data, LoaderConfig(backend="torch", workers=0), Shard(8, device=CPU))
    torch.manual_seed(0)
    model = build_model("resnet18_nonorm", 5)
    with torch.no_grad():  # 3 channels dead for every image: Section 5.2's zeroed features
        block = model.layer4[-1]  # out = relu(conv2(relu(conv1(x))) + x)
        block.conv1.weight.abs_()
        block.conv2.weight[:3] = -1e3 * block.conv2.weight[:3].abs()
    out = evaluate(model, loaders.val, device=CPU)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.global_pool(model.forward_features(x)) for x, _ in loaders.val])
    assert feats.shape == (24, 512)
    assert out["feature_norm"] == pytest.approx(feats.double().norm(dim=1).mean().item(), rel=1e-6)
    assert out["feature_zeroed"] == int((feats.abs().amax(dim=0) == 0).sum()) >= 3
    # The hook is gone afterwards; a model without global_pool reports NaN.
    assert not model.global_pool._forward_hooks
    assert FeatureStats().compute()["feature_norm"] != FeatureStats().compute()["feature_norm"]
