"""Fine-tuning: model.init=PATH (ours or timm-format, head reset on a class change) and the
model.pretrained=true refusal when no local timm weights exist (no network here)."""

import argparse

import pytest
import torch
from conftest import compose_train, tiny, train_in_process

from powergrad.checkpoint import CheckpointError, init_weights
from powergrad.config import ConfigError, validate_train
from powergrad.models import build_model

TINY = tiny("model=resnet18")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("source") / "run"
    train_in_process(run_dir, *TINY)
    return run_dir


def _equal(a, b, skip=()):
    return all(torch.equal(v, b[k]) for k, v in a.items() if not k.startswith(skip))


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_init_from_our_checkpoint_loads_every_weight(trained, name):
    saved = torch.load(trained / name, weights_only=True)["model"]
    model = build_model("resnet18", 4)
    assert not init_weights(model, trained / name)
    assert _equal(model.state_dict(), saved)


def test_a_class_change_resets_only_the_head(trained, tmp_path):
    saved = torch.load(trained / "last.pt", weights_only=True)["model"]
    # timm's training format: DDP prefixes and an argparse.Namespace beside the weights.
    timm_file = tmp_path / "model_best.pth.tar"
    state = {f"module.{k}": v for k, v in saved.items()}
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1), "epoch": 2}, timm_file)
    model = build_model("resnet18", 10)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    assert init_weights(model, timm_file)
    got = model.state_dict()
    assert _equal(got, saved, skip=("fc.",))
    assert _equal(fresh_head, got) and got["fc.weight"].shape == (10, 512)


def test_wrong_architecture_is_refused_by_name(trained):
    with pytest.raises(CheckpointError, match="checkpoint looks like resnet18"):
        init_weights(build_model("resnet50", 4), trained / "last.pt")


def test_a_run_fine_tunes_from_another_runs_weights(trained, tmp_path, capsys):
    args = tiny("model=resnet18", f"model.init={trained / 'best.pt'}", "data.num_classes=6")
    summary = train_in_process(tmp_path / "tuned", *args)
    assert summary["epochs"] == 2
    assert "classifier re-initialised for 6 classes" in capsys.readouterr().out
    tuned = torch.load(tmp_path / "tuned" / "last.pt", weights_only=True)
    assert tuned["model"]["fc.weight"].shape == (6, 512)


def test_init_and_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        validate_train(compose_train(f"model.init={tmp_path / 'missing.pt'}"), 1)
    # timm has no weights for the BN-free ResNet-18: never available, network or not.
    with pytest.raises(ConfigError, match="no local timm weights for model=resnet18_nonorm"):
        validate_train(compose_train("model=resnet18_nonorm", "model.pretrained=true"), 1)
    (tmp_path / "w.pt").write_bytes(b"")
    both = compose_train(f"model.init={tmp_path / 'w.pt'}", "model.pretrained=true")
    with pytest.raises(ConfigError, match="pick one"):
        validate_train(both, 1)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        init_weights(build_model("resnet18", 4), tmp_path / "w.pt")
