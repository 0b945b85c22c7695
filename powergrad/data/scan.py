"""Full decode scan of a dataset (the work behind scripts/check_dataset.py)."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from powergrad.data.layout import SPLITS, scan_split, sniff_file


def decode_problem(path: str) -> str:
    """'' if the file decodes to a 3-channel 8-bit image of positive size (the torch loader's
    decoder, :func:`~powergrad.data.torch_backend.load_rgb`), else the reason."""
    import torch

    from powergrad.data.torch_backend import load_rgb

    # One thread per process: the pool provides the parallelism.
    torch.set_num_threads(1)
    why = sniff_file(path)
    if why:
        return why
    try:
        image = load_rgb(path)
    except Exception as e:  # any decoder failure marks the file bad, whatever its type
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        return f"decode failed: {type(e).__name__}: {first_line}"
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        return f"decoded to shape {tuple(image.shape)}, not 3 x H x W"
    if image.dtype != torch.uint8:  # what both loaders hand on (load_rgb converts 16-bit)
        return f"decoded to {image.dtype}, not uint8"
    return ""


def full_scan(root: str | Path, workers: int = 8) -> tuple[dict[str, str], int]:
    """Decode every file under ROOT/{train,val}/<class>/ once.

    Returns (relative path -> reason for each bad entry, number of class-folder entries
    checked); entries that are not files (broken symlinks, FIFOs, ...) are bad without being
    opened. Raises DatasetError for a missing split or class folders. Worker processes are spawned (not forked)
    so a caller that already runs threads (DALI, OpenMP) cannot deadlock them.
    """
    root = Path(root)
    rels: list[str] = []
    # Entries that cannot be images (broken symlinks, FIFOs, subfolders) are never opened.
    odd: dict[str, str] = {}
    for split in SPLITS:
        classes, not_files = scan_split(root, split)
        odd.update(not_files)
        rels += [f"{split}/{cls}/{e.name}" for cls, entries in classes.items() for e in entries]
    paths = [str(root / rel) for rel in rels]
    if workers <= 1:
        reasons = [decode_problem(p) for p in paths]
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            reasons = list(pool.map(decode_problem, paths, chunksize=64))
    bad = {rel: why for rel, why in zip(rels, reasons, strict=True) if why}
    return {**odd, **bad}, len(rels) + len(odd)
