"""Synthetic image folders in the ImageNet layout: benchmark data (scripts/bench_data.py,
scripts/profile_main.py) and test fixtures.

Images are smooth random colour fields with a little noise (JPEG-compressible like photos),
written with PIL. Broken and odd files that only tests need live in tests/imagefiles.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image: bilinearly upsampled 8x6 random colours plus mild noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), mode="RGB")
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    noise = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8), mode="RGB")


def write_image_folder(
    root: str | Path,
    *,
    classes: int = 3,
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    seed: int = 0,
    val_total: int | None = None,
) -> Path:
    """Write ROOT/{train,val}/nXXXXXXXX/*.JPEG (ImageNet-style wnid names); returns ROOT.

    size is (width, height) in pixels. val_total, if given, spreads exactly that many val images
    round-robin over the classes (e.g. an odd count) instead of val_per_class each.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [f"n{1440764 + 17 * c:08d}" for c in range(classes)]
    val_counts = [val_per_class] * classes
    if val_total is not None:
        val_counts = [val_total // classes + (c < val_total % classes) for c in range(classes)]
    for split, counts in (("train", [train_per_class] * classes), ("val", val_counts)):
        for wnid, count in zip(wnids, counts, strict=True):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = photo_like(rng, *size)
                img.save(folder / f"{wnid}_{split}_{i:04d}.JPEG", quality=quality)
    return root
