"""Exact resume: a CPU run killed with SIGKILL mid-epoch and resumed ends like an unbroken run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import history_without_timing, kill_at_checkpoint
from wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 1437 // 64  # digits train images // global batch

ARGS = [
    "trainer.epochs=2",
    "trainer.batch_size=64",
    "trainer.warmup_epochs=0.5",
    "trainer.checkpoint_every_steps=3",
    "trainer.log_every_steps=5",
    "trainer.threads=1",
    "trainer.progress=false",
    "loader.workers=0",
    "method=pgt",
    "logger=wandb",
    "logger.mode=offline",
]


def _train(*extra, cwd):
    cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, *extra]
    # Each run starts its own wandb service, as after a real restart: a service inherited from
    # this test process (WANDB_SERVICE) would still hold the killed run's id.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    reference = _train(f"hydra.run.dir={full}", cwd=tmp_path)
    victim = _train(f"hydra.run.dir={broken}", cwd=tmp_path)

    # Kill the victim once a checkpoint from the middle of epoch 2 exists.
    last = broken / "last.pt"
    killed_at = kill_at_checkpoint(victim, last, lambda c: c["step"] > STEPS_PER_EPOCH)
    assert STEPS_PER_EPOCH < killed_at["step"] < 2 * STEPS_PER_EPOCH
    assert 0 < killed_at["batch"] < STEPS_PER_EPOCH and killed_at["epoch"] == 1
    assert not (broken / "summary.json").exists()

    _wait(_train(f"trainer.resume={broken}", cwd=tmp_path))
    _wait(reference)

    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(broken / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert history_without_timing(full) == history_without_timing(broken)
    assert len(history_without_timing(full)) == 2

    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((broken / "summary.json").read_text())
    for key in ("train_top1", "val_top1", "val_top5", "train_loss", "val_loss", "logit_norm"):
        assert sa[key] == sb[key], key

    # The resumed run kept its wandb run id and continued the same (offline) run.
    assert b["wandb_id"] == killed_at["wandb_id"] == sb["wandb_id"]
    runs = read_offline_run(broken)
    assert len(runs["files"]) == 2 and runs["id"] == b["wandb_id"]
    assert runs["exit_code"] == 0
    assert runs["summary"]["val/top1"]["last"] == sb["val_top1"]
    # The first start's config is kept; the restart's overrides are recorded beside it.
    assert (broken / ".hydra" / "overrides.yaml").exists()
    assert any(p.name.startswith(".hydra-resume-") for p in broken.iterdir())
