"""eval.py on this project's checkpoints and on timm-format files, and its mismatch errors."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_in_process

from powergrad.config import register_configs
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
    train_in_process(
        run_dir,
        "logger=none",
        "loader.workers=0",
        "trainer.progress=false",
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "trainer.batch_size=64",
        "trainer.threads=1",
        "optim.lr_per_256=0.4",
    )
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
    # Beside the checkpoint by default, and nothing else written (no Hydra run folder).
    result = json.loads((tmp_path / "eval_model_best.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_model_best.json", timm_file.name]
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


def test_a_checkpoint_brings_its_runs_model_and_data(tmp_path):
    # A run of another model on other data: eval.py with only checkpoint= must not build the
    # defaults (resnet18 on digits) but what the run trained.
    run = tmp_path / "run"
    summary = train_in_process(
        run,
        "model=resnet18_nonorm",
        "data=synthetic",
        "data.num_classes=5",
        "data.image_size=32",
        "data.synthetic_train_images=16",
        "data.synthetic_val_images=24",
        "trainer.batch_size=8",
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "trainer.progress=false",
        "logger=none",
    )
    # batch_size=8 as in training: synthetic val images are one random batch of that size.
    proc = _eval(f"checkpoint={run / 'best.pt'}", "batch_size=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "eval_best.json").read_text())
    assert (result["model"], result["dataset"], result["images"]) == (
        "resnet18_nonorm",
        "synthetic",
        24,
    )
    assert result["top1"] == pytest.approx(summary["val_top1"])
    # The metrics are printed too, as strict JSON.
    printed = proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1]
    assert json.loads(printed)["top1"] == result["top1"]


def test_unwritable_output_fails_before_evaluating(trained_run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _eval(
        f"checkpoint={trained_run / 'best.pt'}", f"output={blocker}/sub/e.json", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "is not a writable folder" in proc.stderr and "Traceback" not in proc.stderr
    assert '"top1"' not in proc.stdout  # refused before any evaluation ran
