"""The DALI loader's pipelines on real files (CPU operators): never more than one train pipeline
per rank, all shut down by close() (idempotent) and by train.py on errors, channels_last batches
without a copy, the mixed decoder's arguments, and the epoch-boundary benchmark at toy size."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny, train_in_process
from imagefiles import corrupt_huffman_jpeg

from powergrad.data import DataConfig, DatasetError, LoaderConfig, Shard, build_loaders
from powergrad.data.dali_backend import MIXED_DECODER_HINTS, decoder_args, live_pipelines
from powergrad.data.digits import materialize_digits
from powergrad.data.generate import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits_cfg(tmp_path_factory):
    root = materialize_digits(tmp_path_factory.mktemp("digits"))
    return DataConfig(
        name="digits", root=str(root), image_size=32, val_resize_ratio=1.0, crop_scale_min=0.35
    )


def build(data, *, batch_size=96, channels_last=False):
    shard = Shard(batch_size, channels_last=channels_last)
    return build_loaders(data, LoaderConfig(backend="dali", workers=1), shard)


def test_one_train_pipeline_at_a_time_and_close_shuts_all_down(digits_cfg):
    """Across epoch boundaries at most one train pipeline is built (the next epoch's is built
    once the last one is shut down); close() shuts the running, the built-ahead and the val
    pipeline down, twice in a row too, and the loaders work again afterwards."""
    assert live_pipelines() == 0
    loaders = build(digits_cfg)
    counts, epochs = [], []
    for epoch in range(3):
        batches = []
        for x, y in loaders.train.epoch(epoch):
            batches.append((x.clone(), y.clone()))
            # Time for a pipeline built ahead on a thread to appear while this epoch runs.
            time.sleep(0.05)
            counts.append(live_pipelines())
        epochs.append(batches)
        counts.append(live_pipelines())
    assert max(counts) == 1
    # The next epoch's pipeline, built ahead once epoch 2 ended, and the val pipeline (kept
    # between passes) are alive until close().
    assert sum(len(y) for _, y in loaders.val) == 360
    deadline = time.monotonic() + 30
    while live_pipelines() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live_pipelines() == 2
    loaders.close()
    assert live_pipelines() == 0
    loaders.close()
    assert live_pipelines() == 0
    # Closed loaders build again; epoch 1 is still epoch 1.
    again = [(x.clone(), y.clone()) for x, y in loaders.train.epoch(1)]
    for (x, y), (ax, ay) in zip(epochs[1], again, strict=True):
        assert torch.equal(x, ax) and torch.equal(y, ay)
    loaders.close()
    assert live_pipelines() == 0


def test_close_mid_epoch_and_an_abandoned_epoch(digits_cfg):
    loaders = build(digits_cfg)
    batches = loaders.train.epoch(0)
    next(batches)
    assert live_pipelines() == 1
    loaders.train.close()  # a preemption: the run stops in the middle of an epoch
    assert live_pipelines() == 0 and loaders.train.state_dict() == {}
    # A checkpoint taken after an epoch's last step holds no DALI state; resuming there reads
    # nothing (no replay of the epoch).
    for k, _ in enumerate(loaders.train.epoch(0), start=1):
        if k == len(loaders.train):
            assert loaders.train.state_dict() == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(loaders.train.epoch(0, start_batch=len(loaders.train))) == []
    # An epoch started while an abandoned one is still suspended takes over its loader; the
    # abandoned generator, finalized later, leaves the new epoch's pipeline alone.
    stale = loaders.train.epoch(0)
    next(stale)
    fresh = loaders.train.epoch(1)
    first = next(fresh)[1].clone()
    del stale
    rest = [y.clone() for _, y in fresh]
    reference = build(digits_cfg)
    want = [y.clone() for _, y in reference.train.epoch(1)]
    assert torch.equal(first, want[0]) and len(rest) == len(want) - 1
    assert all(torch.equal(a, b) for a, b in zip(rest, want[1:], strict=True))
    loaders.close()
    reference.close()
    assert live_pipelines() == 0


def test_channels_last_batches_are_views_of_hwc_memory_with_the_same_values(digits_cfg):
    """With Shard.channels_last, train and val batches are channels_last already (the engine's
    conversion returns the same tensor) and equal the NCHW batches value for value."""
    layouts = {}
    for channels_last in (False, True):
        loaders = build(digits_cfg, channels_last=channels_last)
        # clone() keeps the memory format (torch.preserve_format).
        train = [x.clone() for x, _ in loaders.train.epoch(2)][:3]
        val = [x.clone() for x, _ in loaders.val][:2]
        layouts[channels_last] = train + val
        loaders.close()
    for plain, last in zip(layouts[False], layouts[True], strict=True):
        assert plain.is_contiguous() and not last.is_contiguous()
        assert last.is_contiguous(memory_format=torch.channels_last)
        assert last.contiguous(memory_format=torch.channels_last).data_ptr() == last.data_ptr()
        assert last.shape == plain.shape and torch.equal(last, plain)


def test_mixed_decoder_gets_nvidias_memory_hints():
    """The mixed decoder's arguments (it cannot run without a GPU); the CPU decoder gets none."""
    assert decoder_args(gpu=False) == {"device": "cpu"}
    mixed = decoder_args(gpu=True)
    assert mixed["device"] == "mixed"
    assert mixed["device_memory_padding"] == 211_025_920
    assert mixed["host_memory_padding"] == 140_544_512
    assert (mixed["preallocate_width_hint"], mixed["preallocate_height_hint"]) == (5980, 6430)
    assert {k: mixed[k] for k in MIXED_DECODER_HINTS} == MIXED_DECODER_HINTS
    # Every hint is an argument of DALI's decoder (a typo would only fail on a GPU).
    from nvidia.dali import backend

    schema = backend.GetSchema("decoders__ImageRandomCrop")
    assert set(MIXED_DECODER_HINTS) <= set(schema.GetArgumentNames())


@pytest.fixture
def small_folder(tmp_path):
    """2 classes of 8 train and 2 val JPEGs, 40x40."""
    return write_image_folder(
        tmp_path / "ds", classes=2, train_per_class=8, val_per_class=2, size=(40, 40)
    )


def _train_args(root, *changes):
    return tiny(
        "data=imagenet",
        f"data.root={root}",
        "data.image_size=32",
        "data.num_classes=2",
        "loader=dali",
        "loader.workers=1",
        "trainer.batch_size=8",
        *changes,
    )


def test_train_run_shuts_its_pipelines_down_also_on_an_error(tmp_path, small_folder):
    """train.py closes the loaders in a finally: after a run (channels_last, DALI) and after
    a run that stops with an error in evaluation, no DALI pipeline is left, even while the
    error's traceback still holds the run's frames."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DALI's "no full decode scan" note
        args = _train_args(small_folder, "trainer.channels_last=true")
        summary = train_in_process(tmp_path / "ok", *args)
    assert summary["epochs"] == 2 and summary["val_images"] == 4
    assert live_pipelines() == 0
    bad = sorted((small_folder / "val").rglob("*.JPEG"))[0]
    corrupt_huffman_jpeg(bad)  # passes the start-up check, fails in DALI's decoder
    with pytest.raises(DatasetError, match=str(bad)) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_in_process(tmp_path / "bad", *_train_args(small_folder, "data.on_bad_file=error"))
    assert error.tb is not None and live_pipelines() == 0


def test_bench_dali_epochs_tiny_prints_both_designs():
    """The benchmark at toy size: both designs cross a boundary, the same labels, the new one
    never holds two pipelines and leaves none after close()."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_dali_epochs.py"),
        "--images=3000",
        "--world-size=2",
        "--batch=16",
        "--window=3",
        "--step-ms=1",
        "--threads=1",
        "--rounds=2",
        "--rate-batches=20",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["steps_per_epoch"] == 3000 // 2 // 16 and report["labels_equal"] is True
    assert "--images=3000" in report["command"] and report["git_sha"]
    for design in ("old", "new"):
        result = report[design]
        assert len(result["boundary_wait_ms"]) == 1 and result["first_batch_s"] > 0
    assert report["new"]["max_live_pipelines"] == 1 and report["new"]["live_after_close"] == 0
    costs = report["build_costs"]
    assert len(costs) == 4
    assert all(c["total_s"] > 0 and c["build"]["max_gil_gap_ms"] >= 0 for c in costs.values())
    assert report["ratio_stall_old_over_new"] > 0
    rates = report["throughput"]
    assert (
        rates["batches"] == 20 and rates["old_images_per_s"] > 0 and rates["new_images_per_s"] > 0
    )
    low, high = rates["ratio_new_over_old_ci95"]
    assert 0 < low <= rates["ratio_new_over_old"] <= high
