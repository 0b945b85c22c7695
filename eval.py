"""Evaluate a checkpoint on a dataset's val split: ``python eval.py checkpoint=PATH [model=...]``.

Accepts this project's last.pt / best.pt and timm-format files (checkpoint.pth.tar /
model_best.pth.tar holding ``state_dict``, as the paper's authors released them), loaded with
``weights_only=True``. Writes top-1, top-5, loss, logit statistics and the image count as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from powergrad import distributed as pgdist
from powergrad.build import build_run_loaders
from powergrad.config import ConfigError, register_configs, validate_eval
from powergrad.data import DatasetError
from powergrad.engine import AMP_DTYPES, evaluate
from powergrad.models import build_model, load_state_dict_strict, load_timm_checkpoint
from powergrad.tracking import git_sha, write_json_atomic

register_configs()


def run_eval(cfg: DictConfig) -> dict:
    """Load ``cfg.checkpoint`` into ``cfg.model`` and evaluate it on ``cfg.data``'s val split."""
    validate_eval(cfg)
    info = pgdist.setup(cfg.device)
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by {info.world_size}")
    torch.manual_seed(cfg.seed)
    loaders = build_run_loaders(cfg, info, cfg.batch_size)
    model = build_model(cfg.model.name, loaders.num_classes, drop_rate=cfg.model.drop_rate)
    path = str(Path(cfg.checkpoint).expanduser())
    try:
        load_state_dict_strict(model, load_timm_checkpoint(path), source=path)
    except ValueError as e:
        raise ConfigError(f"{e}\n  (pick the matching model=... and data=...)") from e
    model = model.to(info.device, memory_format=torch.channels_last if cfg.channels_last else None)
    metrics = evaluate(
        model,
        loaders.val,
        device=info.device,
        amp_dtype=AMP_DTYPES[cfg.precision],
        channels_last=cfg.channels_last,
    )
    result = {
        "checkpoint": path,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "data_root": cfg.data.root,
        "num_classes": loaders.num_classes,
        "precision": cfg.precision,
        "git_sha": git_sha(),
        **metrics,
    }
    if info.is_main:
        out = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir)
        out = out / "eval.json" if out.is_dir() or not out.suffix else out
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
        print(json.dumps(result, indent=2))
        print(f"written: {out}")
    return result


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
    main()
