"""Data loading: one batch contract, three backends (dali, torch, synthetic).

`build_loaders` checks the dataset folder first (errors name the paths), then builds a
TrainLoader and an EvalLoader for this rank, placed by a `Shard` (per-rank batch size, rank,
world_size, device, seed; it validates them):

TrainLoader
    len(train): full batches per epoch on this rank, the same on every rank (the last partial
    batch is dropped). train.epoch(e, start_batch=k) yields (images float32 N x 3 x H x W,
    normalized, on `device`; labels int64 N on `device`) for batches k..len-1 of epoch e. The
    sequence depends only on (seed, e, rank, world_size): from batch k on it equals, bitwise on
    the same machine and backend, the tail of a full epoch. train.state_dict() (plain containers,
    readable by torch.load(weights_only=True)) taken after batch k of epoch e, passed to
    load_state_dict() before epoch(e, start_batch=k + 1), lets DALI restore its pipeline instead
    of replaying batches 0..k; without it the result is the same, only slower.
EvalLoader
    len(val) batches, iter(val) yields every val image of this rank's shard exactly once (the
    shards of all ranks cover the split exactly once, no padding reaches the caller), no
    augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from powergrad.data.config import DataConfig, LoaderConfig, Shard, val_resize_size
from powergrad.data.layout import DatasetError, Listing, check_dataset, default_cache_dir

__all__ = [
    "DataConfig",
    "DatasetError",
    "Listing",
    "LoaderConfig",
    "Loaders",
    "Shard",
    "build_loaders",
    "check_dataset",
    "dataset_root",
    "val_resize_size",
]


@dataclass
class Loaders:
    """What build_loaders returns; image counts are for all ranks, after bad files are removed."""

    train: Any  # TrainLoader: __len__, epoch(epoch, start_batch), state_dict, load_state_dict
    val: Any  # EvalLoader: __len__, __iter__
    num_classes: int
    classes: list[str]
    train_images: int
    val_images: int
    # Files left out as undecodable (relative path -> reason), for logging the count.
    bad_files: dict[str, str] = field(default_factory=dict)


def dataset_root(data: DataConfig) -> str:
    """The folder a file dataset is read from; materializes `digits` on first use."""
    if data.name == "digits" and data.root is None:
        from powergrad.data.digits import materialize_digits

        return str(materialize_digits())
    if data.root is None:
        raise DatasetError(f"data.root is not set for data.name={data.name}")
    return data.root


def build_loaders(data: DataConfig, loader: LoaderConfig, shard: Shard) -> Loaders:
    """Check the dataset and build the train and val loaders of `shard`.

    Raises DatasetError (naming paths) for a missing root or split, an empty class, a train/val
    class mismatch, bad files with data.on_bad_file=error, or a dataset too small for one batch
    per rank.
    """
    if data.name == "synthetic":
        from powergrad.data.synthetic import SyntheticEvalLoader, SyntheticTrainLoader

        num_classes = int(data.num_classes)
        return Loaders(
            train=SyntheticTrainLoader(data, num_classes, shard),
            val=SyntheticEvalLoader(data, num_classes, shard),
            num_classes=num_classes,
            classes=[str(i) for i in range(num_classes)],
            train_images=data.synthetic_train_images,
            val_images=data.synthetic_val_images,
        )

    listing = check_dataset(
        dataset_root(data),
        on_bad_file=data.on_bad_file,
        bad_manifest=data.bad_files,
        cache_dir=default_cache_dir(),
    )
    num_classes = len(listing.classes)
    if data.num_classes is not None and data.num_classes != num_classes:
        raise DatasetError(
            f"data.num_classes={data.num_classes} but {listing.root}/train has "
            f"{num_classes} class folders"
        )
    if len(listing.train) // shard.world_size < shard.batch_size:
        raise DatasetError(
            f"{len(listing.train)} train images in {listing.root} give less than one batch of "
            f"{shard.batch_size} per rank on {shard.world_size} rank(s)"
        )
    files = {split: listing.files(split) for split in ("train", "val")}
    labels = {split: listing.labels(split) for split in ("train", "val")}
    if loader.backend == "torch":
        from powergrad.data.torch_backend import TorchEvalLoader, TorchTrainLoader

        train = TorchTrainLoader(files["train"], labels["train"], data, loader, shard)
        val = TorchEvalLoader(files["val"], labels["val"], data, loader, shard)
    else:
        from powergrad.data.dali_backend import DaliEvalLoader, DaliTrainLoader

        train = DaliTrainLoader(files["train"], labels["train"], data, loader, shard)
        val = DaliEvalLoader(files["val"], labels["val"], data, loader, shard)
    return Loaders(
        train,
        val,
        num_classes,
        listing.classes,
        len(listing.train),
        len(listing.val),
        bad_files=dict(listing.bad),
    )
