"""The run's checkpoints: what is saved, how it is restored, and which format version it is.

``last.pt`` (format ``powergrad-checkpoint-v1``) continues a run bit for bit. One dict of plain
containers and tensors, readable with ``torch.load(weights_only=True)``:

- ``model``: the unwrapped model's state dict (timm keys, so eval.py and timm can read it);
- ``ema``: with trainer.ema_decay, the EMA weights' state dict (timm keys), else None;
- ``optimizer``, ``scaler``, ``scheduler``: their state dicts;
- :class:`TrainState`'s fields: ``epoch`` / ``batch`` (next epoch, next batch in it), ``step``
  (optimizer steps), ``best_val_top1``, ``best_epoch``, ``history``, ``wall_s``,
  ``nonfinite_losses``;
- ``meters``: the unfinished epoch's running sums; ``rng`` and ``data``: per rank, the RNG
  states and the train loader's state;
- ``world_size``, ``config`` (resolved, plain dict), ``wandb_id``, ``git_sha``, ``file_list``
  (a digest of the dataset's file lists: a resume says when they changed).

``best.pt`` (format ``powergrad-weights-v1``) keeps the best epoch's ``model`` and what
identifies it (:data:`WEIGHTS_KEYS`), half the size of ``last.pt``: it is for evaluation and
fine-tuning, and :func:`restore` refuses it. With ``trainer.keep_best=K`` > 1 the next K - 1
epochs by val top-1 are kept beside it as ``best-epochNNNN.pt`` (same format, NNNN the epoch):
a new file is always complete on disk (the old best linked to its epoch name, then the new
best.pt written) before any file that left the top K is removed.

Both are written through :func:`powergrad.fileio.atomic_write` on rank 0, and only when every
parameter and buffer is finite: a diverged state is never written over a good one.

The order of writes keeps every claim backed by a complete file: an epoch-end save writes
``last.pt`` first (one atomic file holding the epoch's weights and the ranking that names it),
then that epoch's weights file, then removes what left the top K. A kill (or a full disk)
between two of these steps leaves a ranking whose newest file is missing, or files the ranking
no longer names; :func:`agree_best` finds both and rebuilds the file from ``last.pt`` (it
holds those weights), or, when no complete copy of a ranked epoch's weights exists anywhere,
stops counting that epoch among the best and says so. With a
:class:`Writer` (train.py's), :func:`save` copies the state to host memory (~40 ms for ResNet-18's
90 MB) and the serialization and fsync run on a background thread while training goes on: on a
2-core machine they took 0.3-0.5 s of each ~3.6 s digits epoch (scripts/profile_main.py --sections
save). One write is in flight at a time, in order; its error (e.g. a full disk) is raised by
the next save or by :meth:`Writer.wait`.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from powergrad import distributed as pgdist
from powergrad.data.sampling import STREAM_RANK, derive_seed
from powergrad.fileio import atomic_write
from powergrad.models import load_state_dict_strict, unwrap_model

__all__ = [
    "BEST",
    "LAST",
    "CheckpointError",
    "NonFiniteError",
    "TrainState",
    "Writer",
    "agree_best",
    "best_name",
    "capture_rng",
    "check_resumable",
    "configure_runtime",
    "init_weights",
    "load",
    "load_for_resume",
    "nonfinite_tensors",
    "rank_best",
    "reconcile_best",
    "restore",
    "restore_rng",
    "save",
    "seed_everything",
]

LAST = "last.pt"
BEST = "best.pt"
TRAINING_FORMAT = "powergrad-checkpoint-v1"
WEIGHTS_FORMAT = "powergrad-weights-v1"
# What best.pt keeps besides its weights: enough to say which run and epoch they come from.
WEIGHTS_KEYS = ("epoch", "step", "best_val_top1", "best_epoch", "history", "config")
RUN_KEYS = ("wandb_id", "git_sha")
# What restore() reads from a last.pt (the TrainState fields have defaults, ``ema`` may be None).
RESUME_KEYS = (
    "model",
    "optimizer",
    "scaler",
    "scheduler",
    "epoch",
    "batch",
    "step",
    "meters",
    "rng",
    "data",
    "world_size",
    "config",
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or is not what the caller needs."""


class NonFiniteError(RuntimeError):
    """The loss, a weight or a buffer became NaN/inf: training stops without checkpointing."""


@dataclass
class TrainState:
    """Where training stands; every field goes into the checkpoint."""

    epoch: int = 0  # epoch in progress (0-based)
    batch: int = 0  # next batch of that epoch
    step: int = 0  # optimizer steps taken (the scheduler's num_updates)
    best_val_top1: float = float("-inf")  # percent
    best_epoch: int = 0  # 1-based epoch of best_val_top1 (0: none yet)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    wall_s: float = 0.0  # training wall time of earlier starts of this run, seconds
    nonfinite_losses: int = 0  # over finished epochs (fp16: steps the scaler skipped)
    # The kept best epochs, [val_top1, epoch] by val top-1 (ties: the earlier epoch first);
    # the first is best.pt, the others best-epochNNNN.pt (trainer.keep_best of them in all).
    best_checkpoints: list[list[float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter, repr=False)  # this start, not saved

    def elapsed_s(self) -> float:
        """Training wall time of the run so far, over all its starts, in seconds."""
        return self.wall_s + time.perf_counter() - self.started


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers (BN running stats included) holding NaN/inf."""
    named = [*model.named_parameters(), *model.named_buffers()]
    floats = [(n, t) for n, t in named if t.is_floating_point()]
    if not floats:
        return []
    # One reduction and one host sync for the whole model; names only when something is bad.
    ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in floats])
    if bool(ok.all()):
        return []
    return [n for (n, _), good in zip(floats, ok.tolist(), strict=True) if not good]


def rank_best(state: TrainState, top1: float, epoch: int, keep: int) -> bool:
    """Enter epoch ``epoch`` (1-based, just finished) with val top-1 ``top1`` into the
    ``keep`` best; updates ``state`` (best_val_top1 / best_epoch when it is the new best) and
    returns whether it ranks (then :func:`save` with ``best=True`` writes its file)."""
    if not top1 > float("-inf"):  # NaN: never ranks
        return False
    entry = [top1, epoch]
    # sorted is stable: among equal values the earlier epoch stays ahead.
    ranked = sorted([*state.best_checkpoints, entry], key=lambda r: -r[0])[:keep]
    state.best_checkpoints = ranked
    if ranked[0] is entry:
        state.best_val_top1, state.best_epoch = top1, epoch
    return any(r is entry for r in ranked)


def best_name(epoch: int) -> str:
    """File name of a kept runner-up epoch (trainer.keep_best > 1)."""
    return f"best-epoch{epoch:04d}.pt"


def _keep_as(src: Path, dst: Path) -> None:
    """``dst`` becomes a second name of ``src``'s bytes, atomically (hard link; a copy where
    the filesystem has none)."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")  # fileio.temp_pattern: removed if left behind
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _weights_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """best.pt's content from a last.pt dict: the weights and what identifies them. The
    optimizer, RNG and loader states (half the bytes for SGD with momentum) are for continuing;
    evaluation and fine-tuning need the weights."""
    weights = {"format": WEIGHTS_FORMAT, "model": ckpt["model"]}
    weights.update({k: ckpt.get(k) for k in (*WEIGHTS_KEYS, *RUN_KEYS)})
    return weights


def _write_best(
    run_dir: Path, weights: dict[str, Any], best_epoch: int, kept: list[list[float]]
) -> None:
    """best.pt, or a runner-up's best-epochNNNN.pt, then remove what left the top K (``kept``:
    TrainState.best_checkpoints as of the save)."""
    epoch = weights["epoch"]
    if best_epoch == epoch:
        if len(kept) > 1 and (run_dir / BEST).exists():
            # The previous best (now second) keeps its bytes under its epoch's name first.
            _keep_as(run_dir / BEST, run_dir / best_name(int(kept[1][1])))
        atomic_write(run_dir / BEST, lambda f: torch.save(weights, f))
    else:
        atomic_write(run_dir / best_name(epoch), lambda f: torch.save(weights, f))
    names = {best_name(int(e)) for _, e in kept[1:]}
    for path in run_dir.glob("best-epoch*.pt"):
        if path.name not in names:
            path.unlink(missing_ok=True)


class Writer:
    """Runs checkpoint writes on a background thread, one at a time, in order.

    The thread is not a daemon: an interpreter that exits (an exception, a preemption) still
    finishes the write in flight, so the files on disk are the last checkpoint saved.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Wait for the previous write (raising its error), then start ``write``."""
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as e:  # handed to the main thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def _to_host(tree: Any) -> Any:
    """A copy of ``tree`` whose tensors live in host memory and no longer share storage with
    the model or optimizer (they keep changing while a background write serializes them)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_to_host(v) for v in tree)
    return tree


def save(
    run_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any,
    state: TrainState,
    meters: dict[str, Any],
    loader_state: Any,
    config: dict[str, Any],
    wandb_id: str | None,
    git_sha: str,
    file_list: str | None = None,
    best: bool = False,
    ema: Any = None,
    writer: Writer | None = None,
) -> None:
    """Write ``last.pt`` on rank 0 (every rank must call it); with ``best`` (the epoch just
    finished ranks, :func:`rank_best`) also its weights file: ``best.pt`` when it is the best,
    else ``best-epochNNNN.pt``. With ``writer``, the files are written in the background from
    a host copy of the state (call ``writer.wait()`` before reading them).

    Raises:
        NonFiniteError: a parameter or buffer is NaN/inf (nothing is written).
        DiskFullError: from this write, or with ``writer`` from the previous one.
    """
    bare = unwrap_model(model)
    device = next(bare.parameters()).device
    bad = pgdist.all_reduce_max(torch.tensor(float(bool(nonfinite_tensors(bare))), device=device))
    if bool(bad):
        names = nonfinite_tensors(bare)
        raise NonFiniteError(
            f"non-finite weights or buffers ({', '.join(names[:3]) or 'on another rank'}) at "
            f"step {state.step}; not checkpointing"
        )
    data_states = pgdist.gather_objects(loader_state)
    rng_states = pgdist.gather_objects(capture_rng())  # ranks draw from their own streams
    if not pgdist.is_main():
        return
    fields = {k: v for k, v in asdict(state).items() if k != "started"}
    ckpt = {
        "format": TRAINING_FORMAT,
        "model": bare.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": scheduler.state_dict(),
        **fields,
        "wall_s": state.elapsed_s(),
        "meters": meters,
        "rng": rng_states,
        "data": data_states,
        "world_size": len(rng_states),
        "config": config,
        "wandb_id": wandb_id,
        "git_sha": git_sha,
        "file_list": file_list,
    }

    def write() -> None:
        # last.pt first: it holds this epoch's weights, so the ranking it records is backed by a
        # complete file before any best file changes (see the module docstring).
        atomic_write(run_dir / LAST, lambda f: torch.save(ckpt, f))
        if best:
            # ckpt's copy of the ranking: the state moves on during a background write.
            _write_best(run_dir, _weights_of(ckpt), ckpt["best_epoch"], ckpt["best_checkpoints"])

    if writer is None:
        write()
    else:
        ckpt = _to_host(ckpt)
        writer.submit(write)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True`` (no arbitrary unpickling).

    Raises:
        CheckpointError: the file is empty, truncated or not a torch checkpoint.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # foreign bytes fail anywhere in the unpickler (EOF, Index, Runtime...)
        size = Path(path).stat().st_size if Path(path).exists() else 0
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({size} bytes; empty, truncated or another "
            f"format): {type(e).__name__}"
        ) from None


def check_resumable(ckpt: Any, path: str | os.PathLike) -> None:
    """Raise CheckpointError (one line naming ``path``) unless ``ckpt`` is a training
    checkpoint holding every entry :func:`restore` reads."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a powergrad training checkpoint")
    if ckpt.get("format") == WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{path} holds weights only; resume from the run's {LAST} (a {BEST} is for eval.py "
            "and model.init)"
        )
    if ckpt.get("format") != TRAINING_FORMAT:
        raise CheckpointError(
            f"{path} is not a powergrad training checkpoint (format {ckpt.get('format')!r})"
        )
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} has no {', '.join(map(repr, missing))} entry (an incomplete or edited "
            "checkpoint): it cannot continue the run. Start a new run, or put back a complete "
            f"{LAST}"
        )


def load_for_resume(run_dir: Path) -> dict[str, Any]:
    """``run_dir/last.pt``, checked: a training checkpoint holding all :func:`restore` reads.

    Raises:
        CheckpointError: unreadable, or not a complete training checkpoint (one line).
    """
    path = run_dir / LAST
    ckpt = load(path)
    check_resumable(ckpt, path)
    return ckpt


def agree_best(run_dir: Path, ckpt: dict[str, Any]) -> None:
    """Make the run's best files agree with the ranking ``ckpt`` (its last.pt) records, and
    ``ckpt``'s ranking with the files (every rank calls it; rank 0 repairs the files, see
    :func:`reconcile_best`, and every rank gets the ranking that holds afterwards).

    Raises:
        DiskFullError: a best file could not be rebuilt for lack of space.
    """
    ranking = reconcile_best(run_dir, ckpt) if pgdist.is_main() else None
    ckpt.update(pgdist.broadcast_object(ranking))


def _held_epoch(path: Path) -> int | None:
    """The epoch whose weights ``path`` holds completely, or None (missing, truncated, other)."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # foreign bytes fail anywhere in the unpickler (EOF, Index, Runtime...)
        return None
    if not isinstance(weights, dict) or weights.get("format") != WEIGHTS_FORMAT:
        return None
    return weights.get("epoch")


def reconcile_best(run_dir: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Make ``best.pt`` / ``best-epochNNNN.pt`` hold the epochs ``ckpt`` (last.pt) ranks
    (rank 0, before a resume trains). A ranked epoch whose file is missing or incomplete gets it
    back: linked from another file holding it, or rebuilt from ``last.pt`` when that is the end
    of this very epoch (a kill or a full disk stopped the write after last.pt). An epoch whose
    weights exist nowhere is no longer counted (said on stderr); files the ranking does not name
    are removed.

    Returns:
        ``best_checkpoints``, ``best_epoch`` and ``best_val_top1`` as they hold now.
    """
    ranking = [list(r) for r in ckpt.get("best_checkpoints") or []]
    if not ranking and ckpt.get("best_epoch"):  # older checkpoints: the best alone
        ranking = [[ckpt["best_val_top1"], ckpt["best_epoch"]]]
    # Files that completely hold an epoch's weights; best-epochNNNN.pt only under its own name.
    held: dict[int, Path] = {}
    for path in sorted(run_dir.glob("best-epoch*.pt")):
        epoch = _held_epoch(path)
        if epoch is not None and path.name == best_name(epoch):
            held[epoch] = path
    if (run_dir / BEST).exists() and (epoch := _held_epoch(run_dir / BEST)) is not None:
        held.setdefault(epoch, run_dir / BEST)
    # last.pt written at the end of this epoch holds its weights (an epoch-end save: batch 0).
    rebuildable = ckpt["epoch"] if ckpt["batch"] == 0 else None
    kept = []
    for top1, epoch in ranking:
        if epoch in held or epoch == rebuildable:
            kept.append([top1, epoch])
        else:
            print(
                f"warning: {run_dir}: the weights of epoch {epoch} (val top-1 {top1:.2f}), "
                f"ranked by {LAST}, are missing or incomplete and cannot be rebuilt: that epoch "
                "is no longer counted among the best",
                file=sys.stderr,
            )
    names = [BEST if i == 0 else best_name(int(e)) for i, (_, e) in enumerate(kept)]
    # The lowest-ranked first: best.pt's old bytes get their own name before best.pt changes.
    for name, (_, epoch) in reversed(list(zip(names, kept, strict=True))):
        target = run_dir / name
        if held.get(epoch) == target:
            continue
        if epoch in held:
            _keep_as(held[epoch], target)
        else:
            atomic_write(target, lambda f: torch.save(_weights_of(ckpt), f))
            print(
                f"{target.name}: rebuilt from {LAST} (epoch {epoch}; its write was interrupted)",
                file=sys.stderr,
            )
        held = {e: p for e, p in held.items() if p != target} | {epoch: target}
    for path in run_dir.glob("best-epoch*.pt"):
        if path.name not in names:
            path.unlink(missing_ok=True)
    best_val_top1, best_epoch = kept[0] if kept else (float("-inf"), 0)
    return {"best_checkpoints": kept, "best_epoch": int(best_epoch), "best_val_top1": best_val_top1}


def restore(
    ckpt: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any,
    meter: Any,
    loader: Any,
    ema: Any = None,
    accum_steps: int = 1,
) -> TrainState:
    """Load a ``last.pt`` dict into the run's objects; returns the state to continue from.

    ``meter`` gets the unfinished epoch's sums on rank 0 (other ranks start theirs at zero);
    ``loader`` its position when the world size is unchanged (else its epoch restarts);
    ``ema`` (timm's ModelEmaV3) its weights, or the restored model's when the checkpoint has none
    (EMA turned on at a resume starts from the current weights). A mid-epoch checkpoint is
    refused under another ``accum_steps`` (CheckpointError).
    """
    check_resumable(ckpt, "this checkpoint")
    saved_accum = ((ckpt.get("config") or {}).get("trainer") or {}).get("accum_steps", 1)
    if ckpt["batch"] and saved_accum != accum_steps:
        # batch counts loader batches of global / (world size x accum_steps) images: another
        # accum_steps would continue from another image of the epoch.
        raise CheckpointError(
            f"{LAST} was written mid-epoch with trainer.accum_steps={saved_accum}; resume with "
            f"trainer.accum_steps={saved_accum} (it may change at an epoch end)"
        )
    rank = pgdist.rank()
    # The optimizer's momentum buffers come from the checkpoint, its hyper-parameters from the
    # config (the same unless a resume changed them on purpose); the schedule is a function of
    # the step count alone, so it follows the config's plan too.
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        unwrap_model(model).load_state_dict(ckpt["model"])
        if ema is not None:
            ema.module.load_state_dict(ckpt.get("ema") or ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # torch's multi-line mismatch reports
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{LAST} holds another model than this run builds ({first[:200]}); a run continues "
            "with its own model and classes: start a new run (model.init=PATH takes its weights)"
        ) from None
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
    scaler.load_state_dict(ckpt["scaler"])
    scheduler.step_update(num_updates=ckpt["step"])
    if rank == 0:
        meter.load_state_dict(ckpt["meters"])
    if ckpt["world_size"] == pgdist.world_size():
        loader.load_state_dict(ckpt["data"][rank])
    rng = ckpt["rng"]
    if isinstance(rng, list):  # one state per rank (older checkpoints: rank 0's dict)
        rng = rng[rank] if rank < len(rng) else rng[0]
    restore_rng(rng)
    saved = {k: ckpt[k] for k in TrainState.__dataclass_fields__ if k in ckpt and k != "started"}
    saved["history"] = list(saved.get("history", []))
    if saved.get("best_epoch") and not saved.get("best_checkpoints"):  # older checkpoints
        saved["best_checkpoints"] = [[saved["best_val_top1"], saved["best_epoch"]]]
    return TrainState(**saved)


def init_weights(model: nn.Module, path: str | os.PathLike) -> bool:
    """Start training from the weights in ``path`` (fine-tuning): our last.pt / best.pt
    (``model`` key), a timm checkpoint (``state_dict``) or a raw / safetensors state dict, read
    by timm's ``load_state_dict`` with ``weights_only``. When the classifier's class count
    differs, the model keeps its own freshly initialised classifier (head reset); every other
    key and shape must match (:func:`powergrad.models.load_state_dict_strict`).

    Returns:
        True when the head was reset.

    Raises:
        CheckpointError: unreadable file, or an architecture mismatch (named).
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as e:  # foreign bytes fail anywhere in the unpickler (EOF, Index, Runtime...)
        raise CheckpointError(f"model.init={path}: not a readable checkpoint ({e})") from None
    bare = unwrap_model(model)
    head = bare.default_cfg.get("classifier", "fc")
    own = bare.state_dict()
    keys = [k for k in own if k.startswith(f"{head}.")]
    reset = any(k in state and state[k].shape != own[k].shape for k in keys)
    if reset:
        state.update({k: own[k] for k in keys})
    try:
        load_state_dict_strict(bare, state, source=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return reset


def configure_runtime(threads: int | None, deterministic: bool) -> None:
    """CPU intra-op threads (None: torch's default) and the determinism switches.

    ``deterministic``: torch.use_deterministic_algorithms (no warn_only: every op of our
    training step has a deterministic CUDA kernel; timm's global average pool with a 1x1 output
    is ATen's mean over H, W on every device, whose backward is deterministic, not
    adaptive_avg_pool2d's kernel; tests/test_deterministic.py), no cuDNN autotuning, and
    cuBLAS's deterministic workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set), without
    which the first CUDA matmul raises. Call it before the first CUDA matmul (train.py: right
    after the process group is set up; cuBLAS reads the variable when it creates its handle).
    """
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; ranks > 0 get streams of their own derived from ``seed``
    (rank 0 keeps ``seed``'s, so one process is unchanged by the rank count)."""
    if rank:
        seed = derive_seed(seed, rank, STREAM_RANK)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
