"""Checkpoints that continue a run bit-for-bit, readable with ``torch.load(weights_only=True)``.

A checkpoint is one dict of plain containers and tensors:

- ``model``: the unwrapped model's state dict (timm keys, so eval.py and timm can read it);
- ``optimizer``, ``scaler``, ``scheduler``: their state dicts;
- ``epoch`` / ``batch`` (next epoch and next batch within it) and ``step`` (optimizer steps);
- ``meters``: the running sums of the unfinished epoch; ``history``: the finished epochs' records;
- ``rng``: per rank, torch CPU / CUDA, numpy and python RNG states; ``data``: per rank, the
  train loader's state;
- ``config`` (resolved, plain dict), ``wandb_id``, ``git_sha``, ``best_val_top1``, ``wall_s``.

``best.pt`` (written when val top-1 improves) keeps only ``model`` and the metadata that says
what it is (``epoch``, ``step``, ``best_val_top1``, ``history``, ``config``, ``wandb_id``,
``git_sha``) under ``format`` ``powergrad-weights-v1``: it is for evaluation and fine-tuning
(resuming from it is refused), and is half the size of ``last.pt``.

Files are written to a temporary file in the same directory, fsynced and renamed over the
target, so a kill at any moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["BEST", "LAST", "atomic_save", "capture_rng", "load_checkpoint", "restore_rng"]

LAST = "last.pt"
BEST = "best.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True`` (no arbitrary unpickling)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng() -> dict[str, Any]:
    """Every RNG state the training loop may draw from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
