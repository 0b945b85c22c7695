"""Shared test setup: offline wandb, deterministic CPU threads, GPU tests skipped without CUDA.

Test modules import `compose_train` and `run_train` from here (pytest puts tests/ on sys.path).
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
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


def tiny(*changes):
    """TINY with some of its values replaced (``"key=value"``) and other overrides appended:
    each key once (Hydra refuses two values for one config group, e.g. model=)."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [o for o in TINY if o.split("=", 1)[0] not in keys] + list(changes)


# Timing fields differ between any two runs; everything else in metrics.jsonl must match.
TIMING_KEYS = {"images_per_s", "epoch_s"}


def history_without_timing(run_dir):
    """metrics.jsonl of a run, one dict per epoch, without TIMING_KEYS."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]


def kill_at_checkpoint(victim, last, reached, poll_s=0.02, timeout_s=240):
    """SIGKILL the training process ``victim`` as soon as its ``last`` checkpoint satisfies
    ``reached(checkpoint_dict)``; returns that checkpoint (as on disk after the kill)."""
    deadline, seen = time.time() + timeout_s, None
    while time.time() < deadline and victim.poll() is None:
        mtime = last.stat().st_mtime_ns if last.exists() else None
        if mtime is not None and mtime != seen:
            seen = mtime
            if reached(torch.load(last, weights_only=True)):
                os.kill(victim.pid, signal.SIGKILL)
                break
        time.sleep(poll_s)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return torch.load(last, weights_only=True)


def kill_when(victim, condition, poll_s=0.001, timeout_s=240):
    """SIGKILL the process ``victim`` at the first moment ``condition()`` holds. The condition is
    checked again with the process stopped (SIGSTOP), so the kill leaves the state it saw; when
    it no longer holds, the process goes on (SIGCONT) and the watch continues."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and victim.poll() is None:
        if condition():
            os.kill(victim.pid, signal.SIGSTOP)
            if condition():
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(timeout=60)
                return
            os.kill(victim.pid, signal.SIGCONT)
        time.sleep(poll_s)
    victim.kill()
    victim.wait(timeout=60)
    raise AssertionError("the process ended (or timed out) before the moment to kill it came")


def save_checkpoint(run_dir, model, state, *, optimizer=None, best=False, writer=None):
    """checkpoint.save of `model` and `state` with an SGD optimizer, no scaler, a constant
    schedule and empty meters / loader state, as a test needs it."""
    from powergrad import checkpoint

    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint.save(
        run_dir,
        model=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        state=state,
        meters={},
        loader_state={},
        config={},
        wandb_id=None,
        git_sha="test",
        best=best,
        writer=writer,
    )


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
