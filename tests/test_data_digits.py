"""The embedded digits dataset: real files, fixed split, idempotent and race-free creation."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
from PIL import Image

from powergrad.data import DataConfig, LoaderConfig, Shard, build_loaders
from powergrad.data.digits import DIGITS_SIZE, digits_root, digits_split, materialize_digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return materialize_digits(tmp_path_factory.mktemp("cache"))


def test_counts_classes_and_fixed_split(digits):
    _, labels, is_val = digits_split()
    assert len(labels) == 1797 and is_val.sum() == 360
    for split, mask in (("train", ~is_val), ("val", is_val)):
        assert sorted(os.listdir(digits / split)) == [str(d) for d in range(10)]
        names = {
            (int(cls), name)
            for cls in os.listdir(digits / split)
            for name in os.listdir(digits / split / cls)
        }
        expected = {(int(labels[i]), f"{i:05d}.png") for i in np.flatnonzero(mask)}
        assert names == expected
    # Stratified: every class is ~20% val.
    for digit in range(10):
        frac = is_val[labels == digit].mean()
        assert 0.15 < frac < 0.25


def test_files_are_rgb_upscaled_digits(digits):
    images, labels, is_val = digits_split()
    i = int(np.flatnonzero(is_val)[0])
    with Image.open(digits / "val" / str(labels[i]) / f"{i:05d}.png") as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (DIGITS_SIZE, DIGITS_SIZE)
        pixels = np.asarray(img).astype(np.int16)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    # Downsampling the 32x32 file back to 8x8 recovers the source digit (0-255 scale).
    small = pixels[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.abs(small - images[i]).mean() < 20


def test_idempotent(digits):
    probe = next((digits / "train" / "0").iterdir())
    before = probe.stat().st_mtime_ns
    assert materialize_digits(digits.parent) == digits
    assert probe.stat().st_mtime_ns == before
    assert sorted(p.name for p in digits.parent.iterdir()) == [digits.name]


def _materialize(cache: str) -> str:
    return str(materialize_digits(cache))


def test_concurrent_materialization(tmp_path):
    """Two processes racing on an empty cache both get the one complete folder, no leftovers."""
    with mp.get_context("spawn").Pool(2) as pool:
        roots = pool.map(_materialize, [str(tmp_path)] * 2)
    assert roots == [str(digits_root(tmp_path))] * 2
    assert [p.name for p in tmp_path.iterdir()] == [digits_root(tmp_path).name]
    assert sum(1 for _ in digits_root(tmp_path).glob("*/*/*.png")) == 1797


def test_default_root_from_env(tmp_path, monkeypatch):
    """data.root=None reads digits from $POWERGRAD_CACHE, through the file readers."""
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path))
    data = DataConfig(name="digits", image_size=32, val_resize_ratio=1.0, hflip=False)
    loaders = build_loaders(data, LoaderConfig(backend="torch", workers=0), Shard(128))
    assert (tmp_path / digits_root(tmp_path).name / ".complete").is_file()
    assert (loaders.num_classes, loaders.train_images, loaders.val_images) == (10, 1437, 360)
    assert loaders.classes == [str(d) for d in range(10)]
    assert len(loaders.train) == 1437 // 128 and len(loaders.val) == 3
