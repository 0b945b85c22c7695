"""Run records: metrics.jsonl + summary.json in the run directory, and wandb on rank 0.

Files are the ground truth (always written, on rank 0); wandb mirrors them. wandb goes offline
by itself when no credentials are configured (WANDB_API_KEY or a ~/.netrc entry for the wandb
host), printing one line; online asked for explicitly (logger.mode=online, WANDB_MODE=online)
without credentials is refused at start (:func:`wandb_mode`). wandb.init waits at most
logger.init_timeout_s for the server, then the run logs offline with a warning (a node with
credentials but no route to the server). A resumed run reuses the run id stored in its
checkpoint, so an online run continues as the same wandb run.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import netrc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from powergrad.fileio import atomic_write
from powergrad.method import method_label

__all__ = [
    "METRICS_FILE",
    "SUMMARY_FILE",
    "Progress",
    "Tracker",
    "config_key",
    "git_sha",
    "have_wandb_credentials",
    "run_name",
    "strict_json",
    "wandb_mode",
    "write_json_atomic",
]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FILTER_NORMS_FILE = "filter_norms.jsonl"
_WANDB_HOST = "https://api.wandb.ai"
# Values wandb itself accepts for $WANDB_MODE (wandb.Settings.mode); anything else makes
# wandb.init fail with a validation traceback.
_WANDB_ENV_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
# wandb.init's wait for the server when the logger config does not set it (wandb's own default).
WANDB_INIT_TIMEOUT_S = 90.0
# Step and epoch lines go through this logger: Hydra's job logging writes them to RUN_DIR/train.log
# (and stdout).
log = logging.getLogger("powergrad")


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    """The commit of the code being run (with ``-dirty`` if modified), or ``unknown``."""
    where = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def have_wandb_credentials() -> bool:
    """True when wandb can authenticate without prompting: $WANDB_API_KEY or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", _WANDB_HOST)).hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str) -> str:
    """The mode wandb runs in for ``logger.mode``: ``auto`` takes $WANDB_MODE, else online with
    credentials and offline without; other values are taken as they are.

    Raises ConfigError (one line, before any work) for online asked for explicitly, by
    ``logger.mode=online`` or ``WANDB_MODE=online``, without credentials: wandb itself refuses
    that without a terminal, after the run has started; and for a $WANDB_MODE wandb does not
    accept. (``auto`` never needs credentials: it falls back to offline.)
    """
    from powergrad.config import ConfigError

    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in _WANDB_ENV_MODES:
        raise ConfigError(f"WANDB_MODE={env!r}: wandb accepts {', '.join(_WANDB_ENV_MODES)}")
    resolved = mode
    if mode == "auto":
        resolved = env or ("online" if have_wandb_credentials() else "offline")
    if resolved == "online" and not have_wandb_credentials():
        source = "logger.mode=online" if mode == "online" else "WANDB_MODE=online"
        raise ConfigError(
            f"{source} but no wandb credentials (WANDB_API_KEY or a ~/.netrc entry): run "
            "`wandb login` first, or log offline (logger.mode=offline) and `wandb sync` later"
        )
    return resolved


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN / inf -> None, so the files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def strict_json(obj: Any, indent: int | None = 2) -> str:
    """JSON that any parser reads: NaN / inf as null, tensors and numpy scalars as numbers."""
    return json.dumps(_clean(obj), indent=indent, default=_json_default, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, lines: bool = False) -> None:
    """Write strict JSON (or JSON lines when ``lines``: ``obj`` is a list) atomically."""
    if lines:
        text = "".join(strict_json(r, indent=None) + "\n" for r in obj)
    else:
        text = strict_json(obj) + "\n"
    atomic_write(path, text)


class Progress:
    """What a person or a cluster's log reads while the run goes (rank 0; no-op elsewhere).

    On a terminal (``bar``): a tqdm bar on stderr, epoch results in its postfix. Otherwise
    (stderr not a terminal, or trainer.progress=false): no carriage-return stream, but one
    line per :meth:`log_step` call (epoch, step, loss, lr, images/s, ETA) through the
    ``powergrad`` logger. Epoch lines go to the logger in both cases (the bar keeps its place:
    console handlers write through tqdm while it is shown).
    """

    def __init__(
        self,
        *,
        total: int,
        done: int,
        epochs: int,
        images_per_step: int,
        bar: bool,
        desc: str,
        enabled: bool = True,
    ) -> None:
        self.enabled, self.total, self.epochs = enabled, total, epochs
        self.images_per_step = images_per_step
        self.start_step, self.start = done, time.perf_counter()
        self.last_step, self.last = done, self.start
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if enabled and bar:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, desc=desc)
            self._redirect.enter_context(logging_redirect_tqdm([logging.getLogger()]))

    def update(self) -> None:
        """One optimizer step done."""
        if self.bar is not None:
            self.bar.update(1)

    def log_step(self, epoch: int, step: int, loss: float, lr: float) -> None:
        """One line at a log point (without a bar): throughput since the last line, ETA from
        this start's average step rate."""
        if not self.enabled or self.bar is not None:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) * self.images_per_step / max(now - self.last, 1e-9)
        per_step = (now - self.start) / max(step - self.start_step, 1)
        eta = datetime.timedelta(seconds=round(per_step * (self.total - step)))
        self.last_step, self.last = step, now
        log.info(
            "epoch %d/%d step %d/%d loss %.4f lr %.4g images/s %.1f ETA %s",
            epoch + 1,
            self.epochs,
            step,
            self.total,
            loss,
            lr,
            rate,
            eta,
        )

    def log_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's results: a log line, and the bar's postfix."""
        if not self.enabled:
            return
        shown = {"loss": f"{record['train_loss']:.3f}", "train": f"{record['train_top1']:.1f}"}
        if record.get("val_top1") is not None:
            shown["val"] = f"{record['val_top1']:.1f}"
        log.info(
            "epoch %d/%d done: step %d %s",
            record["epoch"],
            self.epochs,
            record["step"],
            " ".join(f"{k} {v}" for k, v in shown.items()),
        )
        if self.bar is not None:
            self.bar.set_postfix(shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()


class Tracker:
    """Writes the run's records; everything is a no-op on ranks other than 0.

    Args:
        run_dir: the run directory (rank 0's).
        config: the resolved config as a plain dict (logged to wandb as is).
        logger: the ``cfg.logger`` node (name, project, entity, mode, group, job_type, tags).
        tags: extra tags (model, method, alpha, sched).
        group: wandb group when ``logger.group`` is null (experiment or sweep name).
        job_type: wandb job type when ``logger.job_type`` is null (train.py: the
            configuration key, :func:`config_key`, so the seeds of one configuration share it
            however they were launched: -m, torchrun, separate sbatch jobs).
        run_id: wandb run id of the run being resumed, or None for a new run.
        enabled: False on ranks other than 0.
        git_sha: the code's commit, added to the wandb config as ``git_sha``.
        name: the wandb run's display name (:func:`run_name`); None: the run directory's name.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict[str, Any],
        logger: Any,
        *,
        tags: list[str] = (),
        group: str | None = None,
        job_type: str | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        git_sha: str | None = None,
        name: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.wandb_run = None
        self.run_id = run_id
        if not enabled or logger.name != "wandb" or logger.mode == "disabled":
            return
        import wandb

        mode = wandb_mode(logger.mode)
        if logger.mode == "auto" and mode == "offline" and not os.environ.get("WANDB_MODE"):
            print(
                "wandb: no credentials (WANDB_API_KEY or ~/.netrc), logging offline to "
                f"{self.run_dir / 'wandb'}; upload later with `wandb sync`"
            )
        init = dict(
            project=logger.project,
            entity=logger.entity,
            dir=str(self.run_dir),
            config={**config, "git_sha": git_sha} if git_sha else config,
            tags=sorted({*tags, *logger.tags}),
            group=logger.group or group,
            job_type=logger.job_type or job_type or "train",
            id=run_id,
            resume="allow" if run_id else None,
            name=name or self.run_dir.name,
        )
        # Bounded: the other ranks go on to their first collective meanwhile, which waits far
        # longer (trainer.dist_timeout_min) than this.
        timeout_s = logger.get("init_timeout_s") or WANDB_INIT_TIMEOUT_S
        try:
            self.wandb_run = wandb.init(
                **init, mode=mode, settings=wandb.Settings(init_timeout=timeout_s)
            )
        except wandb.errors.CommError as e:  # no route to the server, timeout, server error
            if mode == "offline":
                raise
            self.wandb_run, mode = wandb.init(**init, mode="offline"), "offline"
            print(
                f"warning: wandb could not start an online run within {timeout_s:g} s "
                f"({str(e).splitlines()[0]}); logging offline instead, upload later with "
                f"`wandb sync {Path(self.wandb_run.dir).parent}`",
                file=sys.stderr,
            )
        self.run_id = self.wandb_run.id
        # wandb-osh protocol (compute nodes without internet): after each epoch, a
        # <hash>.command file holding the offline run's directory tells `wandb-osh
        # --command-dir SYNC_DIR` on a login node to `wandb sync` it.
        self._sync_dir = None
        if logger.get("sync_dir") and mode == "offline":
            self._sync_dir = Path(str(logger.sync_dir)).expanduser()
            self._sync_dir.mkdir(parents=True, exist_ok=True)
        self._wandb_dir = Path(self.wandb_run.dir).parent.resolve()  # offline-run-*/files/..
        # Epoch records are plotted against the epoch, step records against the optimizer step.
        self.wandb_run.define_metric("epoch")
        self.wandb_run.define_metric("trainer/step")
        for prefix in ("train", "val", "perf", "best"):
            self.wandb_run.define_metric(f"{prefix}/*", step_metric="epoch")
        self.wandb_run.define_metric("step/*", step_metric="trainer/step")
        # The run table shows the best val top-1 while the run goes (the history keeps each
        # epoch's); best/val_top1 and best/epoch are logged with every epoch record too.
        self.wandb_run.define_metric("val/top1", step_metric="epoch", summary="max,last")

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Per-step values (wandb only), keyed ``step/<name>``."""
        if self.wandb_run is not None:
            self.wandb_run.log(
                {"trainer/step": step, **{f"step/{k}": v for k, v in values.items()}}
            )

    def record_changes(self, step: int, changes: list[str]) -> None:
        """A resume that changed the experiment (trainer.allow_changes): wandb config and
        summary get the list, keyed by the step they apply from (metrics.jsonl gets it with the
        next epoch record)."""
        if self.wandb_run is not None:
            self.wandb_run.config.update(
                {f"changes_at_step_{step}": changes}, allow_val_change=True
            )
            self.wandb_run.summary["config_changes"] = changes

    def write_history(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from the epoch records (after a resume it must match them)."""
        if self.enabled:
            write_json_atomic(self.run_dir / METRICS_FILE, history, lines=True)

    def log_epoch(self, history: list[dict[str, Any]]) -> None:
        """Append the last epoch record: metrics.jsonl on disk, and wandb."""
        if not self.enabled:
            return
        self.write_history(history)
        if self.wandb_run is not None:
            self.wandb_run.log({**wandb_epoch_keys(history[-1]), **best_so_far(history)})
            self._trigger_sync()

    def _trigger_sync(self) -> None:
        if self._sync_dir is not None:
            path = self._wandb_dir.as_posix()
            name = hashlib.sha256(path.encode()).hexdigest()[:16]
            # Atomic: the syncer never reads a half-written path.
            atomic_write(self._sync_dir / f"{name}.command", path)

    def truncate_filter_norms(self, step: int) -> None:
        """Drop filter-norm records after optimizer step ``step`` (a resume replays them)."""
        path = self.run_dir / FILTER_NORMS_FILE
        if self.enabled and path.exists():
            kept = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            write_json_atomic(path, [r for r in kept if r["step"] <= step], lines=True)

    def log_filter_norms(self, record: dict[str, Any]) -> None:
        """Append one per-filter norm snapshot to filter_norms.jsonl (rank 0)."""
        if self.enabled:
            with open(self.run_dir / FILTER_NORMS_FILE, "a") as f:
                f.write(json.dumps(_clean(record)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json and copy it into the wandb run summary."""
        if not self.enabled:
            return
        write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        if self.wandb_run is not None:
            for key, value in wandb_summary_keys(_clean(summary)).items():
                self.wandb_run.summary[key] = value

    def log_checkpoint(self, path: Path, kind: str, metadata: dict[str, Any]) -> None:
        """Upload ``path`` as a wandb Artifact of type ``model`` named ``model-<run id>``,
        aliased ``kind`` (best | last); offline runs keep it for ``wandb sync``."""
        if self.wandb_run is None:
            return
        if not path.exists():  # best.pt: no evaluation improved on -inf (NaN val top-1)
            log.warning("logger.log_checkpoints=%s: %s does not exist; not uploaded", kind, path)
            return
        import wandb

        artifact = wandb.Artifact(
            f"model-{self.wandb_run.id}", type="model", metadata=_clean(metadata)
        )
        artifact.add_file(str(path), name=path.name)
        self.wandb_run.log_artifact(artifact, aliases=[kind, "latest"])

    def finish(self, exit_code: int = 0, *, preempted: bool = False) -> None:
        """Close the wandb run (exit_code 1 marks it failed; ``preempted`` marks it preempting,
        so the dashboard shows it waiting for its requeued continuation, not crashed)."""
        if self.wandb_run is not None:
            if preempted:
                self.wandb_run.mark_preempting()
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
            self._trigger_sync()  # the final summary and exit record


# Settings that change how a run executes or where it logs, not what it computes: two seeds of
# one configuration may differ in them and still share a configuration key.
_NOT_CONFIGURATION = (
    "seed",
    "trainer.resume",
    "trainer.auto_resume",
    "trainer.progress",
    "trainer.threads",
    "trainer.device",
    "trainer.preempt_check_every_steps",
    "trainer.dist_timeout_min",
    "trainer.log_every_steps",
    "trainer.checkpoint_every_steps",
    "trainer.keep_best",
    "data.root",
    "loader",
    "logger",
)


def config_key(config: dict[str, Any]) -> str:
    """A configuration's name without its seed, for wandb's ``job_type`` (64 characters max).

    ``"resnet18 pgt a=0.25 cosine b256 1f2e3d4c"``: model, method, alpha, schedule, global
    batch, then 8 hex digits of a hash of the rest of the resolved config (seed and run
    plumbing excluded), so configurations differing anywhere else get different keys.
    """

    def strip(node: Any, prefix: str = "") -> Any:
        if not isinstance(node, dict):
            return node
        return {
            k: strip(v, f"{prefix}{k}.")
            for k, v in sorted(node.items())
            if f"{prefix}{k}" not in _NOT_CONFIGURATION
        }

    digest = hashlib.sha256(json.dumps(strip(config), default=str).encode()).hexdigest()[:8]
    m = config["method"]
    alpha = "" if m.get("alpha") is None else f" a={m['alpha']:g}"
    label = f"{config['model']['name']} {method_label(m['alpha'], m['clip_mode'], m.get('impl', 'exact'))}{alpha} {config['sched']['name']}"
    return f"{label} b{config['trainer']['batch_size']} {digest}"[-64:]


def run_name(config: dict[str, Any]) -> str:
    """The wandb run name: ``<model>-<method>[-a<alpha>]-<sched>-s<seed>``, e.g.
    ``resnet50-pgt-a0.25-cosine-s0`` (not unique: the run directory is)."""
    m = config["method"]
    label = method_label(m["alpha"], m["clip_mode"], m.get("impl", "exact"))
    alpha = "" if m.get("alpha") is None else f"-a{m['alpha']:g}"
    return f"{config['model']['name']}-{label}{alpha}-{config['sched']['name']}-s{config['seed']}"


def best_so_far(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``best/val_top1`` and ``best/epoch`` over the epoch records (the first epoch reaching
    the maximum, as the trainer's best.pt); empty before the first evaluation."""
    scored = [r for r in history if isinstance(r.get("val_top1"), int | float)]
    if not scored:
        return {}
    best = max(scored, key=lambda r: r["val_top1"])  # max keeps the first of equals
    return {"best/val_top1": best["val_top1"], "best/epoch": best["epoch"]}


# summary.json keys whose wandb name is not the generic ``train_x`` -> ``train/x`` one. None:
# not copied (the wandb summary already has it: ``val/top1`` holds the max and the last epoch's
# value, by define_metric; best_val_top1 is best/val_top1).
_SUMMARY_NAMES: dict[str, str | None] = {
    "val_top1": None,
    "best_val_top1": None,
    "val_top1_best": "best/val_top1",
    "best_epoch": "best/epoch",
    "logit_norm": "val/logit_norm",
}


def wandb_summary_keys(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's flat keys under the history's names (``train_top1`` -> ``train/top1``,
    ``val_top1_final`` -> ``val/top1_final``), so the wandb summary has one name per metric;
    what describes the run (model, method, seed, steps, ...) keeps its key."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        head, _, rest = key.partition("_")
        if key in _SUMMARY_NAMES:
            if _SUMMARY_NAMES[key] is not None:
                out[_SUMMARY_NAMES[key]] = value
        elif head in ("train", "val") and rest and key != "train_images":
            out[f"{head}/{rest}"] = value
        else:
            out[key] = value
    return out


def wandb_epoch_keys(record: dict[str, Any]) -> dict[str, Any]:
    """An epoch record with wandb panel names: ``train_loss`` -> ``train/loss``, ``lr`` ->
    ``train/lr``, ``val_top1`` -> ``val/top1``, anything else -> ``perf/<key>``."""
    out: dict[str, Any] = {"epoch": record["epoch"]}
    for key, value in record.items():
        if key == "epoch" or not isinstance(value, int | float):
            continue
        head, _, rest = key.partition("_")
        if head in ("train", "val") and rest:
            out[f"{head}/{rest}"] = value
        elif key == "lr":
            out["train/lr"] = value
        else:
            out[f"perf/{key}"] = value
    return out
