"""Sample order shared by every backend: one global permutation per epoch, sharded by rank.

Both the DALI file reader and the torch sampler read the same per-epoch order, so the two
backends see the same images in the same batches. A rank's shard is the contiguous range
[floor(rank * N / W), floor((rank + 1) * N / W)) of that order: exactly how DALI's readers
split a file list across `num_shards`.
"""

from __future__ import annotations

import numpy as np

# Distinct streams derived from the run seed, so permutation and augmentation never share one.
STREAM_PERMUTATION = 1
STREAM_AUGMENT = 2
STREAM_DALI = 3
STREAM_SYNTHETIC = 4


def derive_seed(*keys: int) -> int:
    """A 31-bit seed that depends on every key (seed, epoch, rank, ...), stable across runs."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The global sample order of `epoch`: a permutation of range(n), int64."""
    rng = np.random.default_rng(derive_seed(seed, epoch, STREAM_PERMUTATION))
    return rng.permutation(n)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n samples (DALI's reader sharding)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def train_steps(n: int, batch_size: int, world_size: int) -> int:
    """Full batches per epoch on every rank (the smallest shard decides; the last partial batch
    is dropped so all ranks run the same number of steps)."""
    return (n // world_size) // batch_size
