"""Train one model: ``python train.py [group=option ...] [key=value ...]`` (Hydra).

With no argument: ResNet-18 baseline on the embedded digits dataset, on CPU. The main job is
``python train.py -m method=baseline,pgt`` (one multirun over the method; a side-by-side table
and an accuracy-vs-epoch plot land in the sweep directory). See configs/train.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from powergrad import distributed as pgdist
from powergrad import preemption
from powergrad.build import CONFIG_FILE, run_training
from powergrad.checkpoint import LAST
from powergrad.config import ConfigError, register_configs, validate_train
from powergrad.data import DatasetError
from powergrad.tracking import config_key

register_configs()


def train(cfg: DictConfig) -> dict:
    """Validate ``cfg``, settle the run directory and train; returns the run summary."""
    validate_train(cfg)
    info = pgdist.setup(cfg.trainer.device)
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and cfg.trainer.resume:
        raise ConfigError("trainer.resume continues one run; run it without -m / --multirun")
    # Rank 0's directory is the run's (other ranks only read from it); a resume continues in place.
    run_dir = Path(cfg.trainer.resume or pgdist.broadcast_object(hydra_cfg.runtime.output_dir))
    run_dir = run_dir.expanduser().resolve()
    taken = info.is_main and any((run_dir / f).exists() for f in (CONFIG_FILE, LAST))
    if not cfg.trainer.resume and pgdist.broadcast_object(taken):
        # A job requeued after preemption starts again in its own directory (the sweep job's
        # or the same hydra.run.dir) and continues from its checkpoint there.
        resume = info.is_main and preemption.should_resume(run_dir, cfg.trainer.auto_resume)
        if not pgdist.broadcast_object(resume):
            raise ConfigError(
                f"{run_dir} already holds a run; trainer.resume={run_dir} continues it"
            )
        print(f"resuming {run_dir} from its last checkpoint", file=sys.stderr)
        cfg.trainer.resume = str(run_dir)
    group = Path(hydra_cfg.sweep.dir).name if multirun else None
    # Seeds of one configuration share the wandb job_type, so the dashboard averages them.
    job_type = config_key(OmegaConf.to_container(cfg, resolve=True)) if multirun else None
    return run_training(cfg, run_dir, info, group=group, job_type=job_type)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: one-line errors for bad configs and datasets, before any training."""
    try:
        return train(cfg)["val_top1"]
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except preemption.Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        pgdist.cleanup()
        preemption.exit_for_requeue(e)
    finally:
        pgdist.cleanup()


if __name__ == "__main__":
    main()
