"""DALI backend (fn API): file reader sharded by rank, decode + random crop, resize, flip,
normalize; mixed (nvJPEG) decode and GPU operators when the device is CUDA, CPU operators else.

Train: every epoch builds a fresh pipeline over that epoch's file order (the global permutation
of powergrad.data.sampling, also used by the torch backend), read in order by
fn.readers.file(files=..., shard_id=rank, num_shards=world_size), with operator seeds derived
from (seed, epoch, rank). So epoch e's batches depend on (seed, e, rank, world_size) only, never
on earlier epochs having run. Epoch e + 1's pipeline is built on a thread once epoch e's reader
has scheduled its last batch (loader.prefetch batches before its end), so its build and first
batches overlap the end of epoch e (and the evaluation after it) instead of stalling the next
epoch's first step; until epoch e ends two pipelines are alive (memory: one more pipeline's
buffers). After the last epoch the one built ahead is not used (a few batches decoded for
nothing, once per run). The pipeline has DALI checkpointing enabled: `state_dict` saves the
pipeline + iterator checkpoint after the last batch handed out, and a pipeline rebuilt from it
continues with the next batch bit-for-bit. Without a matching checkpoint, `epoch(e, k)` replays
and discards batches 0..k-1 (same result, costs their decode time).

Val: one persistent pipeline over this rank's contiguous shard of the sorted val files
(powergrad.data.sampling.shard_range) with pad_last_batch=True and an iterator with
LastBatchPolicy.PARTIAL, which drops the padding: across ranks every image once.

Bad files. Only files that passed the start-up check are listed, so the reader never sees an
empty or truncated file. DALI cannot skip a sample inside the graph: a file deleted mid-run or
one its decoder rejects (e.g. a bogus Huffman table) stops the pipeline with a RuntimeError
naming the file. The loaders catch it, find the file in the message and apply data.on_bad_file
(powergrad.data.badfiles): error raises DatasetError naming it; skip rebuilds the pipeline with
the file replaced by the next readable file of the listing (train; restored from the DALI
checkpoint of the last batch read, so the batches are bitwise those of a run that never listed
the file) or left out (val; the rest of the shard continues). What DALI cannot detect: a JPEG
whose entropy-coded data is corrupt decodes "successfully" to garbage pixels (libjpeg-turbo
only prints "Corrupt JPEG data" on stderr); the torch backend refuses such files, and the full
decode scan (scripts/check_dataset.py -> ROOT/bad_files.tsv) keeps them out of a DALI run.
"""

from __future__ import annotations

import base64
import contextlib
import re
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from powergrad.data.badfiles import MAX_CONSECUTIVE_BAD, BadFileLog
from powergrad.data.config import DataConfig, LoaderConfig, Shard, val_resize_size
from powergrad.data.sampling import (
    STREAM_DALI,
    derive_seed,
    epoch_permutation,
    rank_batches,
    shard_range,
    sharded_order,
    train_steps,
)

_OUTPUTS = ["images", "labels"]
_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def _normalize_args(data: DataConfig) -> dict:
    # DALI normalizes decoded 0-255 pixels, so the 0-1 statistics are scaled by 255.
    return {
        "dtype": types.FLOAT,
        "output_layout": "CHW",
        "mean": [255.0 * m for m in data.mean],
        "std": [255.0 * s for s in data.std],
    }


@pipeline_def(enable_checkpointing=True)
def train_pipeline(
    files: list[str], labels: list[int], shard_id: int, num_shards: int, data: DataConfig, gpu: bool
):
    """Read in the given order, decode a random crop (area crop_scale_min..1, aspect 3/4..4/3),
    resize to image_size (bilinear, antialiased), random flip, normalize."""
    encoded, label = fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=False,  # the order is the epoch permutation given in `files`
        pad_last_batch=True,
        name="Reader",
    )
    images = fn.decoders.image_random_crop(
        encoded,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        adjust_orientation=False,  # EXIF ignored, as by the torch backend (load_rgb)
        random_area=[data.crop_scale_min, 1.0],
        random_aspect_ratio=[3 / 4, 4 / 3],
        num_attempts=10,
    )
    images = fn.resize(
        images,
        resize_x=data.image_size,
        resize_y=data.image_size,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    mirror = fn.random.coin_flip(probability=0.5) if data.hflip else 0
    images = fn.crop_mirror_normalize(images, mirror=mirror, **_normalize_args(data))
    return images, label.gpu() if gpu else label


@pipeline_def
def val_pipeline(
    files: list[str], labels: list[int], shard_id: int, num_shards: int, data: DataConfig, gpu: bool
):
    """Decode, resize the shorter side to image_size / val_resize_ratio (data.val_interpolation,
    antialiased), center crop, normalize."""
    encoded, label = fn.readers.file(
        files=files,
        labels=labels,
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=False,
        pad_last_batch=True,
        name="Reader",
    )
    images = fn.decoders.image(
        encoded,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        adjust_orientation=False,  # EXIF ignored, as by the torch backend (load_rgb)
    )
    images = fn.resize(
        images,
        resize_shorter=val_resize_size(data),
        interp_type=_INTERP[data.val_interpolation],
        antialias=True,
    )
    images = fn.crop_mirror_normalize(
        images,
        crop=(data.image_size, data.image_size),
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        **_normalize_args(data),
    )
    return images, label.gpu() if gpu else label


def _pipe_kwargs(loader: LoaderConfig, batch_size: int, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {
        "batch_size": batch_size,
        "num_threads": max(1, loader.workers),
        "device_id": (device.index if device.index is not None else torch.cuda.current_device())
        if gpu
        else None,
        "prefetch_queue_depth": loader.prefetch,
    }


def _to_contract(batch: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    out = batch[0]
    images = out["images"].to(device, non_blocking=True)
    # The reader yields int32 labels of shape N x 1.
    labels = out["labels"].reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
    return images, labels


def failed_file(error: BaseException, files: Sequence[str]) -> tuple[str, str] | None:
    """(path, reason) when a DALI pipeline error names one of `files`, else None.

    DALI names the file in its message ("Failed to decode sample #3 : PATH", "File mapping
    failed: PATH"); the reason is the line that names it.
    """
    text = str(error)
    candidates = {t.rstrip(".,:;)") for t in re.findall(r"[^\s'\"]*/[^\s'\"]*", text)}
    if not candidates:
        return None
    known = candidates & set(files)
    if not known:
        return None
    path = min(known, key=text.index)
    line = next((ln.strip() for ln in text.splitlines() if path in ln), path)
    return path, f"DALI: {line.replace(path, '<file>')}"[:200]


class DaliTrainLoader:
    """Training batches from DALI; see powergrad.data for the TrainLoader contract."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        data: DataConfig,
        loader: LoaderConfig,
        shard: Shard,
        bad_log: BadFileLog,
    ) -> None:
        self.files, self.labels = list(files), list(labels)
        self.data, self.loader, self.shard = data, loader, shard
        self.bad_log = bad_log
        self.steps = train_steps(len(self.files), shard.batch_size, shard.world_size)
        self._iterator: DALIGenericIterator | None = None
        # DALI checkpoint after the last batch read from the pipeline (~0.1 ms per batch).
        self._checkpoint: bytes | None = None
        self._epoch, self._next_batch = 0, 0
        self._resume: dict = {}
        # Listing indices of files found unreadable during the run (this rank).
        self._bad: set[int] = set()
        # The next epoch's pipeline, being built on a thread: (epoch, bad files it skips,
        # thread, {"iterator": ...} once built).
        self._ahead: tuple[int, frozenset[int], threading.Thread, dict] | None = None

    def _substitute(self, index: int, bad: frozenset[int]) -> int:
        """`index`, or the next listing index (cyclically) not in `bad`."""
        n = len(self.files)
        for step in range(n):
            j = (index + step) % n
            if j not in bad:
                return j
        raise self.bad_log.too_many(self.files[index])

    def __len__(self) -> int:
        return self.steps

    def _build(
        self, epoch: int, checkpoint: bytes | None, bad: frozenset[int]
    ) -> DALIGenericIterator:
        # Cut to full global batches and laid out so the reader's contiguous shard r holds rank
        # r's slice of every global batch (see powergrad.data.sampling).
        s = self.shard
        order = sharded_order(
            epoch_permutation(len(self.files), s.seed, epoch), s.batch_size, s.world_size
        )
        if bad:
            order = [self._substitute(int(i), bad) for i in order]
        pipe = train_pipeline(
            [self.files[i] for i in order],
            [self.labels[i] for i in order],
            s.rank,
            s.world_size,
            self.data,
            s.device.type == "cuda",
            seed=derive_seed(s.seed, epoch, s.rank, s.world_size, STREAM_DALI),
            checkpoint=checkpoint,
            **_pipe_kwargs(self.loader, s.batch_size, s.device),
        )
        pipe.build()
        return DALIGenericIterator(
            pipe, _OUTPUTS, reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP
        )

    def _build_ahead(self, epoch: int) -> None:
        """Start building `epoch`'s pipeline (from its first batch) on a thread."""
        bad, built = frozenset(self._bad), {}

        def build() -> None:
            # A failure (e.g. a bad file in its first batch) is left to epoch(), which
            # rebuilds the pipeline and handles the error there.
            with contextlib.suppress(Exception):
                built["iterator"] = self._build(epoch, None, bad)

        # Not a daemon: an interpreter exiting meanwhile lets the build finish first.
        thread = threading.Thread(target=build, name=f"dali-epoch-{epoch}")
        thread.start()
        self._ahead = (epoch, bad, thread, built)

    def _take_ahead(self, epoch: int | None) -> DALIGenericIterator | None:
        """The pipeline built ahead, if it is `epoch`'s and skips today's bad files; it is
        dropped otherwise (always with None)."""
        if self._ahead is None:
            return None
        (ahead_epoch, bad, thread, built), self._ahead = self._ahead, None
        thread.join()
        if ahead_epoch == epoch and bad == frozenset(self._bad):
            return built.get("iterator")
        return None

    def close(self) -> None:
        """Drop the pipeline built ahead for the next epoch (its threads stop working now, not
        when the loader is garbage collected); the next epoch() builds its own."""
        self._take_ahead(None)

    def epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_batch..len-1 of `epoch` (images normalized on device, int64 labels)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} outside 0..{len(self)}")
        resume, self._resume = self._resume, {}
        restorable = (
            start_batch > 0
            and resume.get("epoch") == epoch
            and resume.get("next_batch") == start_batch
            and "dali_checkpoint" in resume
        )
        checkpoint = base64.b64decode(resume["dali_checkpoint"]) if restorable else None
        if start_batch > 0 and checkpoint is None:
            warnings.warn(
                f"no DALI checkpoint for epoch {epoch} batch {start_batch} (load_state_dict not "
                f"called with one): replaying and discarding {start_batch} batches",
                stacklevel=2,
            )
        # Built ahead during the previous epoch, else in the loop (DALI's iterator reads a batch
        # when created).
        self._iterator = self._take_ahead(epoch if start_batch == 0 else None)
        self._checkpoint = checkpoint
        if self._bad:  # files known bad are replaced up front: count the samples they cost
            s = self.shard
            mine = rank_batches(
                epoch_permutation(len(self.files), s.seed, epoch),
                s.batch_size,
                s.rank,
                s.world_size,
            )[start_batch * s.batch_size :]
            self.bad_log.skipped += int(np.isin(mine, sorted(self._bad)).sum())
        self._epoch, self._next_batch = epoch, 0 if checkpoint is None else start_batch
        rebuilds = 0  # in a row without a batch read: a dataset gone rather than a bad file
        try:
            while self._next_batch < self.steps:
                try:
                    if self._iterator is None:
                        # The epoch order (known bad files replaced), from the last batch read.
                        self._iterator = self._build(epoch, self._checkpoint, frozenset(self._bad))
                    batch = next(self._iterator)
                except RuntimeError as e:
                    path = self._skip_failed(e, epoch)  # raises unless the file can be skipped
                    rebuilds += 1
                    if rebuilds >= MAX_CONSECUTIVE_BAD:
                        raise self.bad_log.too_many(path) from e
                    continue
                rebuilds = 0
                self._checkpoint = self._iterator.checkpoints()[0]
                self._next_batch += 1
                if self._next_batch == max(1, self.steps - self.loader.prefetch):
                    # This epoch's reader has scheduled its last batch: its threads run idle
                    # from here on, the next epoch's can start.
                    self._build_ahead(epoch + 1)
                if self._next_batch > start_batch:
                    yield _to_contract(batch, self.shard.device)
        finally:
            # Drop the pipeline (its threads and buffers) once the epoch is over or abandoned.
            self._iterator = None
            self._checkpoint = None

    def _skip_failed(self, error: RuntimeError, epoch: int) -> str:
        """Report the file a pipeline error names and mark it bad (returns its path); re-raise
        errors that name no listed file."""
        self._iterator = None
        found = failed_file(error, self.files)
        if found is None:
            raise error
        path, reason = found
        self.bad_log.report(path, reason, split="train", epoch=epoch)  # raises under error
        self._bad.add(self.files.index(path))
        return path

    def state_dict(self) -> dict:
        """Position and DALI checkpoint after the last batch handed out ({} between epochs)."""
        if self._iterator is None or self._checkpoint is None:
            return {}
        return {
            "epoch": self._epoch,
            "next_batch": self._next_batch,
            "dali_checkpoint": base64.b64encode(self._checkpoint).decode("ascii"),
        }

    def load_state_dict(self, state: dict) -> None:
        """Use `state` for the next epoch(state['epoch'], start_batch=state['next_batch'])."""
        self._resume = dict(state)


class DaliEvalLoader:
    """Validation batches: this rank's shard once, padding removed (LastBatchPolicy.PARTIAL)."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        data: DataConfig,
        loader: LoaderConfig,
        shard: Shard,
        bad_log: BadFileLog,
    ) -> None:
        self.data, self.loader, self.shard, self.bad_log = data, loader, shard, bad_log
        self.device = shard.device
        start, stop = shard_range(len(files), shard.rank, shard.world_size)
        # This rank's shard, read by a 1-shard reader: a file left out here moves no image
        # between ranks.
        self.files, self.labels = list(files[start:stop]), list(labels[start:stop])
        self.batches = -(-(stop - start) // shard.batch_size)
        # Built on first use (DALI's iterator reads a batch when created), then kept.
        self._iterator: DALIGenericIterator | None = None
        self._dropped = 0  # files left out of this shard as unreadable

    def _build(self, first: int, auto_reset: bool) -> DALIGenericIterator:
        """An iterator over self.files[first:]."""
        pipe = val_pipeline(
            self.files[first:],
            self.labels[first:],
            0,
            1,
            self.data,
            self.device.type == "cuda",
            seed=0,
            **_pipe_kwargs(self.loader, self.shard.batch_size, self.device),
        )
        pipe.build()
        return DALIGenericIterator(
            pipe,
            _OUTPUTS,
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=auto_reset,
        )

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every readable image of this rank's shard once (unreadable ones are left out)."""
        if not self.files:
            return
        iterator = self._iterator
        # Files left out in earlier passes are skipped samples of this pass too.
        self.bad_log.skipped += self._dropped
        done = 0  # images of self.files handed out in this pass
        while True:
            try:
                if iterator is None:
                    # The whole shard (kept for the next passes), or its rest after a bad file.
                    iterator = self._build(done, auto_reset=done == 0)
                    if done == 0:
                        self._iterator = iterator
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError as e:
                self._iterator = iterator = None  # the pipeline is dead
                found = failed_file(e, self.files[done:])
                if found is None:
                    raise
                path, reason = found
                self.bad_log.report(path, reason, split="val")  # raises under error
                index = self.files.index(path, done)
                del self.files[index], self.labels[index]
                self._dropped += 1
                if done == len(self.files):
                    return
                continue
            images, labels = _to_contract(batch, self.device)
            done += len(labels)
            yield images, labels
