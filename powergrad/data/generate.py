"""Write real image folders in the ImageNet layout, for tests and benchmarks.

Images are smooth random colour fields with a little noise (JPEG-compressible like photos),
written with PIL. `write_odd_files` adds the kinds of files ImageNet really contains and that
break naive pipelines: a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG, plus broken files
(a truncated JPEG, an empty file).
"""

from __future__ import annotations

import io
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


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """Encode `img` as JPEG (keeping its mode: RGB, L or CMYK)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_odd_files(folder: str | Path, *, size: tuple[int, int] = (64, 48), seed: int = 1) -> dict:
    """Write ImageNet's oddities into `folder`; returns {'good': [names], 'bad': [names]}.

    good: CMYK JPEG, grayscale JPEG, PNG named .JPEG (all must decode to RGB);
    bad: truncated JPEG (first half of a JPEG), empty file (must be skipped or reported).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = photo_like(rng, *size)
    (folder / "odd_cmyk.JPEG").write_bytes(jpeg_bytes(rgb.convert("CMYK")))
    (folder / "odd_gray.JPEG").write_bytes(jpeg_bytes(rgb.convert("L")))
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    (folder / "odd_png.JPEG").write_bytes(png.getvalue())
    whole = jpeg_bytes(photo_like(rng, *size))
    (folder / "odd_truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (folder / "odd_empty.JPEG").write_bytes(b"")
    return {
        "good": ["odd_cmyk.JPEG", "odd_gray.JPEG", "odd_png.JPEG"],
        "bad": ["odd_truncated.JPEG", "odd_empty.JPEG"],
    }


def corrupt_huffman_jpeg(
    path: str | Path, *, size: tuple[int, int] = (64, 48), seed: int = 2
) -> Path:
    """Write a JPEG whose first Huffman table is bogus (all 16 code-length counts 255).

    Its structure, size and end marker are intact, so the cheap check passes it; torchvision,
    PIL and DALI all fail to decode it. Only the full decode scan (scripts/check_dataset.py)
    finds it: the case its manifest exists for.
    """
    data = bytearray(jpeg_bytes(photo_like(np.random.default_rng(seed), *size)))
    dht = data.find(b"\xff\xc4")
    # Payload after marker (2), length (2) and table class/id (1): 16 code counts.
    data[dht + 5 : dht + 21] = b"\xff" * 16
    Path(path).write_bytes(bytes(data))
    return Path(path)
