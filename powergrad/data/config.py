"""Typed configuration for the data pipeline (Hydra groups `data` and `loader`), and `Shard`:
where one process's loaders run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# ImageNet channel statistics on the 0-1 scale (torchvision / timm convention).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

DATASETS = ("digits", "imagenet", "synthetic")
BACKENDS = ("dali", "torch")
BAD_FILE_POLICIES = ("skip", "error")
VAL_INTERPOLATIONS = ("bilinear", "bicubic")
_CPU = torch.device("cpu")


@dataclass
class DataConfig:
    """What to read and how to augment it (Hydra group `data`).

    `root` holds ROOT/train/<class>/* and ROOT/val/<class>/*. For `digits`, None means the cache
    directory ($POWERGRAD_CACHE or ~/.cache/powergrad)/digits, materialized on first use.
    """

    name: str = "digits"
    root: str | None = None
    # None: the number of class folders; synthetic needs it set.
    num_classes: int | None = None
    # Train random-crop and val center-crop side, pixels.
    image_size: int = 224
    # Val: resize the shorter side to floor(image_size / ratio) pixels, then center crop
    # (timm's crop_pct: 0.875 gives 256 -> 224).
    val_resize_ratio: float = 0.875
    # Val resize filter, antialiased: bilinear | bicubic. The authors' fork evaluated with
    # timm's per-model default: bilinear for resnet18 / resnet18_wobn, bicubic for resnet50,
    # resnet101, seresnet18, seresnet50 (see the experiment files).
    val_interpolation: str = "bilinear"
    # Random-resized-crop area fraction lower bound (upper bound 1.0); aspect ratio 3/4..4/3.
    crop_scale_min: float = 0.08
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # A file that cannot be read or decoded, found at start (cheap check, manifest) or during
    # the run (corrupt past its header, deleted). skip: leave it out at start; during the run
    # replace it (train) by the next readable file of the listing or drop it (val), warn, count
    # it and append it to RUN_DIR/bad_files.log. error: stop with DatasetError naming the file.
    on_bad_file: str = "skip"
    # Bad-file manifest written by scripts/check_dataset.py; None: ROOT/bad_files.tsv if present.
    bad_files: str | None = None
    # Synthetic data only: images per epoch (all ranks together).
    synthetic_train_images: int = 1_281_167
    synthetic_val_images: int = 50_000

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name={self.name!r}: expected one of {DATASETS}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(
                f"data.on_bad_file={self.on_bad_file!r}: expected one of {BAD_FILE_POLICIES}"
            )
        if self.image_size <= 0:
            raise ValueError(f"data.image_size={self.image_size}: must be positive")
        if not 0.0 < self.val_resize_ratio <= 1.0:
            raise ValueError(f"data.val_resize_ratio={self.val_resize_ratio}: must be in (0, 1]")
        if self.val_interpolation not in VAL_INTERPOLATIONS:
            raise ValueError(
                f"data.val_interpolation={self.val_interpolation!r}: expected one of "
                f"{VAL_INTERPOLATIONS}"
            )
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"data.crop_scale_min={self.crop_scale_min}: must be in (0, 1]")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("data.mean and data.std need 3 entries each, std > 0")
        if self.name == "synthetic" and not self.num_classes:
            raise ValueError("data.name=synthetic needs data.num_classes (e.g. 1000)")


@dataclass
class LoaderConfig:
    """How to read it (Hydra group `loader`); synthetic data ignores it."""

    backend: str = "dali"
    # DALI CPU threads / torch worker processes, per rank; "auto": powergrad.resources.auto_workers
    # (the entry points resolve it before building loaders).
    workers: Any = "auto"
    # Batches prepared ahead: DALI prefetch_queue_depth / torch prefetch_factor.
    prefetch: int = 2
    # torch only: pin host memory for faster host-to-GPU copies (ignored without CUDA).
    pin_memory: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"loader.backend={self.backend!r}: expected one of {BACKENDS}")
        if self.workers != "auto" and not (isinstance(self.workers, int) and self.workers >= 0):
            raise ValueError(f"loader.workers={self.workers!r}: must be auto or an int >= 0")
        if self.prefetch < 1:
            raise ValueError(f"loader.prefetch={self.prefetch}: must be >= 1")


@dataclass(frozen=True)
class Shard:
    """Where this process's loaders run: rank of world_size, per-rank batch, device, run seed,
    and the memory format the model takes (trainer.channels_last).

    Defaults: one process on the CPU, seed 0. `device` may be given as a string ("cuda:1").
    `local_rank` (this process's index on its node) picks the rank that checks the dataset
    for the whole node (local rank 0; powergrad.data.layout.check_dataset_per_node).
    """

    batch_size: int  # per rank: the global batch / world_size
    rank: int = 0
    world_size: int = 1
    device: torch.device = _CPU
    seed: int = 0
    local_rank: int = 0
    # DALI hands out channels_last batches (N x C x H x W views of N x H x W x C memory) so the
    # engine's conversion is free; the other backends hand out NCHW and the engine converts.
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"batch_size={self.batch_size}, rank={self.rank}, world_size={self.world_size}"
            )
        object.__setattr__(self, "device", torch.device(self.device))


def val_resize_size(data: DataConfig) -> int:
    """Shorter-side size (pixels) the val images are resized to before the center crop."""
    # The epsilon keeps e.g. 224 / 0.875 at 256 despite float rounding.
    return int(data.image_size / data.val_resize_ratio + 1e-6)
