"""Gradient accumulation: K micro-batches of B / K per optimizer step train like one batch of B."""

import json

import pytest
import torch
from conftest import compose_train, train_in_process

from powergrad.config import ConfigError, validate_train
from powergrad.data.generate import write_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 320 train images: 2 steps of 128 per epoch; at a loader batch of 64, 5 batches, the
    # fifth a partial group that accumulation drops (as batch 128 drops its last 64 images).
    root = tmp_path_factory.mktemp("images")
    return write_image_folder(root, classes=4, train_per_class=80, val_per_class=2, size=(32, 32))


def _args(folder, *extra):
    return [
        "data=imagenet",
        f"data.root={folder}",
        "data.image_size=32",
        "data.val_resize_ratio=1.0",
        "loader.workers=0",
        "logger=none",
        "trainer.batch_size=128",
        "trainer.epochs=2",
        "trainer.warmup_epochs=0.5",
        "trainer.device=cpu",
        "trainer.threads=1",
        "trainer.progress=false",
        *extra,
    ]


def _weights(run_dir):
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)


def test_accumulated_micro_batches_train_like_the_whole_batch(folder, tmp_path):
    whole = tmp_path / "whole"
    accum = tmp_path / "accum"
    a = train_in_process(whole, *_args(folder, "model=resnet18_nonorm"))
    b = train_in_process(accum, *_args(folder, "model=resnet18_nonorm", "trainer.accum_steps=2"))
    assert a["steps"] == b["steps"] == 4  # optimizer steps: the partial group is dropped
    wa, wb = _weights(whole), _weights(accum)
    assert wa["step"] == wb["step"] == 4
    assert wa["batch"] == wb["batch"] == 0  # epoch ends; mid-epoch, batch counts loader batches
    # Equal up to float rounding (summation order), which 4 steps of a net without BN amplify
    # to ~3e-5 here; a wrong scale (a missing 1 / accum_steps) would differ by the update itself.
    for key, value in wa["model"].items():
        assert torch.allclose(value, wb["model"][key], rtol=1e-3, atol=1e-4), key
    flat_a = torch.cat([v.flatten() for v in wa["model"].values()])
    flat_b = torch.cat([wb["model"][k].flatten() for k in wa["model"]])
    assert (flat_a - flat_b).norm() <= 1e-4 * flat_a.norm()
    # The schedule counts optimizer steps: same lr at the end, same images seen.
    ha = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (accum / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in ha] == pytest.approx([r["lr"] for r in hb])
    assert [r["train_images"] for r in ha] == [r["train_images"] for r in hb] == [256, 256]
    assert [r["train_loss"] for r in ha] == pytest.approx([r["train_loss"] for r in hb], rel=1e-4)


def test_accumulation_runs_a_batchnorm_model(folder, tmp_path):
    # BN normalizes each micro-batch by its own statistics: not the same numbers as batch 128.
    out = train_in_process(
        tmp_path / "bn", *_args(folder, "model=resnet18", "trainer.accum_steps=4")
    )
    assert out["steps"] == 4
    assert out["val_top1"] is not None


def test_batch_must_divide_by_world_size_times_accum_steps():
    cfg = compose_train("trainer.batch_size=96", "trainer.accum_steps=4")
    validate_train(cfg, world_size=2)  # 96 / (2 x 4) = 12 per rank and micro-batch
    with pytest.raises(ConfigError, match="multiple of 16"):
        validate_train(compose_train("trainer.batch_size=120", "trainer.accum_steps=4"), 4)
    with pytest.raises(ConfigError, match=r"trainer\.accum_steps=0"):
        validate_train(compose_train("trainer.accum_steps=0"), 1)
