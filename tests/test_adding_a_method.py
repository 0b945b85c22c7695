"""README "Adding a method", proven: a new backward transform (a temperature instead of a power),
defined and registered here, trains through train.py with no change to the package.

What it takes, as the README says: the loss (here a class in this file; in the project, in
powergrad/pgt.py beside PGT), its registration, one method config (here stored from the test
through Hydra's ConfigStore, in the project a file configs/method/NAME.yaml), and a test.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import train_in_process
from hydra.core.config_store import ConfigStore
from torch import nn

from powergrad.method import build_loss, method_label
from powergrad.pgt import register_transform


@register_transform("temperature")
class TemperatureCrossEntropy(nn.Module):
    """Cross-entropy forward; backward ``softmax(z / T) - q`` with ``T = method.alpha``."""

    def __init__(self, temperature: float, label_smoothing: float = 0.0):
        super().__init__()
        self.temperature, self.label_smoothing = temperature, label_smoothing

    def forward(self, logits, target):
        loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        # T * CE(z / T) has gradient softmax(z / T) - q: swap it in, keep the logged value.
        t = self.temperature
        surrogate = t * F.cross_entropy(logits / t, target, label_smoothing=self.label_smoothing)
        return loss.detach() + surrogate - surrogate.detach()


ConfigStore.instance().store(
    group="method",
    name="temperature",
    node={
        "alpha": 0.5,  # the temperature T
        "label_smoothing": 0.0,
        "clip_mode": "none",
        "clip_threshold": None,
        "impl": "temperature",
    },
)


def test_the_new_transform_has_the_gradient_it_promises():
    method = type("M", (), {"alpha": 0.5, "label_smoothing": 0.0, "impl": "temperature"})
    loss_fn = build_loss(method)
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    loss = loss_fn(z, y)
    loss.backward()
    assert loss.item() == pytest.approx(F.cross_entropy(z, y).item())
    expected = (torch.softmax(z.detach() / 0.5, dim=1) - F.one_hot(y, 4)) / 6
    torch.testing.assert_close(z.grad, expected)
    assert method_label(0.5, "none", "temperature") == "temperature"


def test_the_new_method_trains_through_train_py(tmp_path):
    summary = train_in_process(
        tmp_path / "run",
        "method=temperature",
        "data=synthetic",
        "data.num_classes=4",
        "data.image_size=32",
        "data.synthetic_train_images=16",
        "data.synthetic_val_images=8",
        "trainer.batch_size=8",
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "trainer.progress=false",
        "logger=none",
    )
    assert summary["method"] == "temperature" and summary["alpha"] == 0.5
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[0])["step"] == 2
