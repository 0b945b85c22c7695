"""Typed configuration schema for train.py / eval.py, registered in Hydra's ConfigStore.

The YAML tree under ``configs/`` fills these dataclasses; Hydra composes in struct mode, so a
misspelled key or a wrong type fails at start-up. :func:`validate_train` then checks what types
cannot (names, ranges, consistency between groups) and raises :class:`ConfigError` with the
override that fixes it, before any data is read or any model is built.

Also registered here: the ``pg.run_dir`` / ``pg.sweep_dir`` / ``pg.method_label`` resolvers
that give every run a directory of its own (time + pid + random suffix, so two runs started in
the same second never share one) and make ``trainer.resume=RUN_DIR`` continue in place, and
``pg.ranks_per_node`` for the SLURM launcher preset (configs/hydra/launcher/slurm.yaml).
"""

from __future__ import annotations

import datetime
import math
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from powergrad.clip import CLIP_MODES
from powergrad.data.config import BACKENDS, DATASETS, DataConfig, LoaderConfig
from powergrad.data.layout import BAD_MANIFEST_NAME, DatasetError, read_bad_manifest
from powergrad.method import method_label
from powergrad.optim import SCHEDULES, milestone_epochs
from powergrad.pgt import TRANSFORMS

__all__ = [
    "PRECISIONS",
    "ConfigError",
    "EvalConfig",
    "LoggerConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "TrainerConfig",
    "default_run_dir",
    "flat",
    "override_prefixes",
    "register_configs",
    "validate_eval",
    "validate_train",
    "with_saved_values",
]

SCHED_UPDATES = ("iteration", "fork_epoch")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
LOG_CHECKPOINTS = ("none", "best", "last")

# Run directories are created under these, relative to the directory train.py is started in.
OUTPUTS_ROOT = "outputs"
MULTIRUN_ROOT = "multirun"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and a valid override."""


@dataclass
class ModelConfig:
    """Group ``model``: one of powergrad.models.MODEL_NAMES, built by timm."""

    name: str = "resnet18"
    # Dropout before the classifier (probability); 0 in every run of the paper.
    drop_rate: float = 0.0
    # Val resize interpolation (bilinear | bicubic): the one the authors' evaluation used for this
    # model (their timm's default_cfg); configs/data/*.yaml take it as data.val_interpolation.
    val_interpolation: str = "bilinear"
    # Zero-init the last BN of each residual block (timm's default). The authors' fork never
    # did (every BN gamma starts at 1); group ``recipe`` sets it.
    zero_init_last: bool = True
    # Fine-tuning: start from these weights (our last.pt / best.pt, a timm checkpoint or state
    # dict); the classifier is re-initialised when its class count differs. null: random init.
    init: str | None = None
    # Start from timm's pretrained weights, from a local copy only (HF cache, torch hub cache).
    pretrained: bool = False


@dataclass
class MethodConfig:
    """Group ``method``: the paper's Method column (loss + gradient clipping).

    The method's name (baseline, pgt, gc, ...) is derived from these values by
    :func:`powergrad.method.method_label`.
    """

    # PGT exponent in [0, 1]; null means the ordinary cross-entropy gradient (alpha = 1).
    alpha: float | None = None
    # Label smoothing epsilon of the target distribution (0.1 in the paper's "LS" rows).
    label_smoothing: float = 0.0
    # Gradient clipping after unscale, before the step: none | norm (GC) | agc (AGC).
    clip_mode: str = "none"
    # GC: max global L2 norm; AGC: clip factor lambda (ratio); unused (null) without clipping.
    clip_threshold: float | None = None
    # The backward transform (powergrad.pgt.TRANSFORMS): exact (PGT's softmax(alpha z) - q in
    # fp32, any loss scale; the default), authors_hook (the fork's tensor hook on the fp16
    # logits, fp16 AMP only, the scaler started at N^2, N the per-GPU batch: the released code's
    # numerics) or pgt_fp16_truncated (the p' that hook computed, at any precision).
    impl: str = "exact"


@dataclass
class OptimConfig:
    """Group ``optim``: SGD with Nesterov momentum (Section 5.1)."""

    name: str = "sgd"
    # Peak lr for 256 images per step; scaled linearly with trainer.batch_size (global).
    lr_per_256: float = 0.1
    # Peak lr whatever the batch (no linear scaling), as the authors' fork ran it; null: use
    # lr_per_256. Set by recipe=authors_code.
    peak_lr: float | None = None
    momentum: float = 0.9
    # L2 on conv/linear weights; biases and norm parameters are exempt.
    weight_decay: float = 5e-4
    nesterov: bool = True


@dataclass
class SchedConfig:
    """Group ``sched``: lr schedule after the linear warmup; group ``recipe`` sets its values."""

    name: str = "cosine"
    # lr at the first iteration of the warmup.
    warmup_lr: float = 4e-4
    # cosine: floor of the decay.
    min_lr: float = 0.0
    # cosine: last epochs held at min_lr after the decay (timm's --cooldown-epochs). 0 = decay over
    # all of trainer.epochs (recipe=paper_text); 10 in the authors' README (recipe=authors_code).
    # The step schedule has no cooldown (as in timm's scheduler factory).
    cooldown_epochs: int = 0
    # When the lr changes: iteration (every optimizer step, the warmup a prefix of the decay) or
    # fork_epoch (the authors' fork: once per epoch, timm 0.4's epoch formula one epoch late:
    # epoch e >= 1 trains with lr(e + 1), epoch 0 with warmup_lr; the warmup overlaps the decay).
    stepping: str = "iteration"
    # step: decay points as fractions of trainer.epochs (0.3, 0.6, 0.9 = epochs 30, 60, 90 of 100).
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    # step: lr factor at each milestone.
    decay_rate: float = 0.1


@dataclass
class TrainerConfig:
    """Group ``trainer``: budget, precision and run-time behaviour."""

    epochs: int = 20
    # Global batch: images per optimizer step summed over all ranks.
    batch_size: int = 128
    # Gradient accumulation: micro-batches per optimizer step. Each rank's loader batch is
    # batch_size / (world_size * accum_steps); lr, warmup and schedule count optimizer steps.
    accum_steps: int = 1
    # Linear warmup length in epochs (the paper: 5 of 100).
    warmup_epochs: float = 1.0
    # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling).
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    # auto: CUDA when available, else CPU.
    device: str = "auto"
    # CPU intra-op threads (torch.set_num_threads): auto (powergrad.resources.auto_threads: the
    # rank's share of the cores this process may use), an int, or null for torch's default.
    threads: Any = "auto"
    # torch.use_deterministic_algorithms + no cudnn autotuning (slower on GPU).
    deterministic: bool = False
    # Also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends).
    checkpoint_every_steps: int = 0
    # Weights of the K best epochs by val top-1: best.pt (the best) and, for K > 1, the
    # runners-up as best-epochNNNN.pt (NNNN: their epoch). last.pt is always written.
    keep_best: int = 1
    # EMA of the weights (timm's ModelEmaV3), updated after each optimizer step and evaluated
    # beside the raw model every evaluation (val_ema_* in metrics.jsonl); null: off.
    ema_decay: float | None = None
    # Mixup / CutMix (timm's Mixup, per batch) Beta(alpha, alpha) parameters; 0 = off. When one
    # is on, method.label_smoothing goes into the mixed (soft) targets, the loss gets none.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Sync and log step metrics (loss, lr) every N optimizer steps; the only per-step host syncs.
    log_every_steps: int = 50
    # Record per-filter conv weight norms every N steps to filter_norms.jsonl (0: off).
    filter_norms_every_steps: int = 0
    # Evaluate on the val split every N epochs (and always after the last).
    eval_every_epochs: int = 1
    progress: bool = True
    # RUN_DIR of an earlier run to continue in place from its last checkpoint.
    resume: str | None = None
    # With trainer.resume: apply overrides that change the experiment mid-run (model, method,
    # data, lr, schedule, batch, epochs, ...), recorded in metrics.jsonl and the wandb run.
    # false: such a resume is refused with the list of keys.
    allow_changes: bool = False
    # Skip the optimizer step when the loss or a gradient is NaN/inf and go on (as fp16's
    # GradScaler does), counting the skipped steps, instead of stopping the run (fp32 / bf16).
    skip_nonfinite_steps: bool = False
    # Continue in place when the run directory already holds last.pt (a SLURM --requeue after a
    # node failure); a run stopped by a preemption signal always continues (preempted.json).
    auto_resume: bool = False
    # With several ranks, agree on a preemption signal every N optimizer steps (one all-reduce).
    preempt_check_every_steps: int = 10
    # With several ranks: minutes any collective waits for the slowest rank before the job fails
    # (torch's NCCL default is 10). The first start on a large dataset waits in one while each
    # node's local rank 0 checks the files (powergrad.data.layout.check_dataset_per_node).
    dist_timeout_min: float = 30.0


@dataclass
class LoggerConfig:
    """Group ``logger``: wandb on rank 0 (metrics.jsonl and summary.json are always written)."""

    name: str = "wandb"
    project: str = "powergrad"
    entity: str | None = None
    # auto: online when credentials exist (WANDB_API_KEY or ~/.netrc), else offline.
    mode: str = "auto"
    # null: the experiment name (multirun: the sweep directory's name).
    group: str | None = None
    # null: the configuration key (tracking.config_key: the resolved config without seed and
    # run plumbing), so seeds of one configuration share it however they are launched.
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    # Offline runs only: wandb-osh command directory (on a filesystem the login node sees);
    # run `wandb-osh --command-dir DIR` there to sync each run after every epoch. null: off.
    sync_dir: str | None = None
    # Upload a checkpoint as a wandb Artifact (type "model") at the end of the run:
    # none | best (best.pt) | last (last.pt).
    log_checkpoints: str = "none"
    # Seconds wandb.init may wait for the server (wandb's init_timeout); past it the run logs
    # offline, with a warning naming the folder to `wandb sync` later.
    init_timeout_s: float = 90.0


@dataclass
class TrainConfig:
    """Root of configs/train.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    # Names the run in wandb (group) and in tables; experiment/ files set it.
    experiment_name: str | None = None


@dataclass
class EvalConfig:
    """Root of configs/eval.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    # This project's last.pt / best.pt, or a timm checkpoint.pth.tar / model_best.pth.tar.
    checkpoint: str = "???"
    batch_size: int = 256
    precision: str = "fp32"
    device: str = "auto"
    channels_last: bool = False
    # JSON written here (a file, or a folder for eval.json); null: eval_<name>.json beside the
    # checkpoint.
    output: str | None = None
    seed: int = 0


_STAMP: dict[str, str] = {}


def _unique_stamp() -> str:
    """``YYYY-MM-DD/HH-MM-SS_<pid>-<hex>``: fixed for the life of the process.

    The pid and 16 random bits keep two runs started in the same second apart; fixing it per
    process keeps Hydra's repeated resolution of the run dir on one directory.
    """
    if "stamp" not in _STAMP:
        now = datetime.datetime.now()
        _STAMP["stamp"] = f"{now:%Y-%m-%d}/{now:%H-%M-%S}_{os.getpid()}-{secrets.token_hex(2)}"
    return _STAMP["stamp"]


def _rank() -> int:
    from powergrad.distributed import env_world

    # torchrun's RANK, or the task's rank in a submitit (SLURM) job.
    return env_world()[0]


def default_run_dir(root: str = OUTPUTS_ROOT) -> str:
    """A new, unique run directory path under ``root`` (not created)."""
    return f"{root}/{_unique_stamp()}"


def _resolve_run_dir(resume: str | None) -> str:
    if _rank() > 0:
        # Only rank 0 writes; other ranks get a scratch dir and learn rank 0's run dir later.
        return os.path.join(tempfile.gettempdir(), f"powergrad-rank{_rank()}-{os.getpid()}")
    if resume:
        # Hydra creates it if missing; train.py then refuses it as "not a run directory" and
        # removes what Hydra made (a resolver error would surface as a Hydra traceback).
        return str(Path(resume).expanduser().resolve())
    return default_run_dir(OUTPUTS_ROOT)


def _resolve_sweep_dir() -> str:
    if _rank() > 0:
        # torchrun ... train.py -m: every rank runs Hydra's launcher, which creates the sweep
        # folder; only rank 0's is the sweep's (each job's run dir is broadcast from rank 0).
        return os.path.join(tempfile.gettempdir(), f"powergrad-rank{_rank()}-{os.getpid()}-sweep")
    return default_run_dir(MULTIRUN_ROOT)


def _ranks_per_node(gpus_per_node: int | None) -> int:
    # One rank per GPU; one rank on a node without GPUs (a SLURM job cannot have 0 tasks).
    return max(1, int(gpus_per_node or 0))


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore and register the run-dir resolvers (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    resolvers = {
        "pg.run_dir": _resolve_run_dir,
        "pg.sweep_dir": _resolve_sweep_dir,
        "pg.method_label": method_label,
        "pg.ranks_per_node": _ranks_per_node,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            # The sweep dir is cached in the config: Hydra copies the launching process's
            # resolver cache into each job's config, so jobs run by submitit in other processes
            # (and requeued ones) land in the sweep dir the launcher created, not a new one.
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "pg.sweep_dir")


def _choices(value: Any, valid: tuple[str, ...] | list[str], key: str) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _check_data(cfg: DictConfig) -> None:
    _choices(cfg.data.name, DATASETS, "data.name")
    _choices(cfg.loader.backend, BACKENDS, "loader.backend")
    # configs/data/imagenet.yaml's data.root defaults to this variable, set once per machine.
    env_var, imagenet = "POWERGRAD_IMAGENET", cfg.data.name == "imagenet"
    if OmegaConf.is_missing(cfg.data, "root") or (imagenet and not cfg.data.root):
        once = f", or set {env_var}=DIR once per machine" if imagenet else ""
        raise ConfigError(
            f"data={cfg.data.name} needs its folder: pass data.root=DIR{once} "
            "(DIR/train/<class>/* and DIR/val/<class>/*)"
        )
    root = str(cfg.data.root) if cfg.data.root else None
    if root and not Path(root).expanduser().is_dir():
        from_env = imagenet and os.environ.get(env_var) == root
        source = f" (from {env_var})" if from_env else ""
        what = "a file, not a folder" if Path(root).expanduser().exists() else "no such directory"
        raise ConfigError(f"data.root={root}{source}: {what}")
    manifest = cfg.data.get("bad_files")
    if manifest and not Path(str(manifest)).expanduser().is_file():
        raise ConfigError(
            f"data.bad_files={manifest}: no such file (scripts/check_dataset.py writes it)"
        )
    default = Path(root).expanduser() / BAD_MANIFEST_NAME if root else None
    manifest = Path(str(manifest)).expanduser() if manifest else default
    if manifest is not None and manifest.is_file():
        try:
            read_bad_manifest(manifest)  # the loaders read it after the run dir is claimed
        except DatasetError as e:
            raise ConfigError(str(e)) from None
    for group in ("data", "loader"):
        try:
            # DataConfig / LoaderConfig check their own values (ranges, choices) when built.
            OmegaConf.to_object(cfg[group])
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_model(name: str) -> None:
    from powergrad.models import MODEL_NAMES

    _choices(name, MODEL_NAMES, "model.name")


def _check_init(model: DictConfig) -> None:
    from powergrad.models import pretrained_file

    if model.init and model.pretrained:
        raise ConfigError(
            "model.init=PATH and model.pretrained=true both set the weights; pick one"
        )
    if model.init and not Path(str(model.init)).expanduser().is_file():
        raise ConfigError(f"model.init={model.init}: no such file")
    if model.pretrained and pretrained_file(model.name) is None:
        raise ConfigError(
            f"model.pretrained=true: no local timm weights for model={model.name} (no network "
            "here; none in the Hugging Face or torch hub cache). Download them once where there "
            f"is network (timm.create_model('{model.name}', pretrained=True)), or pass "
            "model.init=PATH"
        )


def _check_batch_norm_batch(cfg: DictConfig, world: int) -> None:
    """BatchNorm cannot train on one image per rank and step (its batch variance is 0: torch
    raises in the first step); the check builds the model on the meta device, only then."""
    t = cfg.trainer
    if t.batch_size // (world * t.accum_steps) != 1:
        return
    import torch

    from powergrad.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model.name, 2)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} / (world size {world} x trainer.accum_steps="
            f"{t.accum_steps}) is 1 image per rank and step: model={cfg.model.name} has "
            "BatchNorm, which cannot train on one image; use at least 2 per rank, or "
            "model=resnet18_nonorm"
        )


def _check_precision(precision: str, device: str) -> None:
    _choices(precision, PRECISIONS, "precision")
    _choices(device, DEVICES, "device")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available here; use device=auto or cpu")
    if precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")


def _check_method(method: DictConfig) -> None:
    alpha = method.alpha
    if alpha is not None and not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"method.alpha={alpha} is out of range: PGT needs 0 <= alpha <= 1")
    if not 0.0 <= method.label_smoothing < 1.0:
        raise ConfigError(f"method.label_smoothing={method.label_smoothing}: must be in [0, 1)")
    _choices(method.clip_mode, CLIP_MODES, "method.clip_mode")
    _choices(method.impl, tuple(TRANSFORMS), "method.impl")
    if method.impl == "authors_hook" and alpha is None:
        raise ConfigError("method.impl=authors_hook is PGT's hook: set method.alpha (method=pgt)")
    threshold = method.clip_threshold
    if method.clip_mode != "none" and not (
        threshold is not None and math.isfinite(threshold) and threshold > 0
    ):
        raise ConfigError(
            f"method.clip_mode={method.clip_mode} needs method.clip_threshold > 0, got "
            f"{threshold} (configs/method/gc.yaml and agc.yaml hold the usual values)"
        )


def _check_authors_hook(t: DictConfig) -> None:
    """The authors' hook is right only where it sees what the fork's did: the fp16 gradient of
    the logits at loss scale N**2 (train.py starts the scaler there; powergrad.method)."""
    if t.precision != "fp16":
        raise ConfigError(
            f"method.impl=authors_hook with trainer.precision={t.precision}: the hook recovers p "
            "assuming fp16 AMP at loss scale N^2 (here the scale is 1); use trainer.precision="
            "fp16, or method.impl=pgt_fp16_truncated for the fork's fp16 PGT at any precision"
        )
    if t.accum_steps != 1:
        raise ConfigError(
            f"method.impl=authors_hook with trainer.accum_steps={t.accum_steps}: each micro-batch's "
            "loss is divided by accum_steps, so the hook would see scale N^2 / accum_steps; use "
            "trainer.accum_steps=1 (the fork had no accumulation)"
        )


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"dotted.key": leaf}`` (lists are leaves)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _touched(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def override_prefixes(overrides: list[str]) -> list[str]:
    """The config keys (or group names) a Hydra command line sets, e.g. ``['method', 'seed']``.

    A group override (``method=pgt``) touches its whole subtree; ``experiment=...`` (a global
    package) touches everything, returned as ``['']``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    prefixes = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group.lstrip("+~")
        prefixes.append("" if key == "experiment" else key)
    return prefixes


def with_saved_values(cfg: DictConfig, saved: Any, overrides: list[str]) -> DictConfig:
    """``cfg`` with every value the command line did not set taken from ``saved`` (a run's or
    a checkpoint's config): what a resume or an evaluation of a stored run means by default.

    Keys of ``saved`` that ``cfg``'s schema does not have (an older version's) are left behind.
    """
    prefixes = override_prefixes(overrides)
    if "" in prefixes:
        return cfg.copy()
    old = flat(OmegaConf.to_container(saved, resolve=True) if OmegaConf.is_config(saved) else saved)
    result = cfg.copy()
    for key in flat(OmegaConf.to_container(cfg, resolve=True)):
        if key in old and not _touched(key, prefixes):
            OmegaConf.update(result, key, old[key], merge=False)
    return result


def validate_train(cfg: DictConfig, world_size: int | None = None) -> None:
    """Check a composed train config; raise ConfigError naming the key and a valid value.

    Args:
        cfg: the composed config (struct mode).
        world_size: number of ranks; from torchrun's or submitit's environment when None.
    """
    if world_size is None:
        from powergrad.distributed import env_world

        world_size = env_world()[1]
    world = world_size
    _check_model(cfg.model.name)
    _check_init(cfg.model)
    _check_method(cfg.method)
    _check_data(cfg)
    _choices(cfg.optim.name, ("sgd",), "optim.name")
    _choices(cfg.sched.name, SCHEDULES, "sched.name")
    _choices(cfg.logger.name, LOGGERS, "logger.name")
    _choices(cfg.logger.mode, WANDB_MODES, "logger.mode")
    _choices(cfg.logger.log_checkpoints, LOG_CHECKPOINTS, "logger.log_checkpoints")
    if cfg.logger.init_timeout_s <= 0:
        raise ConfigError(f"logger.init_timeout_s={cfg.logger.init_timeout_s}: must be > 0")
    if cfg.logger.name == "wandb":
        from powergrad.tracking import wandb_mode

        wandb_mode(cfg.logger.mode)  # online without credentials: refused here, before any work
    t = cfg.trainer
    if cfg.method.impl == "authors_hook":
        _check_authors_hook(t)
    _check_precision(t.precision, t.device)
    if not (t.threads in ("auto", None) or (isinstance(t.threads, int) and t.threads >= 1)):
        raise ConfigError(f"trainer.threads={t.threads!r}: must be auto, null or an int >= 1")
    w = cfg.loader.workers
    if not (w == "auto" or (isinstance(w, int) and w >= 0)):
        raise ConfigError(f"loader.workers={w!r}: must be auto or an int >= 0")
    if t.epochs < 1:
        raise ConfigError(f"trainer.epochs={t.epochs}: must be >= 1")
    if t.dist_timeout_min <= 0:
        raise ConfigError(f"trainer.dist_timeout_min={t.dist_timeout_min}: must be > 0")
    if t.batch_size < 1:
        raise ConfigError(f"trainer.batch_size={t.batch_size}: must be >= 1 (the global batch)")
    if t.batch_size % world != 0:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} (global) is not divisible by the world size "
            f"{world}; pick a multiple of {world}"
        )
    if t.accum_steps < 1:
        raise ConfigError(f"trainer.accum_steps={t.accum_steps}: must be >= 1 (1: no accumulation)")
    if t.batch_size % (world * t.accum_steps) != 0:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} (global) is not divisible by world size {world} x "
            f"trainer.accum_steps={t.accum_steps}: each rank's loader batch is "
            "batch_size / (world_size * accum_steps); pick a batch_size that is a multiple of "
            f"{world * t.accum_steps}"
        )
    _check_batch_norm_batch(cfg, world)
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed}: must be in [0, 2**32) (numpy's and torch's range)")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"trainer.ema_decay={t.ema_decay}: must be in (0, 1), or null (off)")
    if t.mixup_alpha < 0 or t.cutmix_alpha < 0:
        raise ConfigError(
            f"trainer.mixup_alpha={t.mixup_alpha} / trainer.cutmix_alpha={t.cutmix_alpha}: "
            "must be >= 0 (0: off)"
        )
    if t.mixup_alpha or t.cutmix_alpha:
        if cfg.method.impl == "authors_hook":
            raise ConfigError(
                "method.impl=authors_hook takes class indices, not mixup's soft targets; use "
                "method.impl=exact with trainer.mixup_alpha / trainer.cutmix_alpha"
            )
        if (t.batch_size // (world * t.accum_steps)) % 2:
            raise ConfigError(
                f"mixup / cutmix pair each batch with its reverse: the loader batch "
                f"trainer.batch_size / (world size {world} x trainer.accum_steps) = "
                f"{t.batch_size // (world * t.accum_steps)} must be even"
            )
    if not 0 <= t.warmup_epochs < t.epochs:
        raise ConfigError(
            f"trainer.warmup_epochs={t.warmup_epochs}: must be in [0, trainer.epochs={t.epochs})"
        )
    for key in ("checkpoint_every_steps", "filter_norms_every_steps"):
        if t[key] < 0:
            raise ConfigError(f"trainer.{key}={t[key]}: must be >= 0")
    for key in ("log_every_steps", "eval_every_epochs", "preempt_check_every_steps", "keep_best"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key}={t[key]}: must be >= 1")
    _choices(cfg.sched.stepping, SCHED_UPDATES, "sched.stepping")
    peak = cfg.optim.peak_lr
    if cfg.optim.lr_per_256 <= 0 or (peak is not None and not (math.isfinite(peak) and peak > 0)):
        raise ConfigError(
            f"optim.lr_per_256={cfg.optim.lr_per_256} / optim.peak_lr={peak}: must be > 0"
        )
    if not 0 <= cfg.optim.momentum < 1 or cfg.optim.weight_decay < 0:
        raise ConfigError("optim.momentum must be in [0, 1) and optim.weight_decay >= 0")
    s = cfg.sched
    if s.warmup_lr < 0 or s.min_lr < 0 or not 0 < s.decay_rate < 1:
        raise ConfigError(
            f"sched.warmup_lr={s.warmup_lr} and sched.min_lr={s.min_lr} must be >= 0, "
            f"sched.decay_rate={s.decay_rate} in (0, 1)"
        )
    cooldown = cfg.sched.cooldown_epochs if cfg.sched.name == "cosine" else 0
    if not 0 <= cooldown < t.epochs - t.warmup_epochs:
        raise ConfigError(
            f"sched.cooldown_epochs={cooldown}: must be >= 0 and leave epochs to decay after "
            f"trainer.warmup_epochs={t.warmup_epochs} within trainer.epochs={t.epochs}"
        )
    if cfg.sched.name == "step":
        for f in cfg.sched.milestones:
            if not 0 < f < 1:
                raise ConfigError(f"sched.milestones: {f} is not a fraction of training in (0, 1)")
        epochs = milestone_epochs(cfg.sched.milestones, t.epochs)
        if cfg.sched.stepping == "fork_epoch" and epochs != list(
            range(epochs[0], epochs[0] * len(epochs) + 1, epochs[0])
        ):
            raise ConfigError(
                f"sched.stepping=fork_epoch decays every k epochs (timm 0.4's step schedule): "
                f"sched.milestones give epochs {epochs}, not multiples of the first"
            )
        if epochs and not (t.warmup_epochs < epochs[0] and epochs[-1] < t.epochs):
            raise ConfigError(
                f"sched.milestones={list(cfg.sched.milestones)} give epochs {epochs}, which "
                f"must lie after the warmup ({t.warmup_epochs}) and before trainer.epochs"
            )


def validate_eval(cfg: DictConfig) -> None:
    """Check a composed eval config; raise ConfigError naming the key."""
    _check_model(cfg.model.name)
    _check_data(cfg)
    _check_precision(cfg.precision, cfg.device)
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ConfigError("pass the weights to evaluate: checkpoint=PATH")
    checkpoint = Path(str(cfg.checkpoint)).expanduser()
    if not checkpoint.is_file():
        what = "a folder, not a file" if checkpoint.is_dir() else "no such file"
        raise ConfigError(f"checkpoint={cfg.checkpoint}: {what}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be >= 1")
