"""Shared test setup: offline wandb, deterministic CPU threads, GPU tests skipped without CUDA.

Test modules import `compose_train` and `run_train` from here (pytest puts tests/ on sys.path).
"""

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
