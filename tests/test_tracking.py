"""Tracker: real offline wandb runs read back from disk, metrics.jsonl, summary.json."""

import json
import os
import socket
import threading
import time

import pytest
from conftest import TINY as CONFTEST_TINY
from conftest import compose_train, run_train, tiny, train_in_process
from omegaconf import OmegaConf
from wandb_offline import read_offline_run

from powergrad.config import ConfigError, validate_train
from powergrad.tracking import (
    Tracker,
    best_so_far,
    have_wandb_credentials,
    run_name,
    wandb_epoch_keys,
    wandb_summary_keys,
)


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
    tracker.write_summary(
        {"val_top1": 42.0, "val_top1_final": 42.0, "train_top1": 52.0, "logit_norm": float("nan")}
    )
    tracker.finish(exit_code=0)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {
        "val_top1": 42.0,
        "val_top1_final": 42.0,
        "train_top1": 52.0,
        "logit_norm": None,
    }

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
    # One name per metric in the wandb summary: the history's (summary.json keeps flat keys).
    assert run["summary"]["val/top1"] == {"max": 42.0, "last": 42.0}
    assert run["summary"]["val/top1_final"] == 42.0
    assert run["summary"]["train/top1"] == 52.0
    assert not {"val_top1", "train_top1", "logit_norm"} & set(run["summary"])
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


def test_best_val_top1_is_in_the_wandb_summary_while_the_run_goes(tmp_path):
    tracker = Tracker(tmp_path, {}, _logger(), name="resnet18-pgt-a0.25-cosine-s3")
    history = []
    for epoch, top1 in ((1, 30.0), (2, 45.0), (3, 40.0)):
        history.append({"epoch": epoch, "val_top1": top1})
        tracker.log_epoch(history)
    # No write_summary: the run is still going (or was killed).
    tracker.finish(exit_code=1)
    run = read_offline_run(tmp_path)
    assert run["name"] == "resnet18-pgt-a0.25-cosine-s3"
    assert run["summary"]["val/top1"] == {"max": 45.0, "last": 40.0}
    assert run["summary"]["best/val_top1"] == 45.0 and run["summary"]["best/epoch"] == 2
    rows = [h for h in run["history"] if "best/epoch" in h]
    assert [(h["epoch"], h["best/epoch"]) for h in rows] == [(1, 1), (2, 2), (3, 2)]


def test_summary_and_best_names():
    assert best_so_far([{"epoch": 1}]) == {}
    assert best_so_far([{"epoch": 1, "val_top1": 5.0}, {"epoch": 2, "val_top1": 5.0}]) == {
        "best/val_top1": 5.0,
        "best/epoch": 1,
    }
    keys = wandb_summary_keys(
        {
            "model": "resnet18",
            "val_top1": 1.0,
            "best_val_top1": 2.0,
            "val_top1_best": 2.0,
            "best_epoch": 4,
            "val_top5": 3.0,
            "train_loss": 0.5,
            "logit_norm": 9.0,
            "train_images": 100,
            "steps": 7,
        }
    )
    assert keys == {
        "model": "resnet18",
        "best/val_top1": 2.0,
        "best/epoch": 4,
        "val/top5": 3.0,
        "train/loss": 0.5,
        "val/logit_norm": 9.0,
        "train_images": 100,
        "steps": 7,
    }
    config = {
        "model": {"name": "resnet50"},
        "method": {"alpha": None, "clip_mode": "agc", "impl": "exact"},
        "sched": {"name": "step"},
        "seed": 2,
    }
    assert run_name(config) == "resnet50-agc-step-s2"
    config["method"]["alpha"] = 0.25
    assert run_name(config) == "resnet50-agc_pgt-a0.25-step-s2"


TINY = [
    *(o for o in CONFTEST_TINY if o not in ("logger=none",)),
    "logger=wandb",
    "logger.mode=offline",
]


@pytest.mark.parametrize("kind", ["best", "last"])
def test_a_run_names_itself_shares_its_job_type_and_uploads_its_checkpoint(tmp_path, kind):
    from powergrad.tracking import config_key

    run_dir = tmp_path / "run"
    extra = ["method=pgt", "seed=3", f"logger.log_checkpoints={kind}"]
    summary = train_in_process(run_dir, *TINY, *extra)
    run = read_offline_run(run_dir)
    assert run["name"] == "resnet18_nonorm-pgt-a0.25-cosine-s3"
    # Not a multirun, yet the job type is the configuration key: seed 4 launched apart shares it.
    config = {k: v for k, v in run["config"].items() if k != "git_sha"}
    assert run["job_type"] == config_key(config) == config_key({**config, "seed": 4})
    assert run["job_type"].startswith("resnet18_nonorm pgt a=0.25 cosine b16 ")
    (artifact,) = run["artifacts"]
    assert artifact["type"] == "model" and artifact["name"] == f"model-{run['id']}"
    assert sorted(artifact["aliases"]) == sorted([kind, "latest"])
    assert list(artifact["files"]) == [f"{kind}.pt"]
    assert artifact["metadata"]["val_top1_best"] == summary["val_top1_best"]
    assert "val_top1" not in run["summary"] and "val/top1" in run["summary"]
    assert json.loads((run_dir / "summary.json").read_text())["val_top1"] == summary["val_top1"]


def _fresh_clone_env(tmp_path, **extra):
    """This process's environment without wandb credentials, mode or service."""
    drop = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SERVICE", "WANDB_BASE_URL")
    netrc = tmp_path / "empty_netrc"
    netrc.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "NETRC": str(netrc), **extra}


def test_online_without_credentials_is_refused_in_one_line_leaving_nothing(tmp_path):
    started = time.monotonic()
    env = _fresh_clone_env(tmp_path, WANDB_MODE="online")
    proc = run_train([*tiny("logger=wandb")], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith(
        "error: WANDB_MODE=online but no wandb credentials"
    )
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "outputs").rglob("*"))  # no run directory, no wandb folder
    assert time.monotonic() - started < 110


def test_online_by_config_or_a_bad_wandb_mode_is_a_config_error(no_credentials, monkeypatch):
    with pytest.raises(ConfigError, match=r"^logger\.mode=online but no wandb credentials"):
        validate_train(compose_train(*tiny("logger=wandb", "logger.mode=online")))
    validate_train(compose_train(*tiny("logger=wandb", "logger.mode=auto")))  # offline instead
    with pytest.raises(ConfigError, match=r"^logger\.init_timeout_s=0\.0: must be > 0"):
        validate_train(compose_train(*tiny("logger=wandb", "logger.init_timeout_s=0")))
    monkeypatch.setenv("WANDB_MODE", "onlin")
    with pytest.raises(ConfigError, match=r"^WANDB_MODE='onlin': wandb accepts online, offline"):
        validate_train(compose_train(*tiny("logger=wandb")))


@pytest.fixture
def silent_server():
    """A local port that accepts connections and never answers: a wandb host out of reach."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at teardown
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


def test_unreachable_wandb_server_falls_back_to_offline_within_the_timeout(
    tmp_path, silent_server, monkeypatch, capsys
):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb.teardown()  # wandb reads its environment once per set-up of the process
    try:
        started = time.monotonic()
        tracker = Tracker(tmp_path, {"a": 1}, _logger(mode="online", init_timeout_s=2))
        waited = time.monotonic() - started
        tracker.log_epoch([{"epoch": 1, "val_top1": 5.0}])
        tracker.finish(exit_code=0)
    finally:
        wandb.teardown()  # the next test's wandb takes its own environment
    (offline,) = tmp_path.glob("wandb/offline-run-*")
    (warning,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert warning.startswith("warning: wandb could not start an online run within 2 s (")
    assert silent_server in warning  # it asked the server it was given
    assert warning.endswith(f"logging offline instead, upload later with `wandb sync {offline}`")
    assert waited < 60  # 2 s, plus starting wandb's service
    run = read_offline_run(tmp_path)
    assert run["id"] == tracker.run_id and run["exit_code"] == 0
    assert [h["epoch"] for h in run["history"] if "val/top1" in h] == [1]
