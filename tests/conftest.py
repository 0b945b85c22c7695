"""Shared test setup: offline wandb, deterministic CPU threads, GPU tests skipped without CUDA.

Test modules import `compose_train` and `run_train` from here (pytest puts tests/ on sys.path).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """prepare_runtime sets torch's thread count (trainer.threads); give it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# A run of seconds: 2 steps an epoch on 32 random 32x32 images, non-BN ResNet-18, CPU.
TINY = [
    "data=synthetic",
    "data.num_classes=4",
    "data.image_size=32",
    "data.synthetic_train_images=32",
    "data.synthetic_val_images=16",
    "model=resnet18_nonorm",
    "trainer.batch_size=16",
    "trainer.epochs=2",
    "trainer.warmup_epochs=0",
    "trainer.device=cpu",
    "trainer.threads=1",
    "trainer.progress=false",
    "logger=none",
]


def compose_train(*overrides, hydra=False):
    """configs/train.yaml composed with `overrides` (and Hydra's own config when `hydra`)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def run_train(args, cwd, env=None, timeout=300):
    """`python train.py ARGS` in `cwd`, stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _load_train_entry_point():
    """train.py, the entry point users run, imported as a module (it is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("powergrad_train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_in_process(run_dir, *overrides):
    """`python train.py OVERRIDES hydra.run.dir=RUN_DIR` in this process; returns the summary.

    The same `train(cfg)` the CLI runs, with Hydra's run-time config set as `@hydra.main` sets
    it, minus the process start-up (seconds per run on this machine).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_train(*overrides, f"hydra.run.dir={run_dir}", hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return TRAIN.train(cfg)


TRAIN = _load_train_entry_point()
