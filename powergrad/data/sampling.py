"""Sample order shared by every backend: one global permutation per epoch, split by batch.

Both the DALI external source and the torch sampler read the same per-epoch order, so the
two backends see the same images in the same batches. Global batch b (W x B images for W ranks
of B) is the slice [b * W * B, (b + 1) * W * B) of that order and rank r reads the r-th B-image
slice of it (:func:`rank_batches`). So the union of the ranks' batch b is batch b of a single
process with batch W x B: the sequence of global batches does not depend on the world size
(the two-process DDP equivalence test relies on it). A reader that splits one file list into
contiguous shards [floor(r * N / W), floor((r + 1) * N / W)) (DALI's fn.readers.file, as the
DALI backend used it before; scripts/bench_dali_epochs.py still does) is handed the order that
:func:`sharded_order` lays out so that its shard r is exactly rank r's batches.
Validation keeps contiguous shards (:func:`shard_range`): no order matters there.
"""

from __future__ import annotations

import numpy as np

# Distinct streams derived from the run seed, so permutation and augmentation never share one.
STREAM_PERMUTATION = 1
STREAM_AUGMENT = 2
STREAM_DALI = 3
STREAM_SYNTHETIC = 4
STREAM_RANK = 5  # per-rank torch / numpy / python seeds of ranks > 0 (powergrad.build)


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


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Rank's samples of one epoch in reading order: its slice of every full global batch."""
    steps = train_steps(len(order), batch_size, world_size)
    used = np.asarray(order)[: steps * batch_size * world_size]
    return used.reshape(steps, world_size, batch_size)[:, rank].reshape(-1)


def sharded_order(order: np.ndarray, batch_size: int, world_size: int) -> np.ndarray:
    """``order`` rearranged (and cut to full global batches) so that a reader splitting it into
    ``world_size`` contiguous shards gives rank r exactly :func:`rank_batches` (r)."""
    return np.concatenate(
        [rank_batches(order, batch_size, r, world_size) for r in range(world_size)]
    )


def train_steps(n: int, batch_size: int, world_size: int) -> int:
    """Full batches per epoch on every rank (the smallest shard decides; the last partial batch
    is dropped so all ranks run the same number of steps)."""
    return (n // world_size) // batch_size
