"""Top-k checkpoints by val top-1: best.pt plus best-epochNNNN.pt for the runners-up."""

import json

import torch
from conftest import save_checkpoint, train_in_process
from torch import nn

from powergrad import checkpoint
from powergrad.checkpoint import BEST, LAST, TrainState, best_name, rank_best


def _files(run_dir):
    return sorted(p.name for p in run_dir.glob("best*.pt"))


def _epoch_of(path):
    weights = checkpoint.load(path)
    # Each epoch's weights were filled with its number: the file holds that epoch's model.
    assert torch.all(weights["model"]["weight"] == weights["epoch"])
    return weights["epoch"]


def test_keep_best_keeps_the_k_best_epochs_and_their_weights(tmp_path):
    model = nn.Linear(2, 2)
    state = TrainState()
    scores = [10.0, 30.0, 20.0, 40.0, 5.0, 30.0, float("nan"), 35.0]
    for epoch, top1 in enumerate(scores, start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        state.epoch = epoch
        ranked = rank_best(state, top1, epoch, keep=3)
        save_checkpoint(tmp_path, model, state, best=ranked)
        # After every epoch: best.pt is the best so far, the runners-up carry their epoch.
        seen = sorted(
            ((v, e) for e, v in enumerate(scores[:epoch], start=1) if v == v),
            key=lambda r: -r[0],
        )[:3]
        assert _epoch_of(tmp_path / BEST) == seen[0][1] == state.best_epoch
        assert state.best_val_top1 == seen[0][0]
        runners = {best_name(e) for _, e in seen[1:]}
        assert set(_files(tmp_path)) == {BEST, *runners}
        for name in runners:
            assert _epoch_of(tmp_path / name) == int(name[len("best-epoch") : -3])
    # Ties keep the earlier epoch ahead: 30.0 at epoch 2 stays, epoch 6's 30.0 dropped.
    assert state.best_checkpoints == [[40.0, 4], [35.0, 8], [30.0, 2]]
    assert (tmp_path / LAST).exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_keep_best_1_is_one_best_pt(tmp_path):
    model, state = nn.Linear(2, 2), TrainState()
    for epoch, top1 in enumerate([1.0, 3.0, 2.0], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        state.epoch = epoch
        save_checkpoint(tmp_path, model, state, best=rank_best(state, top1, epoch, keep=1))
    assert _files(tmp_path) == [BEST] and _epoch_of(tmp_path / BEST) == 2


def test_a_run_keeps_its_best_epochs(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "data=synthetic",
        "data.num_classes=4",
        "data.image_size=32",
        "data.synthetic_train_images=32",
        "data.synthetic_val_images=64",
        "model=resnet18_nonorm",
        "trainer.batch_size=16",
        "trainer.epochs=4",
        "trainer.warmup_epochs=0",
        "trainer.device=cpu",
        "trainer.threads=1",
        "trainer.progress=false",
        "trainer.keep_best=2",
        "logger=none",
    ]
    summary = train_in_process(run_dir, *args)
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ranked = sorted(((r["val_top1"], r["epoch"]) for r in history), key=lambda r: -r[0])
    assert summary["best_epoch"] == ranked[0][1]
    assert _files(run_dir) == sorted([BEST, best_name(ranked[1][1])])
    assert checkpoint.load(run_dir / BEST)["epoch"] == ranked[0][1]
    assert checkpoint.load(run_dir / best_name(ranked[1][1]))["epoch"] == ranked[1][1]
