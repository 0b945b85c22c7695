"""Evaluate a checkpoint on a dataset's val split: ``python eval.py checkpoint=PATH [model=...]``.

Accepts this project's last.pt / best.pt and timm-format files (checkpoint.pth.tar /
model_best.pth.tar holding ``state_dict``, as the paper's authors released them), loaded with
``weights_only=True``. A checkpoint of ours carries its run's config: its model and data
settings are used unless the command line sets them. Prints top-1, top-5, loss, logit
statistics and the image count as JSON, and writes them beside the checkpoint
(``eval_<name>.json``) or to ``output=``; the output path is checked before evaluating.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from powergrad import checkpoint, resources
from powergrad import distributed as pgdist
from powergrad.checkpoint import CheckpointError
from powergrad.command_line import exit_on_bad_command_line
from powergrad.config import (
    ConfigError,
    EvalConfig,
    register_configs,
    validate_eval,
    with_saved_values,
)
from powergrad.data import DatasetError, Shard, build_loaders
from powergrad.engine import AMP_DTYPES, evaluate
from powergrad.models import build_model, load_state_dict_strict, load_timm_checkpoint
from powergrad.tracking import git_sha, strict_json, write_json_atomic

register_configs()


def output_path(cfg: DictConfig, ckpt: Path) -> Path:
    """Where the JSON goes; raises ConfigError now if it cannot be written there."""
    name = ckpt.name.split(".")[0]  # best.pt -> best, model_best.pth.tar -> model_best
    out = Path(cfg.output).expanduser() if cfg.output else ckpt.parent / f"eval_{name}.json"
    if out.is_dir() or (cfg.output and not out.suffix):
        out = out / "eval.json"
    folder = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("/"))
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise ConfigError(f"output={out}: {folder} is not a writable folder; pass output=PATH")
    if out.exists() and not os.access(out, os.W_OK):
        raise ConfigError(f"output={out} is not writable; pass output=PATH")
    return out


def run_eval(cfg: DictConfig) -> dict:
    """Load ``cfg.checkpoint`` into ``cfg.model`` and evaluate it on ``cfg.data``'s val split."""
    validate_eval(cfg)
    path = Path(cfg.checkpoint).expanduser().resolve()
    try:
        saved = checkpoint.load(path).get("config")
    except CheckpointError:
        saved = None  # a timm file (its argparse args need timm's loader below)
    if saved:
        cfg = with_saved_values(cfg, {k: saved[k] for k in ("model", "data")}, _overrides())
        validate_eval(cfg)
    out = output_path(cfg, path)
    dist = pgdist.setup(cfg.device)
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by {dist.world_size}")
    torch.manual_seed(cfg.seed)
    shard = Shard(
        batch_size=cfg.batch_size // dist.world_size,
        rank=dist.rank,
        world_size=dist.world_size,
        device=dist.device,
        seed=cfg.seed,
        local_rank=dist.local_rank,
        channels_last=cfg.channels_last,
    )
    _, workers = resources.resolve(None, cfg.loader.workers, accelerator=dist.device.type != "cpu")
    loader_cfg = dataclasses.replace(OmegaConf.to_object(cfg.loader), workers=workers)
    loaders = build_loaders(OmegaConf.to_object(cfg.data), loader_cfg, shard)
    model = build_model(cfg.model.name, loaders.num_classes, drop_rate=cfg.model.drop_rate)
    try:
        load_state_dict_strict(model, load_timm_checkpoint(path), source=str(path))
    except ValueError as e:
        raise ConfigError(f"{e}\n  (pick the matching model=... and data=...)") from e
    except Exception as e:  # a torch.load failure: truncated, empty or foreign bytes
        raise ConfigError(f"checkpoint={path} is not readable: {type(e).__name__}: {e}") from e
    model = model.to(dist.device, memory_format=torch.channels_last if cfg.channels_last else None)
    try:
        metrics = evaluate(
            model,
            loaders.val,
            device=dist.device,
            amp_dtype=AMP_DTYPES[cfg.precision],
            channels_last=cfg.channels_last,
        )
    finally:
        loaders.close()
    result = {
        "checkpoint": str(path),
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "data_root": cfg.data.root,
        "num_classes": loaders.num_classes,
        "precision": cfg.precision,
        "git_sha": git_sha(),
        **metrics,
    }
    if dist.is_main:
        print(strict_json(result))  # first: the numbers are on screen whatever happens next
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
        print(f"written: {out}")
    return result


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one-line errors for bad configs, datasets and mismatched weights."""
    try:
        run_eval(cfg)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        pgdist.cleanup()


if __name__ == "__main__":
    # A typo or bad value ends here in one line, before anything is loaded.
    exit_on_bad_command_line(
        Path(__file__).parent / "configs", "eval", schema=EvalConfig, validate=validate_eval
    )
    main()
