"""EMA of the weights (trainer.ema_decay, timm's ModelEmaV3): the recurrence, the val_ema_*
records, an exact resume with EMA on (SIGKILL mid-epoch, then trainer.resume), and under DDP
one EMA on every rank (2 gloo ranks, torchrun)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train, history_without_timing, kill_at_checkpoint, train_in_process
from omegaconf import OmegaConf
from timm.utils import ModelEmaV3

from powergrad.checkpoint import TrainState
from powergrad.data import Shard, build_loaders
from powergrad.data.config import DataConfig, LoaderConfig
from powergrad.data.digits import materialize_digits
from powergrad.engine import EpochMeter, evaluate, make_grad_scaler, train_one_epoch
from powergrad.models import build_model, load_state_dict_strict
from powergrad.optim import build_scheduler

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 512 // 32
TINY = [
    "data=synthetic",
    "data.num_classes=4",
    "data.image_size=64",
    "data.synthetic_train_images=512",
    "data.synthetic_val_images=64",
    "model=resnet18_nonorm",
    "trainer.batch_size=32",
    "trainer.epochs=2",
    "trainer.warmup_epochs=0",
    "trainer.device=cpu",
    "trainer.threads=1",
    "trainer.progress=false",
    "trainer.ema_decay=0.9",
    "logger=none",
]


def test_ema_follows_the_weights_after_each_optimizer_step():
    cpu = torch.device("cpu")
    shard = Shard(batch_size=8, device=cpu)
    data = DataConfig(
        name="synthetic",
        num_classes=4,
        image_size=32,
        synthetic_train_images=32,
        synthetic_val_images=8,
    )
    loaders = build_loaders(data, LoaderConfig(backend="torch", workers=0), shard)
    torch.manual_seed(0)
    model = build_model("resnet18_nonorm", 4)
    ema = ModelEmaV3(model, decay=0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = build_scheduler(
        optimizer, compose_train().sched, epochs=1, warmup_epochs=0, iters_per_epoch=4
    )
    expected = None
    steps = train_one_epoch(
        model,
        loaders.train,
        torch.nn.CrossEntropyLoss(),
        optimizer,
        make_grad_scaler(cpu, "fp32"),
        scheduler,
        lambda: None,
        EpochMeter(cpu),
        TrainState(),
        amp_dtype=None,
        channels_last=False,
        ema=ema,
    )
    for _ in steps:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if expected is None:  # the first update copies the weights
            expected = weights
        else:
            expected = {k: 0.75 * expected[k] + 0.25 * weights[k] for k in weights}
        got = ema.module.state_dict()
        for key, value in expected.items():
            assert torch.allclose(got[key], value, rtol=1e-5, atol=1e-7), key
    assert not torch.equal(ema.module.fc.weight, model.fc.weight)


def test_a_run_evaluates_and_saves_the_ema(tmp_path):
    summary = train_in_process(tmp_path / "run", *TINY, "trainer.epochs=1", "data.image_size=32")
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")[:-1]
    ]
    assert {"val_ema_top1", "val_ema_loss", "val_ema_top5", "val_top1"} <= set(records[-1])
    assert summary["val_ema_top1"] == records[-1]["val_ema_top1"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["ema"].keys() == last["model"].keys()
    assert not torch.equal(last["ema"]["fc.weight"], last["model"]["fc.weight"])


def _train(*extra, cwd):
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        "trainer.checkpoint_every_steps=3",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_keeps_the_ema_exact(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    reference = _train(f"hydra.run.dir={full}", cwd=tmp_path)
    victim = _train(f"hydra.run.dir={broken}", cwd=tmp_path)
    last = broken / "last.pt"
    killed_at = kill_at_checkpoint(victim, last, lambda c: c["step"] > STEPS_PER_EPOCH)
    assert STEPS_PER_EPOCH < killed_at["step"] < 2 * STEPS_PER_EPOCH

    resumed = _train(f"trainer.resume={broken}", cwd=tmp_path)
    for proc in (resumed, reference):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-3000:]
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(broken / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert history_without_timing(full) == history_without_timing(broken)
    assert "val_ema_top1" in history_without_timing(full)[-1]


def _digits_subset(root, train_per_class, val_per_class):
    """The first files of each digit class, copied (real PNGs, ImageNet layout)."""
    src = materialize_digits()
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in sorted(p.name for p in (src / split).iterdir()):
            (root / split / label).mkdir(parents=True)
            for f in sorted((src / split / label).iterdir())[:count]:
                shutil.copy(f, root / split / label / f.name)
    return root


def test_under_ddp_val_ema_scores_the_ema_that_rank_0_saves(tmp_path):
    # BatchNorm: each rank's forward updates its copy of rank 0's buffers with its own batch,
    # and each rank's EMA used to average its own. val_ema_* must be the score of one model:
    # the EMA in last.pt, evaluated here on the whole val split in one process.
    data = _digits_subset(tmp_path / "digits", train_per_class=4, val_per_class=3)
    run = tmp_path / "run"
    common = [
        "model=resnet18",
        f"data.root={data}",
        "loader=torch",
        "loader.workers=0",
        "trainer.batch_size=16",  # 2 ranks x 8: 2 steps
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "trainer.ema_decay=0.5",
        "trainer.threads=1",
        "trainer.progress=false",
        "logger=none",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [*torchrun, str(ROOT / "train.py"), *common, f"hydra.run.dir={run}"],
        env={**env, "OMP_NUM_THREADS": "1", "SUBMITIT_EXECUTOR": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (record,) = history_without_timing(run)

    cfg = compose_train(*common)
    shard = Shard(batch_size=8, device=torch.device("cpu"))
    loaders = build_loaders(OmegaConf.to_object(cfg.data), OmegaConf.to_object(cfg.loader), shard)
    last = torch.load(run / "last.pt", weights_only=True)
    for weights, prefix in ((last["ema"], "val_ema_"), (last["model"], "val_")):
        model = load_state_dict_strict(build_model("resnet18", 10), weights)
        single = evaluate(model, loaders.val, device=torch.device("cpu"))
        assert record[f"{prefix}images"] == single["images"] == 30
        assert record[f"{prefix}top1"] == single["top1"], prefix
        assert record[f"{prefix}loss"] == pytest.approx(single["loss"], rel=1e-5), prefix
