"""Checkpoint writes: background writes (checkpoint.Writer) hold the state as it was when save()
was called, land in order, and a failed write is raised, never lost; a resume finds the best
files that last.pt ranks, or stops claiming them."""

import pytest
import torch
from conftest import save_checkpoint
from torch import nn

from powergrad import checkpoint
from powergrad.checkpoint import BEST, LAST, TrainState, best_name, rank_best


def test_a_background_write_holds_the_state_of_its_save_call(tmp_path):
    model = nn.Linear(512, 512)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 512)).sum().backward()
    optimizer.step()
    writer = checkpoint.Writer()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = optimizer.state[model.weight]["momentum_buffer"].clone()
    state = TrainState(epoch=3, step=30)
    rank_best(state, 50.0, 3, keep=1)
    save_checkpoint(tmp_path, model, state, optimizer=optimizer, writer=writer, best=True)
    # Training goes on while the write is in flight: in-place updates and a new epoch.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    optimizer.state[model.weight]["momentum_buffer"].zero_()
    state.epoch, state.step = 4, 40
    state.history.append({"epoch": 4})
    writer.wait()
    last, best = checkpoint.load(tmp_path / LAST), checkpoint.load(tmp_path / BEST)
    for k, v in saved.items():
        assert torch.equal(last["model"][k], v) and torch.equal(best["model"][k], v)
    assert torch.equal(last["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert (last["epoch"], last["step"], last["history"], best["epoch"]) == (3, 30, [], 3)


def test_writes_land_in_order_and_the_latest_wins(tmp_path):
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = checkpoint.Writer()
    for epoch in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(epoch)
        save_checkpoint(
            tmp_path, model, TrainState(epoch=epoch), optimizer=optimizer, writer=writer
        )
    writer.wait()
    last = checkpoint.load(tmp_path / LAST)
    assert last["epoch"] == 5 and torch.all(last["model"]["weight"] == 5)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_is_raised_by_the_next_save_or_by_wait(tmp_path):
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = checkpoint.Writer()
    gone = tmp_path / "removed-run-dir"  # the write itself fails, on the writer's thread
    # Returns at once.
    save_checkpoint(gone, model, TrainState(epoch=1), optimizer=optimizer, writer=writer)
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path, model, TrainState(epoch=2), optimizer=optimizer, writer=writer)
    assert not (tmp_path / LAST).exists()  # training stops: the failed write is not skipped
    save_checkpoint(gone, model, TrainState(epoch=3), optimizer=optimizer, writer=writer)
    with pytest.raises(FileNotFoundError):
        writer.wait()
    writer.wait()  # reported once


def _epoch_end(run_dir, model, state, epoch, top1, *, keep, write_best=True):
    """The save at the end of ``epoch`` (weights filled with ``epoch``); ``write_best=False``
    leaves the files as a kill between last.pt and the best file's write leaves them."""
    with torch.no_grad():
        model.weight.fill_(epoch)
    state.epoch, state.batch, state.step = epoch, 0, 10 * epoch
    ranks = rank_best(state, top1, epoch, keep)
    save_checkpoint(run_dir, model, state, best=ranks and write_best)


def _held(path):
    weights = checkpoint.load(path)
    return weights["epoch"], float(weights["model"]["weight"][0, 0])


def test_a_resume_rebuilds_the_best_files_last_pt_ranks(tmp_path, capsys):
    model, state = nn.Linear(4, 4), TrainState()
    _epoch_end(tmp_path, model, state, 1, 50.0, keep=2)
    _epoch_end(tmp_path, model, state, 2, 60.0, keep=2, write_best=False)
    assert _held(tmp_path / BEST) == (1, 1.0)  # last.pt ranks epoch 2 first, best.pt holds 1
    ckpt = checkpoint.load_for_resume(tmp_path)
    checkpoint.agree_best(tmp_path, ckpt)
    assert ckpt["best_checkpoints"] == [[60.0, 2], [50.0, 1]] and ckpt["best_epoch"] == 2
    assert _held(tmp_path / BEST) == (2, 2.0)
    assert _held(tmp_path / best_name(1)) == (1, 1.0)
    assert "best.pt: rebuilt from last.pt" in capsys.readouterr().err


def test_a_resume_forgets_a_best_whose_weights_exist_nowhere(tmp_path, capsys):
    model, state = nn.Linear(4, 4), TrainState()
    for epoch, top1 in ((1, 50.0), (2, 60.0), (3, 55.0)):
        _epoch_end(tmp_path, model, state, epoch, top1, keep=2)
    assert {p.name for p in tmp_path.glob("best*.pt")} == {BEST, best_name(3)}
    state.batch, state.step = 1, 31  # a mid-epoch last.pt: epoch 2's weights are not in it
    save_checkpoint(tmp_path, model, state)
    data = (tmp_path / BEST).read_bytes()
    (tmp_path / BEST).write_bytes(data[: len(data) // 2])  # truncated (disk, or by hand)
    ckpt = checkpoint.load_for_resume(tmp_path)
    checkpoint.agree_best(tmp_path, ckpt)
    # Epoch 2 is no longer claimed; the runner-up, epoch 3, is the best and is best.pt.
    assert ckpt["best_checkpoints"] == [[55.0, 3]]
    assert (ckpt["best_epoch"], ckpt["best_val_top1"]) == (3, 55.0)
    assert _held(tmp_path / BEST) == (3, 3.0) and not (tmp_path / best_name(3)).exists()
    err = capsys.readouterr().err
    assert "epoch 2" in err and "no longer counted" in err
