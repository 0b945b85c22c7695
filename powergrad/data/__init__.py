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
Both
    close() releases the loader's pipelines, threads and worker processes now (not at garbage
    collection or interpreter exit); idempotent, and a later epoch() / iter() starts them again.
    `Loaders.close()` closes both; the entry points call it in a `finally`. With
    Shard.channels_last the DALI backend hands out channels_last images (same values).

Files that fail during the run follow data.on_bad_file (powergrad.data.badfiles): a train sample
is replaced by the next readable file of the listing (fixed batch shapes, the same batches on
every world size), a val sample is left out, each file is warned about, counted in
`Loaders.bad_file_log` and appended to RUN_DIR/bad_files.log; or DatasetError names it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from powergrad.data.badfiles import BAD_FILE_LOG_NAME, BadFileLog
from powergrad.data.config import DataConfig, LoaderConfig, Shard, val_resize_size
from powergrad.data.layout import (
    BAD_MANIFEST_NAME,
    DatasetError,
    Listing,
    check_dataset,
    check_dataset_per_node,
    default_cache_dir,
    file_list_change,
)

__all__ = [
    "BAD_FILE_LOG_NAME",
    "BadFileLog",
    "DataConfig",
    "DatasetError",
    "Listing",
    "LoaderConfig",
    "Loaders",
    "Shard",
    "build_loaders",
    "check_dataset",
    "dataset_root",
    "file_list_change",
    "val_resize_size",
]


@dataclass
class Loaders:
    """What build_loaders returns; image counts are for all ranks, after bad files are removed."""

    train: Any  # TrainLoader: __len__, epoch(epoch, start_batch), state_dict, load_state_dict,
    # close
    val: Any  # EvalLoader: __len__, __iter__, close
    num_classes: int
    classes: list[str]
    train_images: int
    val_images: int
    # Files left out at start as undecodable (relative path -> reason), for logging the count.
    bad_files: dict[str, str] = field(default_factory=dict)
    # Files that failed during the run on this rank: .bad (path -> reason), .skipped (count).
    bad_file_log: BadFileLog | None = None
    # The dataset's file list (Listing.digest); None for synthetic data.
    digest: str | None = None

    def file_list_digest(self) -> str | None:
        """The file list in one line (counts + hash), to save in a checkpoint and compare at
        resume with `powergrad.data.file_list_change(saved, loaders.file_list_digest())`,
        which returns None when unchanged, else the message to log. None for synthetic data."""
        return self.digest

    def close(self) -> None:
        """Release both loaders' pipelines, threads and workers now; idempotent."""
        try:
            self.train.close()
        finally:
            self.val.close()


def dataset_root(data: DataConfig) -> str:
    """The folder a file dataset is read from; materializes `digits` on first use."""
    if data.name == "digits" and data.root is None:
        from powergrad.data.digits import materialize_digits

        return str(materialize_digits())
    if data.root is None:
        raise DatasetError(f"data.root is not set for data.name={data.name}")
    return os.path.expanduser(data.root)  # data.root='~/imagenet' (quoted, the shell left ~)


def build_loaders(
    data: DataConfig,
    loader: LoaderConfig,
    shard: Shard,
    run_dir: str | os.PathLike | None = None,
) -> Loaders:
    """Check the dataset and build the train and val loaders of `shard`.

    run_dir: where files that fail during the run are listed (RUN_DIR/bad_files.log, all ranks
    append); None: warnings and counts only.

    Raises DatasetError (naming paths) for a missing root or split, an empty class, a class
    without a usable image, a train/val class mismatch, bad files with data.on_bad_file=error,
    or a dataset too small for one batch per rank.
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

    # One rank per node checks the files; the node's other ranks read its listing.
    listing = check_dataset_per_node(
        dataset_root(data),
        local_rank=shard.local_rank,
        on_bad_file=data.on_bad_file,
        bad_manifest=os.path.expanduser(data.bad_files) if data.bad_files else None,
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
    log_path = Path(run_dir) / BAD_FILE_LOG_NAME if run_dir is not None else None
    bad_log = BadFileLog(listing.root, data.on_bad_file, log_path, shard.rank)
    if loader.backend == "torch":
        from powergrad.data.torch_backend import TorchEvalLoader, TorchTrainLoader

        train = TorchTrainLoader(files["train"], labels["train"], data, loader, shard, bad_log)
        val = TorchEvalLoader(files["val"], labels["val"], data, loader, shard, bad_log)
    else:
        from powergrad.data.dali_backend import DaliEvalLoader, DaliTrainLoader

        _warn_without_full_scan(data, listing.root)
        train = DaliTrainLoader(files["train"], labels["train"], data, loader, shard, bad_log)
        val = DaliEvalLoader(files["val"], labels["val"], data, loader, shard, bad_log)
    return Loaders(
        train,
        val,
        num_classes,
        listing.classes,
        len(listing.train),
        len(listing.val),
        bad_files=dict(listing.bad),
        bad_file_log=bad_log,
        digest=listing.digest(),
    )


def _warn_without_full_scan(data: DataConfig, root: str) -> None:
    """ImageNet on DALI without a decode scan: say what DALI cannot catch (once per start)."""
    manifest = (
        Path(data.bad_files).expanduser() if data.bad_files else Path(root) / BAD_MANIFEST_NAME
    )
    if data.name == "imagenet" and not manifest.is_file():
        warnings.warn(
            f"no full decode scan of {root} ({manifest} missing): DALI decodes a JPEG with "
            "corrupt image data to garbage pixels without an error (only 'Corrupt JPEG data' on "
            f"stderr); run `python scripts/check_dataset.py {root}` once to list such files",
            stacklevel=3,
        )
