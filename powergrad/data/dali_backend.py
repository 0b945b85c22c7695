"""DALI backend (fn API): decode + random crop, resize, flip, normalize; mixed (nvJPEG) decode
and GPU operators when the device is CUDA, CPU operators else.

Train: one pipeline per epoch, seeded from (seed, epoch, rank, world_size), reading this rank's
batches of the epoch's global permutation (powergrad.data.sampling, shared with the torch
backend). So epoch e's batches depend on (seed, e, rank, world_size) only, never on earlier
epochs having run. The file order does not go into the pipeline definition: an external source
hands DALI each batch's paths (a Python callable of the batch index, `EpochFeed`) and
`fn.io.file.read` reads the files on DALI's threads.

Why (scripts/bench_dali_epochs.py: 1.28M train files, world size 8, rank 0). Building a
pipeline holds the GIL from its definition to the end of `Pipeline.build()`, so a pipeline
"built ahead on a thread" freezes the training thread just the same. With the whole epoch list
given as `fn.readers.file(files=..., labels=..., shard_id, num_shards)` (the design before this
one) a build took seconds: Python lists of the epoch's 1.28M paths and labels, DALI's
conversion of those arguments in the definition, then the C++ build copying them (its
build_costs: 8 to 11 s in all on the loaded 2-core machine this was written on, the GIL held
for ~4 s at a stretch; the training thread waited ~9 s at the epoch boundary). One rank's
slice (num_shards=1) is still O(N / W): ~0.3 s of GIL at 160k files. A `file_list=` text file
moves the cost to writing it (the GIL comes and goes) and to parsing it in the build (GIL held,
O(N / W) again). The external source makes the definition and the build O(1) in the dataset
size, a few ms; the epoch's order (numpy's permutation, mostly without the GIL) is computed on
a thread while the previous epoch runs.

One pipeline at a time per rank: when epoch e's last batch is read, its pipeline is shut down
and only then is epoch e + 1's built, both on a thread, so that the build and the first batches
overlap the last step, the evaluation and the checkpoint. On a GPU, DALI pipelines hold device
memory (nvJPEG buffers, output pools) from their build on: never two of them at once (the val
loader keeps one more, idle while training runs). A persistent train pipeline over the whole
run (an external source following `epoch_idx`) would need no rebuilds, but DALI seeds its
random operators once per pipeline: epoch e's crops would then depend on every epoch before it,
which breaks the contract above (a resume at an epoch boundary could no longer rebuild epoch e
from its number alone). `close()` shuts the running and the built-ahead pipeline down
(train.py calls it in a `finally`, also on errors and preemption).

Exact resume: the pipeline has DALI checkpointing enabled (the random operators' states and the
external source's batch index): `state_dict` saves the checkpoint after the last batch handed
out, and a pipeline rebuilt from it continues with the next batch bit-for-bit. Without a
matching checkpoint, `epoch(e, k)` replays and discards batches 0..k-1 (same result, costs
their decode time).

Val: one persistent pipeline over this rank's contiguous shard of the sorted val files
(powergrad.data.sampling.shard_range; ~6k files per rank on ImageNet at world size 8, built
once), read by fn.readers.file with pad_last_batch=True and an iterator with
LastBatchPolicy.PARTIAL, which drops the padding: across ranks every image once.

Memory layout: with Shard.channels_last, crop_mirror_normalize writes HWC and the batch is
handed out as an N x C x H x W view of that N x H x W x C memory (channels_last strides), so the
engine's `.contiguous(memory_format=torch.channels_last)` is a no-op instead of a copy.

Bad files. Only files that passed the start-up check are listed, so the reader never sees an
empty or truncated file. DALI cannot skip a sample inside the graph: a file deleted mid-run or
one its decoder rejects (e.g. a bogus Huffman table) stops the pipeline with a RuntimeError.
The loaders find the file (named in the message by fn.io.file.read and fn.readers.file; for a
decode failure of a train batch, DALI names "sample #k" of the batch being fetched, which the
epoch order maps to its file) and apply data.on_bad_file (powergrad.data.badfiles): error
raises DatasetError naming it; skip rebuilds the pipeline with the file replaced by the next
readable file of the listing (train; restored from the DALI checkpoint of the last batch read,
so the batches are bitwise those of a run that never listed the file) or left out (val; the
rest of the shard continues). What DALI cannot detect: a JPEG whose entropy-coded data is
corrupt decodes "successfully" to garbage pixels (libjpeg-turbo only prints "Corrupt JPEG data"
on stderr); the torch backend refuses such files, and the full decode scan
(scripts/check_dataset.py -> ROOT/bad_files.tsv) keeps them out of a DALI run.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from powergrad.data.badfiles import MAX_CONSECUTIVE_BAD, BadFileLog
from powergrad.data.config import DataConfig, LoaderConfig, Shard, val_resize_size
from powergrad.data.sampling import (
    STREAM_DALI,
    derive_seed,
    epoch_permutation,
    rank_batches,
    shard_range,
    train_steps,
)

_OUTPUTS = ["images", "labels"]
_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
# DALI's message for a sample its decoder rejects; k is the sample's index in its batch.
_DECODE_FAILURE = re.compile(r"Failed to decode sample #(\d+)")

# Mixed (nvJPEG) decoder hints of NVIDIA's ResNet-50 pipelines, sized for the largest ImageNet
# image so the decoder never reallocates mid-run. Paddings: DeepLearningExamples,
# PyTorch/Classification/ConvNets/image_classification/dataloaders.py (HybridTrainPipe) and
# dali.py (training_pipe): one device buffer of 211025920 B (~201 MiB) and two pinned host
# buffers of 140544512 B (~134 MiB) per DALI thread, i.e. per rank with loader.workers=4: ~0.8
# GiB of device memory and ~1.1 GiB of pinned host memory. HW decoder preallocation (A100 and
# later): NVIDIA/DALI, docs/examples/use_cases/pytorch/resnet50/main.py (image_processing_func),
# 5980 x 6430 pixels. hw_decoder_load stays at DALI's default (0.65 of the images to the HW
# decoder): NVIDIA's pipelines do not set it and its best value depends on the thread count.
MIXED_DECODER_HINTS = {
    "device_memory_padding": 211_025_920,
    "host_memory_padding": 140_544_512,
    "preallocate_width_hint": 5980,
    "preallocate_height_hint": 6430,
}


def decoder_args(gpu: bool) -> dict:
    """The train decoder's device and, for the mixed (GPU) decoder, its memory hints."""
    return {"device": "mixed", **MIXED_DECODER_HINTS} if gpu else {"device": "cpu"}


def _normalize_args(data: DataConfig, channels_last: bool) -> dict:
    # DALI normalizes decoded 0-255 pixels, so the 0-1 statistics are scaled by 255.
    return {
        "dtype": types.FLOAT,
        "output_layout": "HWC" if channels_last else "CHW",
        "mean": [255.0 * m for m in data.mean],
        "std": [255.0 * s for s in data.std],
    }


class EpochFeed:
    """The external source of one epoch: batch b's file paths and int32 labels.

    Called by DALI with the batch index (0.., restored from a DALI checkpoint) from the thread
    that schedules the pipeline's runs, i.e. the training thread; StopIteration after the
    epoch's last batch. The paths go as one zero-padded B x L byte matrix plus their lengths
    (B x 1): DALI takes a dense array in one piece, where a list of B ragged arrays costs it a
    Python conversion per sample on the training thread.
    """

    def __init__(
        self, files: Sequence[str], labels: np.ndarray, order: np.ndarray, batch_size: int
    ) -> None:
        self.files, self.labels, self.order = files, labels, order
        self.batch_size = batch_size
        self.steps = len(order) // batch_size

    def __call__(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if batch >= self.steps:
            raise StopIteration
        indices = self.order[batch * self.batch_size : (batch + 1) * self.batch_size]
        paths = [os.fsencode(self.files[i]) for i in indices]  # the bytes the file system has
        padded = np.array(paths).view(np.uint8).reshape(len(paths), -1)  # numpy pads with 0
        lengths = np.array([len(p) for p in paths], dtype=np.int32).reshape(-1, 1)
        return padded, lengths, self.labels[indices].reshape(-1, 1)


def train_augment(encoded, data: DataConfig, gpu: bool, channels_last: bool):
    """The train operators after reading: decode a random crop (area crop_scale_min..1, aspect
    3/4..4/3), resize to image_size (bilinear, antialiased), random flip, normalize."""
    images = fn.decoders.image_random_crop(
        encoded,
        output_type=types.RGB,
        adjust_orientation=False,  # EXIF ignored, as by the torch backend (load_rgb)
        random_area=[data.crop_scale_min, 1.0],
        random_aspect_ratio=[3 / 4, 4 / 3],
        num_attempts=10,
        **decoder_args(gpu),
    )
    images = fn.resize(
        images,
        resize_x=data.image_size,
        resize_y=data.image_size,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    mirror = fn.random.coin_flip(probability=0.5) if data.hflip else 0
    return fn.crop_mirror_normalize(images, mirror=mirror, **_normalize_args(data, channels_last))


@pipeline_def(enable_checkpointing=True)
def train_pipeline(feed: EpochFeed, data: DataConfig, gpu: bool, channels_last: bool):
    """Read the files `feed` names, then `train_augment`."""
    padded, lengths, label = fn.external_source(
        source=feed, num_outputs=3, batch=True, dtype=[types.UINT8, types.INT32, types.INT32]
    )
    paths = fn.slice(padded, start=[0], end=lengths, axes=[0])  # each path without its padding
    images = train_augment(fn.io.file.read(paths), data, gpu, channels_last)
    return images, label.gpu() if gpu else label


@pipeline_def
def val_pipeline(
    files: list[str], labels: list[int], data: DataConfig, gpu: bool, channels_last: bool
):
    """Decode, resize the shorter side to image_size / val_resize_ratio (data.val_interpolation,
    antialiased), center crop, normalize."""
    encoded, label = fn.readers.file(
        files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name="Reader"
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
        **_normalize_args(data, channels_last),
    )
    return images, label.gpu() if gpu else label


def pipeline_kwargs(loader: LoaderConfig, batch_size: int, device: torch.device) -> dict:
    """Pipeline arguments: batch, loader.workers DALI threads, the CUDA device (None: CPU),
    loader.prefetch batches prepared ahead."""
    gpu = device.type == "cuda"
    return {
        "batch_size": batch_size,
        "num_threads": max(1, loader.workers),
        "device_id": (device.index if device.index is not None else torch.cuda.current_device())
        if gpu
        else None,
        "prefetch_queue_depth": loader.prefetch,
    }


def _to_contract(
    batch: list[dict], device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out = batch[0]
    images = out["images"]
    if channels_last:
        # N x H x W x C memory seen as N x C x H x W: channels_last strides, no copy.
        images = images.permute(0, 3, 1, 2)
    images = images.to(device, non_blocking=True)
    # The sources give int32 labels of shape N x 1.
    labels = out["labels"].reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True)
    return images, labels


def live_pipelines() -> int:
    """DALI pipelines of this process that are built and not shut down (on a GPU: each holds
    device memory). Read from DALI's own registry of pipelines (Pipeline._pipes)."""
    alive = (ref() for ref in list(Pipeline._pipes))
    return sum(1 for pipe in alive if pipe is not None and pipe._pipe is not None)


@dataclass
class _Running:
    """A built pipeline and its iterator."""

    pipe: Pipeline
    iterator: DALIGenericIterator

    def close(self) -> None:
        # DALI has no public close: _shutdown() stops the pipeline's threads and frees its
        # buffers now (what DALI's own atexit hook calls; dropping the last reference would
        # wait for the garbage collector, as pipelines sit in reference cycles).
        self.pipe._shutdown()


class _Background:
    """`work()` on a thread of its own; `result()` waits for it and returns its value, or None
    when it raised (the caller then redoes the work in the foreground, where errors are
    handled). Not a daemon: an interpreter exiting meanwhile lets it finish first."""

    def __init__(self, name: str, work: Callable[[], Any]) -> None:
        self._value = None

        def run() -> None:
            with contextlib.suppress(Exception):
                self._value = work()

        self._thread = threading.Thread(target=run, name=name)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        return self._value


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
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.data, self.loader, self.shard = data, loader, shard
        self.bad_log = bad_log
        self.steps = train_steps(len(self.files), shard.batch_size, shard.world_size)
        # Resolved here: a thread building ahead has its own current CUDA device.
        self._pipeline_kwargs = pipeline_kwargs(loader, shard.batch_size, shard.device)
        self._running: _Running | None = None  # the pipeline of the epoch being read
        # DALI checkpoint after the last batch read from the pipeline (~0.1 ms per batch).
        self._checkpoint: bytes | None = None
        self._epoch, self._next_batch = 0, 0
        self._resume: dict = {}
        self._reader: object | None = None  # identifies the epoch() call reading now
        # Listing indices of files found unreadable during the run (this rank).
        self._bad: set[int] = set()
        # The next epoch's order (no substitutions), computed on a thread while this epoch
        # runs: (epoch, its _Background).
        self._next_order: tuple[int, _Background] | None = None
        # The next epoch's pipeline, built on a thread once this epoch's last batch is read:
        # (epoch, bad files it skips, its _Background).
        self._ahead: tuple[int, frozenset[int], _Background] | None = None

    def __len__(self) -> int:
        return self.steps

    def _substitute(self, index: int, bad: frozenset[int]) -> int:
        """`index`, or the next listing index (cyclically) not in `bad`."""
        n = len(self.files)
        for step in range(n):
            j = (index + step) % n
            if j not in bad:
                return j
        raise self.bad_log.too_many(self.files[index])

    def _rank_order(self, epoch: int) -> np.ndarray:
        """This rank's listing indices of `epoch`, batch after batch."""
        s = self.shard
        permutation = epoch_permutation(len(self.files), s.seed, epoch)
        return rank_batches(permutation, s.batch_size, s.rank, s.world_size)

    def _order(self, epoch: int, bad: frozenset[int] = frozenset()) -> np.ndarray:
        """`_rank_order` (computed ahead if it was), with the files in `bad` replaced."""
        ready = self._next_order
        order = ready[1].result() if ready is not None and ready[0] == epoch else None
        order = self._rank_order(epoch) if order is None else order.copy()
        if bad:
            hit = np.isin(order, sorted(bad))
            order[hit] = [self._substitute(int(i), bad) for i in order[hit]]
        return order

    def _build(self, epoch: int, checkpoint: bytes | None, bad: frozenset[int]) -> _Running:
        """Epoch `epoch`'s pipeline (files in `bad` replaced), from `checkpoint` if given."""
        s = self.shard
        feed = EpochFeed(self.files, self.labels, self._order(epoch, bad), s.batch_size)
        pipe = train_pipeline(
            feed,
            self.data,
            s.device.type == "cuda",
            s.channels_last,
            seed=derive_seed(s.seed, epoch, s.rank, s.world_size, STREAM_DALI),
            checkpoint=checkpoint,
            **self._pipeline_kwargs,
        )
        try:
            pipe.build()
            # The iterator schedules loader.prefetch batches and reads the first.
            iterator = DALIGenericIterator(pipe, _OUTPUTS, size=-1)
        except BaseException:
            pipe._shutdown()
            raise
        return _Running(pipe, iterator)

    def _prepare_order(self, epoch: int) -> None:
        """Start computing `epoch`'s order (numpy, mostly without the GIL) on a thread."""
        if self._next_order is None or self._next_order[0] != epoch:
            work = _Background(f"dali-order-{epoch}", lambda: self._rank_order(epoch))
            self._next_order = (epoch, work)

    def _build_ahead(self, epoch: int, retiring: _Running) -> None:
        """On a thread: shut `retiring` (the finished epoch's pipeline) down, then build
        `epoch`'s, which reads its first batches meanwhile."""
        bad = frozenset(self._bad)

        def build() -> _Running:
            retiring.close()  # one pipeline at a time
            return self._build(epoch, None, bad)

        self._ahead = (epoch, bad, _Background(f"dali-epoch-{epoch}", build))

    def _take_ahead(self, epoch: int | None) -> _Running | None:
        """The pipeline built ahead, if it is `epoch`'s and skips today's bad files; it is shut
        down otherwise (always with None)."""
        if self._ahead is None:
            return None
        (ahead_epoch, bad, background), self._ahead = self._ahead, None
        running = background.result()
        if running is not None and ahead_epoch == epoch and bad == frozenset(self._bad):
            return running
        if running is not None:
            running.close()
        return None

    def _close_running(self) -> None:
        if self._running is not None:
            self._running, running = None, self._running
            running.close()

    def close(self) -> None:
        """Shut down the running pipeline and the one built ahead for the next epoch (their
        threads and buffers go now, not at garbage collection). Idempotent; a later epoch()
        builds its own."""
        self._close_running()
        self._take_ahead(None)
        if self._next_order is not None:
            self._next_order[1].result()
            self._next_order = None
        self._checkpoint = None

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
        if start_batch == self.steps:  # a checkpoint after the epoch's last step: nothing left
            return
        if start_batch > 0 and checkpoint is None:
            warnings.warn(
                f"no DALI checkpoint for epoch {epoch} batch {start_batch} (load_state_dict not "
                f"called with one): replaying and discarding {start_batch} batches",
                stacklevel=2,
            )
        # One epoch is read at a time: this call takes over (a pipeline left over from an
        # abandoned epoch goes before any other is built; that epoch's generator, finalized
        # later, leaves this one's pipeline alone).
        self._reader = reader = object()
        self._close_running()
        # Built ahead when the previous epoch ended, else in the loop (DALI's iterator reads a
        # batch when created).
        self._running = self._take_ahead(epoch if start_batch == 0 else None)
        self._prepare_order(epoch + 1)
        self._checkpoint = checkpoint
        s = self.shard
        if self._bad:  # files known bad are replaced up front: count the samples they cost
            mine = self._order(epoch)[start_batch * s.batch_size :]
            self.bad_log.skipped += int(np.isin(mine, sorted(self._bad)).sum())
        self._epoch, self._next_batch = epoch, 0 if checkpoint is None else start_batch
        rebuilds = 0  # in a row without a batch read: a dataset gone rather than a bad file
        try:
            while self._next_batch < self.steps:
                try:
                    if self._running is None:
                        # The epoch order (known bad files replaced), from the last batch read.
                        self._running = self._build(epoch, self._checkpoint, frozenset(self._bad))
                    batch = next(self._running.iterator)
                except RuntimeError as e:
                    path = self._skip_failed(e, epoch)  # raises unless the file can be skipped
                    rebuilds += 1
                    if rebuilds >= MAX_CONSECUTIVE_BAD:
                        raise self.bad_log.too_many(path) from e
                    continue
                rebuilds = 0
                self._checkpoint = self._running.iterator.checkpoints()[0]
                self._next_batch += 1
                if self._next_batch == self.steps:
                    # The epoch's last batch is read: its pipeline is shut down and the next
                    # epoch's built and read ahead, on a thread, while the caller trains on this
                    # batch (it stays valid: DALI hands out reference-counted memory),
                    # evaluates and checkpoints.
                    retiring, self._running = self._running, None
                    self._build_ahead(epoch + 1, retiring)
                if self._next_batch > start_batch:
                    yield _to_contract(batch, s.device, s.channels_last)
        finally:
            # The epoch is over or abandoned: its pipeline goes (threads and buffers) now.
            if self._reader is reader:
                self._close_running()
                self._checkpoint = None

    def _skip_failed(self, error: RuntimeError, epoch: int) -> str:
        """Report the file a pipeline error names and mark it bad (returns its path); re-raise
        errors that name no listed file. The dead pipeline is shut down."""
        self._close_running()
        found = failed_file(error, self.files)
        decode = _DECODE_FAILURE.search(str(error))
        if found is None and decode is not None:
            # A decode failure names sample k of the batch being fetched (self._next_batch) of
            # the order the dead pipeline read (built with today's bad files).
            b, k = self._next_batch, int(decode.group(1))
            batch = self._order(epoch, frozenset(self._bad))[b * self.shard.batch_size :]
            if k < min(len(batch), self.shard.batch_size):
                found = self.files[batch[k]], f"DALI: {decode.group(0)}"
        if found is None:
            raise error
        path, reason = found
        self.bad_log.report(path, reason, split="train", epoch=epoch)  # raises under error
        self._bad.add(self.files.index(path))
        return path

    def state_dict(self) -> dict:
        """Position and DALI checkpoint after the last batch handed out ({} between epochs,
        from the epoch's last batch on)."""
        if self._running is None or self._checkpoint is None:
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
        self._running: _Running | None = None
        self._dropped = 0  # files left out of this shard as unreadable

    def _build(self, first: int, auto_reset: bool) -> _Running:
        """A pipeline over self.files[first:]."""
        pipe = val_pipeline(
            self.files[first:],
            self.labels[first:],
            self.data,
            self.device.type == "cuda",
            self.shard.channels_last,
            seed=0,
            **pipeline_kwargs(self.loader, self.shard.batch_size, self.device),
        )
        try:
            pipe.build()
            iterator = DALIGenericIterator(
                pipe,
                _OUTPUTS,
                reader_name="Reader",
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=auto_reset,
            )
        except BaseException:
            pipe._shutdown()
            raise
        return _Running(pipe, iterator)

    def __len__(self) -> int:
        return self.batches

    def close(self) -> None:
        """Shut down the kept pipeline now; idempotent, the next pass builds it again."""
        if self._running is not None:
            self._running, running = None, self._running
            running.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every readable image of this rank's shard once (unreadable ones are left out)."""
        if not self.files:
            return
        running = self._running
        # Files left out in earlier passes are skipped samples of this pass too.
        self.bad_log.skipped += self._dropped
        done = 0  # images of self.files handed out in this pass
        try:
            while True:
                try:
                    if running is None:
                        # The whole shard (kept for the next passes), or its rest after a bad
                        # file (shut down when this pass ends).
                        running = self._build(done, auto_reset=done == 0)
                        if done == 0:
                            self._running = running
                    batch = next(running.iterator)
                except StopIteration:
                    return
                except RuntimeError as e:
                    if running is not None:  # dead (a failed build shut its own down)
                        if running is self._running:
                            self._running = None
                        running.close()
                        running = None
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
                images, labels = _to_contract(batch, self.device, self.shard.channels_last)
                done += len(labels)
                yield images, labels
        finally:
            if running is not None and running is not self._running:
                running.close()
