"""Gradient accumulation: K micro-batches of B / K per optimizer step train like one batch of B."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train, kill_at_checkpoint, tiny, train_in_process

from powergrad.config import ConfigError, validate_train
from powergrad.data.generate import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 320 train images: 2 steps of 128 per epoch; at a loader batch of 64, 5 batches, the
    # fifth a partial group that accumulation drops (as batch 128 drops its last 64 images).
    root = tmp_path_factory.mktemp("images")
    return write_image_folder(root, classes=4, train_per_class=80, val_per_class=2, size=(32, 32))


def _args(folder, *extra):
    return [
        "data=imagenet",
        f"data.root={folder}",
        "data.image_size=32",
        "data.val_resize_ratio=1.0",
        "loader.workers=0",
        "logger=none",
        "trainer.batch_size=128",
        "trainer.epochs=2",
        "trainer.warmup_epochs=0.5",
        "trainer.device=cpu",
        "trainer.threads=1",
        "trainer.progress=false",
        *extra,
    ]


def _assert_same_training(a, b):
    """Equal up to float rounding (summation order), which a few steps of a net without BN
    amplify to ~3e-5; a wrong gradient (a missing 1 / accum_steps, a micro-batch left out of
    the all-reduce) differs by the size of the update itself."""
    for key, value in a.items():
        assert torch.allclose(value, b[key], rtol=1e-3, atol=1e-4), key
    flat_a = torch.cat([v.flatten() for v in a.values()])
    flat_b = torch.cat([b[k].flatten() for k in a])
    assert (flat_a - flat_b).norm() <= 1e-4 * flat_a.norm()


def _weights(run_dir):
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)


def test_accumulated_micro_batches_train_like_the_whole_batch(folder, tmp_path):
    whole = tmp_path / "whole"
    accum = tmp_path / "accum"
    a = train_in_process(whole, *_args(folder, "model=resnet18_nonorm"))
    b = train_in_process(accum, *_args(folder, "model=resnet18_nonorm", "trainer.accum_steps=2"))
    assert a["steps"] == b["steps"] == 4  # optimizer steps: the partial group is dropped
    wa, wb = _weights(whole), _weights(accum)
    assert wa["step"] == wb["step"] == 4
    assert wa["batch"] == wb["batch"] == 0  # epoch ends; mid-epoch, batch counts loader batches
    _assert_same_training(wa["model"], wb["model"])
    # The schedule counts optimizer steps: same lr at the end, same images seen.
    ha = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (accum / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in ha] == pytest.approx([r["lr"] for r in hb])
    assert [r["train_images"] for r in ha] == [r["train_images"] for r in hb] == [256, 256]
    assert [r["train_loss"] for r in ha] == pytest.approx([r["train_loss"] for r in hb], rel=1e-4)


def test_accumulation_runs_a_batchnorm_model(folder, tmp_path):
    # BN normalizes each micro-batch by its own statistics: not the same numbers as batch 128.
    out = train_in_process(
        tmp_path / "bn", *_args(folder, "model=resnet18", "trainer.accum_steps=4")
    )
    assert out["steps"] == 4
    assert out["val_top1"] is not None


def test_batch_must_divide_by_world_size_times_accum_steps():
    cfg = compose_train("trainer.batch_size=96", "trainer.accum_steps=4")
    validate_train(cfg, world_size=2)  # 96 / (2 x 4) = 12 per rank and micro-batch
    with pytest.raises(ConfigError, match="multiple of 16"):
        validate_train(compose_train("trainer.batch_size=120", "trainer.accum_steps=4"), 4)
    with pytest.raises(ConfigError, match=r"trainer\.accum_steps=0"):
        validate_train(compose_train("trainer.accum_steps=0"), 1)


@pytest.mark.slow
def test_two_ranks_accumulating_match_one_process_with_the_same_global_batch(tmp_path):
    """DDP with no_sync on the non-final micro-steps: 2 ranks x 2 micro-batches of 16 train
    like one process with batch 64 (gradients all-reduced once per optimizer step, summed
    over the micro-batches first)."""
    from test_distributed import ARGS, _small_odd_digits, run_ddp_beside_single

    common = [*ARGS, f"data.root={_small_odd_digits(tmp_path)}"]
    single_dir, ddp_cwd = run_ddp_beside_single(tmp_path, common, ["trainer.accum_steps=2"])
    (ddp_dir,) = [p.parent for p in ddp_cwd.glob("outputs/*/*/summary.json")]
    a = torch.load(single_dir / "last.pt", weights_only=True)
    b = torch.load(ddp_dir / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 320 // 64 and b["world_size"] == 2
    _assert_same_training(a["model"], b["model"])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_with_accumulation_is_exact(folder, tmp_path):
    # 5 loader batches of 32 (the fifth dropped) = 2 optimizer steps per epoch at batch 128 x 4
    # accumulation; a checkpoint after every optimizer step, so one lands mid-epoch.
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        *_args(folder, "model=resnet18_nonorm", "trainer.accum_steps=4"),
        "trainer.epochs=3",
        "trainer.checkpoint_every_steps=1",
    ]
    full, broken = tmp_path / "full", tmp_path / "broken"

    def start(*extra):
        return subprocess.Popen(
            [*args, *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    reference = start(f"hydra.run.dir={full}")
    victim = start(f"hydra.run.dir={broken}")
    last = broken / "last.pt"
    # Epoch 2, after its first optimizer step.
    killed_at = kill_at_checkpoint(victim, last, lambda c: c["step"] == 3, poll_s=0.01)
    # Checkpoints fall on group boundaries: batch counts loader batches, a multiple of 4.
    assert killed_at["epoch"] == 1 and killed_at["batch"] == 4 and killed_at["step"] == 3

    resumed = start(f"trainer.resume={broken}")
    for proc in (resumed, reference):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-3000:]
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(broken / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_a_mid_epoch_checkpoint_resumes_only_under_its_accum_steps(tmp_path):
    from powergrad import checkpoint
    from powergrad.checkpoint import CheckpointError
    from powergrad.models import build_model

    args = tiny(
        "data.synthetic_train_images=64",
        "trainer.epochs=1",
        "trainer.accum_steps=2",
    )
    train_in_process(tmp_path / "run", *args)
    ckpt = checkpoint.load(tmp_path / "run" / "last.pt")
    ckpt["batch"] = 2  # as a checkpoint written after the first optimizer step of an epoch
    model = build_model("resnet18_nonorm", 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match=r"resume with trainer\.accum_steps=2"):
        checkpoint.restore(
            ckpt,
            model=model,
            optimizer=optimizer,
            scaler=torch.amp.GradScaler("cpu", enabled=False),
            scheduler=None,
            meter=None,
            loader=None,
            accum_steps=1,
        )
