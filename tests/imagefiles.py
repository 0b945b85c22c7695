"""Test-only image files: ImageNet's oddities and broken files that loaders must survive.

The ImageNet-like folder generator itself (`write_image_folder`, `photo_like`) is a package
feature used by the benchmarks (powergrad.data.generate); what only tests need lives here.
Tests import it as a module (pytest puts tests/ on sys.path): `from imagefiles import ...`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from powergrad.data.generate import photo_like


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
    or the loaders at run time find it.
    """
    data = bytearray(jpeg_bytes(photo_like(np.random.default_rng(seed), *size)))
    dht = data.find(b"\xff\xc4")
    # Payload after marker (2), length (2) and table class/id (1): 16 code counts.
    data[dht + 5 : dht + 21] = b"\xff" * 16
    Path(path).write_bytes(bytes(data))
    return Path(path)


def garble_scan_jpeg(path: str | Path, *, size: tuple[int, int] = (64, 48), seed: int = 3) -> Path:
    """Write a JPEG whose entropy-coded data is overwritten with noise after a valid header.

    Header and end marker are intact (the cheap check passes it). torchvision and PIL refuse
    it; DALI's CPU decoder (libjpeg-turbo) only prints "Corrupt JPEG data" warnings and returns
    a garbage image: only the full decode scan protects a DALI run from it.
    """
    data = bytearray(jpeg_bytes(photo_like(np.random.default_rng(seed), *size)))
    sos = data.find(b"\xff\xda")
    rng = np.random.default_rng(seed)
    for i in range(sos + 20, len(data) - 2, 7):
        data[i] = int(rng.integers(0, 255))
    Path(path).write_bytes(bytes(data))
    return Path(path)
