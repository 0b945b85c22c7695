"""Background checkpoint writes (checkpoint.Writer): the files hold the state as it was when
save() was called, writes land in order, and a failed write is raised, never lost."""

import pytest
import torch
from conftest import save_checkpoint
from torch import nn

from powergrad import checkpoint
from powergrad.checkpoint import BEST, LAST, TrainState, rank_best


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
