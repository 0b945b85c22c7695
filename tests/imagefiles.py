"""Test-only image files: ImageNet's oddities and broken files that loaders must survive.

The ImageNet-like folder generator itself (`write_image_folder`, `photo_like`) is a package
feature used by the benchmarks (powergrad.data.generate); what only tests need lives here.
Tests import it as a module (pytest puts tests/ on sys.path): `from imagefiles import ...`.
"""

from __future__ import annotations

import io
import struct
import zlib
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


def png16_bytes(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of ``pixels`` (uint16, H x W gray, H x W x 3 RGB or H x W x 4 RGBA), written
    chunk by chunk (PIL writes 16-bit grayscale only)."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[channels]  # PNG: gray, RGB, RGBA
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_image_zoo(folder: str | Path, *, size: tuple[int, int] = (40, 30), seed: int = 4) -> list:
    """Write one valid image of every kind a dataset may hold that is not an 8-bit RGB JPEG;
    returns their names. Every one must reach a loader as 8-bit RGB, alike on both backends.

    16-bit PNGs (RGB, gray, RGBA) and TIFF (gray), grayscale (+ alpha), RGBA, palette (+
    transparency) and 1-bit PNGs, CMYK, grayscale, progressive and EXIF-rotated (orientation
    6) JPEGs, 1 x 1 images, 150:1 and 1:150 aspect ratios, BMP, TIFF, WebP (+ alpha).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = photo_like(rng, *size)
    height, width = size[1], size[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    files = {
        "png16_rgb.png": png16_bytes(rng.integers(0, 65536, (height, width, 3))),
        "png16_gray.png": png16_bytes(rng.integers(0, 65536, (height, width))),
        "png16_rgba.png": png16_bytes(rng.integers(0, 65536, (height, width, 4))),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    palette = rgb.convert("P")
    saves = [
        ("png_gray.png", rgb.convert("L"), {}),
        ("png_gray_alpha.png", rgb.convert("LA"), {}),
        ("png_rgba.png", rgb.convert("RGBA"), {}),
        ("png_palette.png", palette, {}),
        ("png_palette_alpha.png", palette, {"transparency": 0}),
        ("png_1bit.png", rgb.convert("1"), {}),
        ("png_1x1.png", rgb.resize((1, 1)), {}),
        ("jpeg_cmyk.JPEG", rgb.convert("CMYK"), {"quality": 90}),
        ("jpeg_gray.JPEG", rgb.convert("L"), {"quality": 90}),
        ("jpeg_progressive.JPEG", rgb, {"quality": 90, "progressive": True}),
        ("jpeg_exif_rotated.JPEG", rgb, {"quality": 90, "exif": exif.tobytes()}),
        ("jpeg_1x1.JPEG", rgb.resize((1, 1)), {"quality": 90}),
        ("jpeg_wide.JPEG", rgb.resize((300, 2)), {"quality": 90}),
        ("jpeg_tall.JPEG", rgb.resize((2, 300)), {"quality": 90}),
        ("image.bmp", rgb, {}),
        ("image.tiff", rgb, {}),
        ("gray16.tiff", Image.fromarray(rng.integers(0, 65536, (height, width), np.uint16)), {}),
        ("image.webp", rgb, {"quality": 90}),
        ("alpha.webp", rgb.convert("RGBA"), {"lossless": True}),
    ]
    for name, img, kwargs in saves:
        img.save(folder / name, **kwargs)
    return sorted([*files, *(name for name, _, _ in saves)])
