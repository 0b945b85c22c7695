"""The run directory: one run per directory, claimed before anything is written, resumed in place.

A run directory belongs to the process holding the exclusive ``flock`` on its ``.lock`` file for
the run's whole life (the kernel drops it when the process dies, even on SIGKILL), so two starts
into the same directory can never interleave their writes. Whether a start is a new run or a
continuation is decided once, under that lock, from what the directory holds:

| directory holds                    | plain start        | resume / auto_resume / preempted |
|------------------------------------|--------------------|----------------------------------|
| nothing (or only Hydra's log)      | new run            | new run (nothing to lose)        |
| config.yaml, no history, no last.pt| refused            | new run in place (died early)    |
| history (metrics, best, summary)   | refused            | continue from last.pt, or refused|
|                                    |                    | when last.pt is gone             |

A resume continues the run as it was configured: its own config.yaml, with only the overrides
given now applied; overrides that change the experiment are refused unless
``trainer.allow_changes=true`` (:func:`resume_config`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from powergrad.checkpoint import BEST, LAST
from powergrad.config import ConfigError, flat, with_saved_values
from powergrad.fileio import remove_stale_temps
from powergrad.preemption import MARKER
from powergrad.tracking import METRICS_FILE, SUMMARY_FILE

__all__ = [
    "CONFIG_FILE",
    "Claim",
    "claim",
    "discard_if_empty",
    "experiment_changes",
    "resume_config",
    "write_provenance",
]

# The resolved config of the run's first start; a resume continues from it.
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# Files whose presence means the run has trained (and a fresh start would destroy them).
HISTORY_FILES = (METRICS_FILE, SUMMARY_FILE, BEST)
# What Hydra itself writes into a run directory before train.py runs: its job log.
_HYDRA_LOG = "train.log"

# Settings that define the experiment: changing one mid-run gives a different experiment than
# the one its first epochs belong to. Everything else (where data lives, loader workers,
# threads, logging, compile, progress bars) may change between starts.
EXPERIMENT_KEYS = (
    "model.",
    "method.",
    "optim.",
    "sched.",
    "data.",
    "seed",
    "trainer.epochs",
    "trainer.batch_size",
    "trainer.accum_steps",  # BN statistics follow the micro-batch
    "trainer.mixup_alpha",
    "trainer.cutmix_alpha",
    "trainer.ema_decay",
    "trainer.warmup_epochs",
    "trainer.precision",
)
FREE_KEYS = ("data.root",)


@dataclass
class Claim:
    """Rank 0's hold on a run directory; ``resume`` says whether to continue from last.pt."""

    path: Path
    resume: bool
    fd: int | None = None

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process exits)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _lock(path: Path) -> int:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"{path} is in use by another running process; one run per directory "
            "(wait for it, or pick another hydra.run.dir)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        # The lock file may predate a chmod / chattr / read-only mount: probe a real write.
        probe, name = tempfile.mkstemp(dir=path, prefix=".write-probe.")
        os.close(probe)
        os.unlink(name)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"cannot write the run directory {path}: {e.strerror}") from None
    return fd


def claim(path: Path, *, resume: bool, auto_resume: bool) -> Claim:
    """Lock ``path`` for this run and decide whether it starts fresh or continues (rank 0).

    Args:
        path: the run directory.
        resume: ``trainer.resume`` names this directory.
        auto_resume: ``trainer.auto_resume``: continue when it holds a checkpoint.

    Raises:
        ConfigError: the directory is locked by another process, holds another run, or holds
            a run's history without the last.pt needed to continue it.
    """
    fd = _lock(path)
    try:
        for stale in remove_stale_temps(path):
            print(f"removed {stale.name}, left by a write that was killed", flush=True)
        has_last = (path / LAST).exists()
        history = [f for f in HISTORY_FILES if (path / f).exists()]
        started = (path / CONFIG_FILE).exists() or has_last or bool(history)
        continuing = resume or (path / MARKER).exists() or (auto_resume and started)
        if resume and not (path / CONFIG_FILE).exists():
            raise ConfigError(
                f"trainer.resume={path}: no {CONFIG_FILE} there; not a powergrad run directory"
            )
        if not started:
            return Claim(path, resume=False, fd=fd)
        if not continuing:
            raise ConfigError(f"{path} already holds a run; trainer.resume={path} continues it")
        if has_last:
            return Claim(path, resume=True, fd=fd)
        if history:
            raise ConfigError(
                f"{path} holds a run's history ({', '.join(history)}) but no {LAST} to continue "
                f"from; starting over would overwrite them. Put {LAST} back, or start a new run"
            )
        print(f"{path}: the run stopped before its first checkpoint; starting it again there")
        return Claim(path, resume=False, fd=fd)
    except BaseException:
        os.close(fd)
        raise


def discard_if_empty(path: Path) -> None:
    """Remove a run directory that a refused start created and left empty (Hydra's empty log
    and an unheld lock file at most), and its date folder when that is empty too."""
    try:
        entries = list(path.iterdir())
    except OSError:
        return
    if any(
        e.name not in (_HYDRA_LOG, LOCK_FILE) or (e.name == _HYDRA_LOG and e.stat().st_size)
        for e in entries
    ):
        return
    if (path / LOCK_FILE).exists():
        try:
            fd = _lock(path)  # held by a run that just claimed it: not ours to remove
        except ConfigError:
            return
        os.close(fd)
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty


def write_provenance(path: Path, cfg: DictConfig, *, resume: bool) -> None:
    """After the claim: the run's config.yaml (first start) and Hydra's record of this start
    (``.hydra/`` first, ``.hydra-resume-<time>/`` for each continuation), never overwritten."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if not resume:
        OmegaConf.save(cfg, path / CONFIG_FILE, resolve=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder = path / (f".hydra-resume-{stamp}_{os.getpid()}" if resume else ".hydra")
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), folder / "overrides.yaml")


def experiment_changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for the experiment-defining keys that differ between two flat
    (dotted-key) configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or key in FREE_KEYS:
            continue
        if any(key == k or key.startswith(k) for k in EXPERIMENT_KEYS):
            out.append(f"{key}: {a.get(key)} -> {b.get(key)}")
    return out


def resume_config(
    cfg: DictConfig, saved: DictConfig, overrides: list[str], *, allow_changes: bool
) -> tuple[DictConfig, list[str]]:
    """The config to continue a run with: ``saved`` (the run's config.yaml) plus the keys this
    command line set (``overrides``), taken from ``cfg`` (the command line's composition).

    Returns:
        The merged config and its experiment changes (``key: old -> new``).

    Raises:
        ConfigError: an override changes the experiment and ``allow_changes`` is false.
    """
    result = with_saved_values(cfg, saved, overrides)
    result.trainer.resume = cfg.trainer.resume
    merged = flat(OmegaConf.to_container(result, resolve=True))
    old = flat(OmegaConf.to_container(saved, resolve=True))
    changes = experiment_changes({k: v for k, v in old.items() if k in merged}, merged)
    if changes and not allow_changes:
        hint = ""
        if any(c.startswith("trainer.epochs") for c in changes):
            hint = (
                " trainer.epochs re-plans the lr schedule (a finished cosine run would train "
                "its extra epochs at lr 0 under the old plan);"
            )
        raise ConfigError(
            "this resume would change the experiment mid-run: "
            + "; ".join(changes)
            + "."
            + hint
            + " Continue with the run's own settings (drop those overrides), start a new run,"
            " or pass trainer.allow_changes=true to apply them (recorded in metrics.jsonl and"
            " the wandb run)"
        )
    return result, changes
