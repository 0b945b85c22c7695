"""Synthetic backend: random tensors created once on the device, for throughput measurements.

No files and no decoding: every train batch is the same pre-made tensor, so a run measures the
model and the optimizer alone. Deterministic in (seed, rank).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from powergrad.data.config import DataConfig, Shard
from powergrad.data.sampling import STREAM_SYNTHETIC, derive_seed, shard_range, train_steps


def _batch(
    n: int, data: DataConfig, num_classes: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = data.image_size
    # Made on the CPU generator for reproducibility, then moved once.
    images = torch.randn(n, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (n,), generator=gen).to(device)
    return images, labels


class SyntheticTrainLoader:
    """`len` full batches of one fixed random batch per epoch (TrainLoader contract)."""

    def __init__(self, data: DataConfig, num_classes: int, shard: Shard) -> None:
        self.steps = train_steps(data.synthetic_train_images, shard.batch_size, shard.world_size)
        seed = derive_seed(shard.seed, shard.rank, STREAM_SYNTHETIC)
        self.batch = _batch(shard.batch_size, data, num_classes, shard.device, seed)

    def __len__(self) -> int:
        return self.steps

    def epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the fixed batch for batches start_batch..len-1."""
        for _ in range(start_batch, self.steps):
            yield self.batch

    def state_dict(self) -> dict:
        """No state: every batch is the same."""
        return {}

    def close(self) -> None:
        """Nothing to release: no threads, no processes (the batch is an ordinary tensor)."""

    def load_state_dict(self, state: dict) -> None:
        """Accept the (empty) state written by `state_dict`."""


class SyntheticEvalLoader:
    """This rank's shard of synthetic_val_images, in batches (the last one may be smaller)."""

    def __init__(self, data: DataConfig, num_classes: int, shard: Shard) -> None:
        start, stop = shard_range(data.synthetic_val_images, shard.rank, shard.world_size)
        self.count, self.batch_size = stop - start, shard.batch_size
        seed = derive_seed(shard.seed, shard.rank, STREAM_SYNTHETIC, 1)
        self.batch = _batch(shard.batch_size, data, num_classes, shard.device, seed)

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def close(self) -> None:
        """Nothing to release: no threads, no processes (the batch is an ordinary tensor)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for lo in range(0, self.count, self.batch_size):
            n = min(self.batch_size, self.count - lo)
            yield self.batch[0][:n], self.batch[1][:n]
