"""eval.py on this project's checkpoints and on timm-format files, and its mismatch errors."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train

from powergrad import distributed as pgdist
from powergrad.build import build_context, prepare_runtime
from powergrad.config import register_configs
from powergrad.engine import TrainState, fit
from powergrad.models import build_model

ROOT = Path(__file__).resolve().parents[1]
register_configs()


RESULT_KEYS = {"top1", "top5", "loss", "images", "logit_norm", "logit_mean", "logit_max"}


def _eval(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "loader.workers=0", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short real training run (1 epoch on digits): its run directory."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train(
        "logger=none",
        "loader.workers=0",
        "trainer.progress=false",
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "trainer.batch_size=64",
        "trainer.threads=1",
        "optim.lr_per_256=0.4",
    )
    prepare_runtime(cfg)
    fit(build_context(cfg, run_dir, pgdist.setup("cpu")), TrainState())
    yield run_dir
    shutil.rmtree(run_dir)  # checkpoints: module-scoped dirs outlive tmp_path's cleanup


def test_project_checkpoint_reproduces_the_runs_val_metrics(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = _eval(f"checkpoint={trained_run / 'last.pt'}", f"output={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) >= RESULT_KEYS and result["images"] == 360
    summary = json.loads((trained_run / "summary.json").read_text())
    assert result["top1"] == pytest.approx(summary["val_top1"])
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert result["logit_norm"] == pytest.approx(summary["logit_norm"], rel=1e-6)


def test_timm_format_checkpoint_loads_weights_only(trained_run, tmp_path):
    # timm's train.py layout: state_dict (with DDP's module. prefix) plus an argparse Namespace.
    weights = torch.load(trained_run / "best.pt", weights_only=True)["model"]
    timm_file = tmp_path / "model_best.pth.tar"
    torch.save(
        {
            "epoch": 1,
            "arch": "resnet18",
            "state_dict": {f"module.{k}": v for k, v in weights.items()},
            "args": argparse.Namespace(model="resnet18", modify_softmax=0.25),
        },
        timm_file,
    )
    proc = _eval(f"checkpoint={timm_file}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = tmp_path.glob("outputs/*/*/eval.json")
    result = json.loads(written.read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert result["images"] == 360 and result["top1"] == pytest.approx(summary["val_top1"])


def test_wrong_architecture_is_named(tmp_path):
    timm_file = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": build_model("resnet18", num_classes=10).state_dict()}, timm_file)
    proc = _eval(f"checkpoint={timm_file}", "model=resnet50", cwd=tmp_path)
    assert proc.returncode == 2
    assert "architecture mismatch" in proc.stderr
    assert "checkpoint looks like resnet18 / num_classes=10, model is resnet50" in proc.stderr
    assert "Traceback" not in proc.stderr
