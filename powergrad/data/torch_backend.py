"""torchvision backend: torchvision.io decode (libjpeg-turbo), transforms v2, torch DataLoader.

The reference the DALI pipeline is checked against. Augmentation randomness depends only on
(seed, epoch, sample index), never on which worker loads a sample, so an epoch started at
batch k yields exactly the tail of the full epoch. Files that fail to load are handled per
data.on_bad_file (powergrad.data.badfiles): workers report them, the main process decides.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from powergrad.data.badfiles import MAX_CONSECUTIVE_BAD, BadFileLog, describe_error
from powergrad.data.config import DataConfig, LoaderConfig, Shard, val_resize_size
from powergrad.data.sampling import (
    STREAM_AUGMENT,
    derive_seed,
    epoch_permutation,
    rank_batches,
    shard_range,
    train_steps,
)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """16-bit samples to 8 bits as DALI's decoder does: round(v * 255 / 65535) = (v + 128) // 257
    (exact: v / 257 is never halfway between two integers)."""
    if image.dtype == torch.uint8:
        return image
    return ((image.to(torch.int32) + 128) // 257).to(torch.uint8)


def load_rgb(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 3 x H x W RGB tensor, as DALI's decoder does.

    torchvision.io first (libjpeg-turbo; grayscale and CMYK JPEGs are converted to RGB, alpha
    dropped, palettes expanded), PIL only for other formats it cannot decode (BMP, TIFF).
    16-bit images (PNG, TIFF) are scaled to 8 bits with DALI's rounding. The EXIF orientation
    is ignored on both backends, as by the authors' PyTorch loader (torchvision's ImageFolder,
    PIL: timm/data/ext_dataloaders.py of their fork) and timm's; DALI applies it by default. A
    JPEG torchvision refuses is bad: it raises on corrupt image data ("Image is incomplete or
    truncated") where PIL, like DALI, may return garbage pixels, so falling back to PIL would
    hide the corruption.
    """
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every
        # call; the pinned version still ships them and they are the fast path here.
        warnings.simplefilter("ignore", DeprecationWarning)
        data = read_file(path)
        try:
            return _to_uint8(decode_image(data, mode=ImageReadMode.RGB))
        except RuntimeError:
            if bytes(data[:3].tolist()) == b"\xff\xd8\xff":
                raise
    from PIL import Image

    with Image.open(path) as img:
        if img.mode.startswith("I;16"):  # 16-bit grayscale: PIL's convert("RGB") would clip
            gray = torch.from_numpy(np.asarray(img).astype(np.int32))
            return _to_uint8(gray.expand(3, *gray.shape).contiguous())
        rgb = img.convert("RGB")
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


# One sample as a worker returns it: the image (None when it could not be read: val, or no
# readable substitute), its label, and the (path, reason) of every file that failed on the way.
Item = tuple[torch.Tensor | None, int, list[tuple[str, str]]]


class ImageFiles(Dataset):
    """Files + labels; indexed by (epoch, sample index) so augmentation is reproducible.

    A file that fails to load is reported, never raised here (the main process applies
    data.on_bad_file, see powergrad.data.badfiles); with `substitute` (train) the next files of
    the listing are tried in turn, and the first readable one is returned with the augmentation
    of the requested (epoch, index).
    """

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor],
        seed: int,
        substitute: bool = False,
    ) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.transform = transform
        self.seed = seed
        self.attempts = min(MAX_CONSECUTIVE_BAD, len(self.files)) if substitute else 1

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        epoch, index = key
        failed: list[tuple[str, str]] = []
        for step in range(self.attempts):
            j = (index + step) % len(self.files)
            try:
                image = load_rgb(self.files[j])
            except Exception as e:  # any failure (missing file, decoder error) marks it bad
                failed.append((self.files[j], describe_error(e)))
                continue
            # fork_rng keeps the caller's global RNG untouched when loading in the main
            # process. Only the CPU generator is seeded (the transforms draw from it alone):
            # torch.manual_seed would also queue a CUDA reseed with a formatted stack trace in
            # every call, ~400 us of a ~2 ms digits sample, and reseed the GPUs when loading in
            # the main process.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(
                    derive_seed(self.seed, epoch, index, STREAM_AUGMENT)
                )
                image = self.transform(image)
            return image, self.labels[j], failed
        return None, self.labels[index], failed


class _EpochBatches(Sampler):
    """Batch sampler over (epoch, index) keys; `configure` picks the epoch and start batch."""

    def __init__(self, n: int, shard: Shard) -> None:
        self.n, self.shard = n, shard
        self.steps = train_steps(n, shard.batch_size, shard.world_size)
        self.epoch, self.start_batch = 0, 0

    def configure(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.steps - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.shard
        order = epoch_permutation(self.n, s.seed, self.epoch)
        mine = rank_batches(order, s.batch_size, s.rank, s.world_size)
        for b in range(self.start_batch, self.steps):
            lo = b * s.batch_size
            yield [(self.epoch, int(i)) for i in mine[lo : lo + s.batch_size]]


def _collate(batch: list[Item]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Stack the readable samples; pass the failures on to the main process."""
    kept = [(img, label) for img, label, _ in batch if img is not None]
    images = torch.stack([img for img, _ in kept]) if kept else torch.empty(0, dtype=torch.uint8)
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return images, labels, [f for _, _, failed in batch for f in failed]


class Normalizer:
    """uint8 N x 3 x H x W -> float32 on `device`, (x / 255 - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.device = device
        self.mean = torch.tensor([255.0 * m for m in mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std], device=device).view(1, 3, 1, 1)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return images, labels.to(self.device, non_blocking=True)


def _collect_before_fork(loader: DataLoader) -> None:
    """Collect the parent's garbage before the first iteration forks the worker processes.

    Garbage left in a forked worker is collected there, where the threads of the objects do not
    exist: a DALI pipeline awaiting collection (e.g. from an earlier loader in the same process)
    then deadlocks the worker in its destructor. Once per loader (persistent workers), ~ms.
    """
    if loader.num_workers > 0 and getattr(loader, "_iterator", None) is None:
        gc.collect()


def _shutdown_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent worker processes now; its next iteration starts new ones.

    torch has no public call for it: the iterator it keeps for persistent workers shuts them
    down in `_shutdown_workers` (what its __del__ calls).
    """
    iterator = getattr(loader, "_iterator", None)
    loader._iterator = None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def _loader_kwargs(loader: LoaderConfig, device: torch.device) -> dict:
    kwargs: dict = {
        "num_workers": loader.workers,
        "collate_fn": _collate,
        "pin_memory": loader.pin_memory and device.type == "cuda",
    }
    if loader.workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=loader.prefetch)
    return kwargs


class TrainTransform:
    """Random-resized crop (area crop_scale_min..1, aspect 3/4..4/3, antialiased bilinear) to
    image_size, then a horizontal flip with probability 1/2 (data.hflip).

    Bitwise ``v2.Compose([v2.RandomResizedCrop(...), v2.RandomHorizontalFlip()])`` on a uint8
    image tensor: the same random draws in the same order (the crop's ``make_params``, then the
    flip's ``torch.rand(1) < 0.5``) and the same image kernels, called directly. The v2 classes
    dispatch on input types first (pytree flattening, checks), which on a 32x32 digit cost more
    than the crop itself (scripts/profile_main.py --sections parts).
    """

    def __init__(self, data: DataConfig) -> None:
        self.crop = v2.RandomResizedCrop(
            data.image_size, scale=(data.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3), antialias=True
        )
        self.hflip = data.hflip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        crop = self.crop
        image = v2.functional.resized_crop_image(
            image,
            **crop.make_params([image]),
            size=crop.size,
            interpolation=crop.interpolation,
            antialias=crop.antialias,
        )
        if self.hflip and torch.rand(1) < 0.5:
            image = v2.functional.horizontal_flip_image(image)
        return image


def train_transform(data: DataConfig) -> TrainTransform:
    """The train augmentation (see TrainTransform)."""
    return TrainTransform(data)


class CenterCrop:
    """Center crop whose offset rounds half up, (H - size + 1) // 2, as DALI's crop_pos 0.5 does.

    torchvision's CenterCrop rounds half to even, which puts the window one pixel off DALI's
    whenever H - size or W - size is odd (e.g. 341 - 224 for a 500x375 image at 256).
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if height < self.size or width < self.size:
            raise ValueError(f"image {height}x{width} smaller than the {self.size} crop")
        top, left = (height - self.size + 1) // 2, (width - self.size + 1) // 2
        return image[..., top : top + self.size, left : left + self.size]


_INTERPOLATION = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}


def val_transform(data: DataConfig) -> v2.Transform:
    """Resize the shorter side to image_size / val_resize_ratio (data.val_interpolation,
    antialiased like PIL, which the authors' timm eval used), center crop image_size."""
    resize = v2.Resize(
        val_resize_size(data),
        interpolation=_INTERPOLATION[data.val_interpolation],
        antialias=True,
    )
    return v2.Compose([resize, CenterCrop(data.image_size)])


class TorchTrainLoader:
    """Training batches from torchvision; see powergrad.data for the TrainLoader contract."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        data: DataConfig,
        loader: LoaderConfig,
        shard: Shard,
        bad_log: BadFileLog,
    ) -> None:
        self.sampler = _EpochBatches(len(files), shard)
        self.batch_size, self.bad_log = shard.batch_size, bad_log
        dataset = ImageFiles(
            files, labels, train_transform(data), shard.seed, substitute=data.on_bad_file == "skip"
        )
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, **_loader_kwargs(loader, shard.device)
        )
        self.normalize = Normalizer(data.mean, data.std, shard.device)

    def __len__(self) -> int:
        return self.sampler.steps

    def epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_batch..len-1 of `epoch` (images normalized on device, int64 labels)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} outside 0..{len(self)}")
        self.sampler.configure(epoch, start_batch)
        if start_batch == len(self):
            return
        _collect_before_fork(self.loader)
        for images, labels, failed in self.loader:
            for path, reason in failed:
                self.bad_log.report(path, reason, split="train", epoch=epoch)
            if len(labels) < self.batch_size:  # no readable substitute within reach
                raise self.bad_log.too_many(failed[0][0])
            yield self.normalize(images, labels)

    def close(self) -> None:
        """Stop the worker processes now (idempotent; the next epoch starts them again)."""
        _shutdown_workers(self.loader)

    def state_dict(self) -> dict:
        """No extra state: the order and augmentation follow from (seed, epoch, batch)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Accept the (empty) state written by `state_dict`."""


class TorchEvalLoader:
    """Validation batches; rank r reads its contiguous shard once, no padding, no augmentation."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        data: DataConfig,
        loader: LoaderConfig,
        shard: Shard,
        bad_log: BadFileLog,
    ) -> None:
        start, stop = shard_range(len(files), shard.rank, shard.world_size)
        keys = [(0, i) for i in range(start, stop)]
        size = shard.batch_size
        batches = [keys[i : i + size] for i in range(0, len(keys), size)]
        dataset = ImageFiles(files, labels, val_transform(data), seed=0, substitute=False)
        self.bad_log = bad_log
        self.loader = DataLoader(
            dataset, batch_sampler=batches, **_loader_kwargs(loader, shard.device)
        )
        self.batches = len(batches)
        self.normalize = Normalizer(data.mean, data.std, shard.device)

    def __len__(self) -> int:
        return self.batches

    def close(self) -> None:
        """Stop the worker processes now (idempotent; the next pass starts them again)."""
        _shutdown_workers(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every readable image of this rank's shard once (unreadable ones are left out)."""
        _collect_before_fork(self.loader)
        for images, labels, failed in self.loader:
            for path, reason in failed:
                self.bad_log.report(path, reason, split="val")
            if len(labels):
                yield self.normalize(images, labels)
