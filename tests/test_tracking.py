"""Tracker: real offline wandb runs read back from disk, metrics.jsonl, summary.json."""

import json

import pytest
from omegaconf import OmegaConf
from wandb_offline import read_offline_run

from powergrad.tracking import Tracker, have_wandb_credentials, wandb_epoch_keys


def _logger(**kw):
    base = {
        "name": "wandb",
        "project": "powergrad-test",
        "entity": None,
        "mode": "offline",
        "group": None,
        "job_type": "train",
        "tags": ["extra"],
    }
    return OmegaConf.create({**base, **kw})


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No API key, no netrc, no WANDB_MODE: the situation of a fresh clone."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))


def test_credentials_detection(no_credentials, monkeypatch, tmp_path):
    assert not have_wandb_credentials()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    netrc.chmod(0o600)
    assert have_wandb_credentials()
    netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert have_wandb_credentials()


def test_offline_run_logs_config_tags_history_and_summary(no_credentials, tmp_path, capsys):
    config = {"model": {"name": "resnet18"}, "method": {"name": "pgt", "alpha": 0.25}, "seed": 0}
    tracker = Tracker(
        tmp_path,
        config,
        _logger(mode="auto"),
        tags=["model:resnet18", "method:pgt", "alpha:0.25"],
        group="sweep-1",
    )
    assert "logging offline" in capsys.readouterr().out
    history = []
    for epoch in (1, 2):
        tracker.log_step(epoch * 10, {"loss": 1.0 / epoch, "lr": 0.1})
        history.append(
            {"epoch": epoch, "lr": 0.1, "train_top1": 50.0 + epoch, "val_top1": 40.0 + epoch}
        )
        tracker.log_epoch(history)
    tracker.write_summary({"val_top1": 42.0, "train_top1": 52.0, "logit_norm": float("nan")})
    tracker.finish(exit_code=0)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"val_top1": 42.0, "train_top1": 52.0, "logit_norm": None}

    run = read_offline_run(tmp_path)
    assert run["id"] == tracker.run_id
    assert run["config"] == config
    assert set(run["tags"]) == {"model:resnet18", "method:pgt", "alpha:0.25", "extra"}
    assert run["group"] == "sweep-1" and run["job_type"] == "train"
    epochs = [h for h in run["history"] if "val/top1" in h]
    assert [(h["epoch"], h["val/top1"], h["train/top1"]) for h in epochs] == [
        (1, 41.0, 51.0),
        (2, 42.0, 52.0),
    ]
    steps = [h for h in run["history"] if "step/loss" in h]
    assert [h["trainer/step"] for h in steps] == [10, 20]
    assert run["summary"]["val_top1"] == 42.0
    assert run["exit_code"] == 0


def test_failed_run_is_marked_with_exit_code_1(tmp_path):
    tracker = Tracker(tmp_path, {"a": 1}, _logger())
    tracker.finish(exit_code=1)
    assert read_offline_run(tmp_path)["exit_code"] == 1


def test_disabled_rank_and_logger_none_write_nothing_to_wandb(tmp_path):
    silent = Tracker(tmp_path / "r1", {}, _logger(), enabled=False)
    silent.log_epoch([{"epoch": 1}])
    silent.write_summary({"x": 1})
    assert not (tmp_path / "r1").exists()
    (tmp_path / "r0").mkdir()
    files_only = Tracker(tmp_path / "r0", {}, _logger(name="none", mode="disabled"))
    files_only.log_epoch([{"epoch": 1, "val_top1": 3.0}])
    files_only.finish()
    assert (tmp_path / "r0" / "metrics.jsonl").exists()
    assert not (tmp_path / "r0" / "wandb").exists()


def test_epoch_keys_are_grouped_into_wandb_panels():
    keys = wandb_epoch_keys(
        {"epoch": 3, "lr": 0.1, "train_loss": 1.0, "val_logit_norm": 4.0, "images_per_s": 9.0}
    )
    assert keys == {
        "epoch": 3,
        "train/lr": 0.1,
        "train/loss": 1.0,
        "val/logit_norm": 4.0,
        "perf/images_per_s": 9.0,
    }


def test_filter_norm_records_after_the_resume_step_are_dropped(tmp_path):
    tracker = Tracker(tmp_path, {}, _logger(name="none", mode="disabled"))
    for step in (10, 20, 30):
        tracker.log_filter_norms({"step": step, "zeroed": 0, "layers": []})
    tracker.truncate_filter_norms(20)
    lines = (tmp_path / "filter_norms.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20]
