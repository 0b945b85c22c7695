"""The embedded `digits` dataset: scikit-learn's bundled 8x8 handwritten digits as image files.

Written once under the cache directory in the ImageNet layout (ROOT/{train,val}/<digit>/*.png),
so it goes through exactly the same readers as ImageNet. PNG because it is lossless and both
DALI and torchvision.io decode it. 1,797 images, fixed stratified split (random_state 0):
1,437 train, 360 val; 10 classes "0".."9". Each image is upscaled to 32x32 (bilinear) and
stored as 3-channel RGB (white digit on black).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from powergrad.data.layout import default_cache_dir

# Bump when the materialized files change, so old caches are not reused.
DIGITS_VERSION = 1
DIGITS_SIZE = 32  # side of the stored images, pixels
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_COMPLETE = ".complete"


def digits_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the digits dataset lives: <cache>/digits-v<version>."""
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / f"digits-v{DIGITS_VERSION}"


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (images uint8 N x 8 x 8 on 0-255, labels, is_val bool mask) with the fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)  # source range is 0..16
    labels = data.target.astype(np.int64)
    index = np.arange(len(labels))
    _, val_index = train_test_split(
        index, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val_index] = True
    return images, labels, is_val


def materialize_digits(cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the digits dataset once and return its root; safe under concurrent calls.

    Files are written into a temporary folder next to the target and renamed into place, so a
    concurrent process (another rank) either sees the finished folder or builds its own copy and
    discards it when it loses the rename race.
    """
    root = digits_root(cache_dir)
    if (root / _COMPLETE).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".tmp-"))
    try:
        images, labels, is_val = digits_split()
        for i, (img, label, val) in enumerate(zip(images, labels, is_val, strict=True)):
            folder = tmp / ("val" if val else "train") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            big = Image.fromarray(img, mode="L").resize(
                (DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BILINEAR
            )
            big.convert("RGB").save(folder / f"{i:05d}.png")
        (tmp / _COMPLETE).write_text(f"digits v{DIGITS_VERSION}\n")
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first (target exists and is not empty): use theirs.
            if not (root / _COMPLETE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
