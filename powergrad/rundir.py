"""The run directory: one run per directory, claimed before anything is written, resumed in place.

A run directory belongs to the process holding the exclusive ``flock`` on its ``.lock`` file for
the run's whole life (the kernel drops it when the process dies, even on SIGKILL), so two starts
into the same directory can never interleave their writes. Whether a start is a new run or a
continuation is decided once, under that lock, from what the directory holds:

| directory holds                         | plain start   | resume / auto_resume / preempted |
|-----------------------------------------|---------------|----------------------------------|
| nothing (or only Hydra's log)           | new run       | new run (nothing to lose)        |
| files of something else, no run         | refused       | refused (nothing touched)        |
| a run without weights (config.yaml,     | refused       | new run in place: it died before |
| metrics.jsonl, no last.pt / best files) |               | its first checkpoint             |
| last.pt                                 | refused       | continue from last.pt            |
| best files or summary.json, no last.pt  | refused       | refused (they would be lost)     |

Epoch records in metrics.jsonl beyond last.pt are provisional (a resume rewrites the file from
last.pt's history), so a run that died before its first checkpoint has nothing to lose.

A resume continues the run as it was configured: the config stored in last.pt (config.yaml is
its readable copy: a missing or differing one is reported and rewritten, never obeyed), with
only the overrides given now applied; overrides that change the experiment are refused unless
``trainer.allow_changes=true`` (:func:`resume_config`). A fresh start that fails before its
first checkpoint removes what it wrote (:func:`abandon`), so the next start is not refused.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import fnmatch
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from powergrad.checkpoint import BEST, LAST
from powergrad.config import ConfigError, flat, with_saved_values
from powergrad.data.badfiles import BAD_FILE_LOG_NAME
from powergrad.fileio import TEMP_SUFFIX, atomic_write, remove_stale_temps
from powergrad.preemption import MARKER
from powergrad.tracking import FILTER_NORMS_FILE, METRICS_FILE, SUMMARY_FILE

__all__ = [
    "CONFIG_FILE",
    "Claim",
    "abandon",
    "claim",
    "discard_if_empty",
    "discard_sweep_if_empty",
    "experiment_changes",
    "read_config",
    "release",
    "report_config_copy",
    "resume_config",
    "resume_note",
    "write_provenance",
]

# A readable copy of the run's config (the one stored in last.pt), rewritten at every start.
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# What Hydra itself writes into a run directory before train.py runs: its job log.
_HYDRA_LOG = "train.log"
# Everything a run (train.py, Hydra's log, wandb, eval.py) puts into its directory, as names or
# globs; any other entry belongs to someone else.
RUN_ENTRIES = (
    CONFIG_FILE,
    LOCK_FILE,
    _HYDRA_LOG,
    METRICS_FILE,
    SUMMARY_FILE,
    FILTER_NORMS_FILE,
    BAD_FILE_LOG_NAME,
    MARKER,
    LAST,
    BEST,
    "best-epoch*.pt",
    "eval_*.json",
    "wandb",
    ".hydra",
    ".hydra-resume-*",
    ".write-probe.*",
)
# Files written atomically (their temporary files are removed when a kill left them).
_ATOMIC = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, FILTER_NORMS_FILE, MARKER, LAST, BEST)
_WEIGHTS = (BEST, "best-epoch*.pt")
# Present once a run has started (after the claim): a plain start into it is refused.
_RUN_MARKS = (CONFIG_FILE, METRICS_FILE, MARKER, SUMMARY_FILE, LAST, *_WEIGHTS)
# What a fresh start would destroy: trained weights, a finished run's summary.
_VALUABLE = (SUMMARY_FILE, LAST, *_WEIGHTS)
# Settings of how a start runs, not of the run: a config.yaml that differs only there is no news.
_START_KEYS = ("trainer.resume", "trainer.auto_resume", "trainer.allow_changes")

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


def _present(path: Path, names: tuple[str, ...]) -> list[str]:
    """The entries of ``path`` matching ``names`` (names or globs), sorted."""
    try:
        entries = os.listdir(path)
    except OSError:
        return []
    return sorted(e for e in entries if any(fnmatch.fnmatchcase(e, n) for n in names))


def _ours(name: str) -> bool:
    """Whether a run puts an entry of this name into its directory (temporary files included)."""
    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
        name = name[1:].rsplit(".", 2)[0]  # .NAME.<random>.tmp (fileio.temp_pattern)
    return any(fnmatch.fnmatchcase(name, n) for n in RUN_ENTRIES)


def _foreign(path: Path) -> list[str]:
    try:
        return sorted(e for e in os.listdir(path) if not _ours(e))
    except OSError:
        return []


# Claims this process holds, by directory: abandon() needs to know what a start claimed.
_HELD: dict[Path, Claim] = {}


def claim(path: Path, *, resume: bool, auto_resume: bool) -> Claim:
    """Lock ``path`` for this run and decide whether it starts fresh or continues (rank 0).

    Args:
        path: the run directory.
        resume: ``trainer.resume`` names this directory.
        auto_resume: ``trainer.auto_resume``: continue when it holds a checkpoint.

    Raises:
        ConfigError: the directory is locked by another process, holds another run or files
            that are not a run's, or holds weights or a summary without the last.pt needed to
            continue the run.
    """
    foreign = _foreign(path)
    if foreign and not _present(path, _RUN_MARKS):
        # Someone else's folder: refused before anything (even the lock file) is written.
        shown = ", ".join(foreign[:4]) + (
            f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        )
        raise ConfigError(
            f"{path} is not a powergrad run directory and holds other files ({shown}); a run "
            "needs a new or empty folder: pick another hydra.run.dir (nothing was changed there)"
        )
    fd = _lock(path)
    try:
        for stale in remove_stale_temps(path, (*_ATOMIC, *_WEIGHTS)):
            print(f"removed {stale.name}, left by a write that was killed", flush=True)
        has_last = (path / LAST).exists()
        started = bool(_present(path, _RUN_MARKS))
        continuing = resume or (path / MARKER).exists() or (auto_resume and started)
        if resume and not ((path / CONFIG_FILE).exists() or has_last):
            raise ConfigError(
                f"trainer.resume={path}: no {CONFIG_FILE} or {LAST} there; not a powergrad run "
                "directory"
            )
        if not started:
            return _hold(Claim(path, resume=False, fd=fd))
        if not continuing:
            raise ConfigError(f"{path} already holds a run; trainer.resume={path} continues it")
        if has_last:
            return _hold(Claim(path, resume=True, fd=fd))
        if valuable := _present(path, _VALUABLE):
            raise ConfigError(
                f"{path} holds a run's results ({', '.join(valuable)}) but no {LAST} to continue "
                f"from; starting over would overwrite them. Put {LAST} back, or start a new run"
            )
        # No weights anywhere: the run died before its first checkpoint. Its epoch records
        # (beyond any checkpoint, so provisional) and a marker without last.pt go with it.
        (path / MARKER).unlink(missing_ok=True)
        print(
            f"{path}: the run stopped before its first checkpoint; starting it again there",
            file=sys.stderr,
        )
        return _hold(Claim(path, resume=False, fd=fd))
    except BaseException:
        os.close(fd)
        raise


def _hold(held: Claim) -> Claim:
    _HELD[held.path] = held
    return held


def release(path: Path) -> None:
    """Drop this process's claim on ``path`` (a start refused after the claim), if it has one."""
    held = _HELD.pop(path, None)
    if held is not None:
        held.release()


def abandon(path: Path) -> None:
    """Undo a fresh start in ``path`` that failed before its first checkpoint (rank 0): remove
    what runs write there (its config.yaml, .hydra, metrics, wandb files, Hydra's log, the
    lock) and the folder when nothing else is in it, so the next start is not refused. Anything
    else, and a continued run's directory, is left as it is."""
    held = _HELD.pop(path, None)
    if held is None:
        return
    if held.resume or _present(path, _VALUABLE) or not path.is_dir():
        held.release()
        return
    for name in sorted(os.listdir(path)):
        if name != LOCK_FILE and _ours(name):
            entry = path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    (path / LOCK_FILE).unlink(missing_ok=True)
    held.release()
    _remove_if_empty(path)


def discard_if_empty(path: Path) -> None:
    """After a refused start: remove what Hydra made for it (an empty log, the folder when
    nothing else is in it, and its date folder when that is empty too), never a run's files."""
    if _present(path, _RUN_MARKS):
        return
    if (path / LOCK_FILE).exists():
        try:
            fd = _lock(path)  # held by a run that just claimed it: not ours to remove
        except ConfigError:
            return
        os.close(fd)
    log = path / _HYDRA_LOG
    with contextlib.suppress(OSError):
        if log.is_file() and not log.stat().st_size:
            log.unlink()
    if _foreign(path):
        return
    (path / LOCK_FILE).unlink(missing_ok=True)
    _remove_if_empty(path)


def discard_sweep_if_empty(sweep_dir: Path) -> None:
    """After a refused multirun: remove the sweep folder Hydra made when it holds nothing but
    its multirun.yaml (and its date folder when that is empty too)."""
    try:
        entries = os.listdir(sweep_dir)
    except OSError:
        return
    if set(entries) <= {"multirun.yaml"}:
        (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
        _remove_if_empty(sweep_dir)


def _remove_if_empty(path: Path) -> None:
    """Remove ``path`` when it is empty, and then its parent when that is an empty date folder
    of outputs/DATE/TIME (config.default_run_dir); a folder holding anything stays."""
    with contextlib.suppress(OSError):
        path.rmdir()
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", path.parent.name):
            path.parent.rmdir()


def write_provenance(path: Path, cfg: DictConfig, *, resume: bool) -> None:
    """Once the start is under way: the run's config.yaml (this start's config, which its
    checkpoints store) and Hydra's record of this start (``.hydra/`` first,
    ``.hydra-resume-<time>/`` for each continuation), never overwritten."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    atomic_write(path / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder = path / (f".hydra-resume-{stamp}_{os.getpid()}" if resume else ".hydra")
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), folder / "overrides.yaml")


def read_config(path: Path) -> DictConfig:
    """The config.yaml of a run that has no last.pt (it died before its first checkpoint).

    Raises:
        ConfigError: it is missing or not readable.
    """
    try:
        return OmegaConf.load(path / CONFIG_FILE)
    except Exception as e:  # yaml's and OmegaConf's errors have no common base
        raise ConfigError(
            f"{path / CONFIG_FILE} is not readable ({type(e).__name__}) and the run has no "
            f"{LAST}: start a new run"
        ) from None


def report_config_copy(path: Path, stored: dict[str, Any]) -> None:
    """Say on stderr when ``path/config.yaml`` is missing, unreadable or differs from
    ``stored`` (the config in last.pt, which the run continues with; write_provenance then
    rewrites the copy)."""
    file = path / CONFIG_FILE
    why = None
    if not file.exists():
        why = f"{file} is missing"
    else:
        try:
            copy = flat(OmegaConf.to_container(OmegaConf.load(file), resolve=True))
        except Exception as e:  # yaml's and OmegaConf's errors have no common base
            why = f"{file} is not readable ({type(e).__name__})"
        else:
            own = flat(stored)
            diffs = [
                f"{k}: {copy.get(k)} in {CONFIG_FILE}, {own.get(k)} in {LAST}"
                for k in sorted(set(copy) | set(own))
                if copy.get(k) != own.get(k) and k not in _START_KEYS
            ]
            if diffs:
                more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
                why = f"{file} differs from the config stored in {LAST} ({'; '.join(diffs[:6])}{more})"
    if why:
        print(
            f"warning: {why}; the run continues with the config stored in {LAST} ({CONFIG_FILE} "
            "is only its copy; change settings on the command line)",
            file=sys.stderr,
        )


def resume_note(path: Path, ckpt: dict[str, Any], epochs: int) -> str:
    """What a continuation says: where it resumes, or that the run is already finished."""
    if ckpt["epoch"] >= epochs:
        return (
            f"{path} is finished ({ckpt['epoch']} of {epochs} epochs): nothing to train, its "
            f"summary is written again. To train it longer: python train.py trainer.resume={path} "
            "trainer.epochs=N trainer.allow_changes=true (the lr schedule is re-planned)"
        )
    return (
        f"resuming {path} from its last checkpoint (epoch {ckpt['epoch'] + 1} of {epochs}, "
        f"optimizer step {ckpt['step']})"
    )


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
    """The config to continue a run with: ``saved`` (the config stored in last.pt, or the
    config.yaml of a run that died before it) plus the keys this command line set
    (``overrides``), taken from ``cfg`` (the command line's composition).

    Returns:
        The merged config and its experiment changes (``key: old -> new``).

    Raises:
        ConfigError: an override changes the experiment and ``allow_changes`` is false.
    """
    result = with_saved_values(cfg, saved, overrides)
    result.trainer.resume = cfg.trainer.resume
    merged = flat(OmegaConf.to_container(result, resolve=True))
    old = flat(OmegaConf.to_container(saved, resolve=True) if OmegaConf.is_config(saved) else saved)
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
