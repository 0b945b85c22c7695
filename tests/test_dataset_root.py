"""The ImageNet root once per machine: data.root of configs/data/imagenet.yaml defaults from
$POWERGRAD_IMAGENET; without either, the run stops naming both (issue 13 item 8)."""

import os

import pytest
from conftest import compose_train, run_train
from omegaconf import OmegaConf

from powergrad.config import ConfigError, register_configs, validate_train

register_configs()  # the typed schema (train_schema) that configs/train.yaml composes onto
ENV = "POWERGRAD_IMAGENET"


def _imagenet_folder(root):
    for split in ("train", "val"):
        (root / split / "n01440764").mkdir(parents=True)
    return root


def test_root_defaults_from_the_environment(monkeypatch, tmp_path):
    root = _imagenet_folder(tmp_path / "imagenet")
    monkeypatch.setenv(ENV, str(root))
    cfg = compose_train("data=imagenet")
    assert cfg.data.root == str(root)
    validate_train(cfg, world_size=1)
    # The saved config (config.yaml) holds the folder itself, not the interpolation.
    assert OmegaConf.to_container(cfg, resolve=True)["data"]["root"] == str(root)
    # data.root=DIR on the command line wins over the variable.
    assert compose_train("data=imagenet", "data.root=/elsewhere").data.root == "/elsewhere"


def test_missing_root_names_both_ways(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    cfg = compose_train("data=imagenet")
    assert cfg.data.root is None
    with pytest.raises(ConfigError, match=rf"pass data\.root=DIR, or set {ENV}=DIR"):
        validate_train(cfg, world_size=1)


def test_variable_naming_no_folder_says_where_the_root_came_from(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=rf"nowhere \(from {ENV}\): no such directory"):
        validate_train(compose_train("data=imagenet"), world_size=1)


def test_cli_error_without_root(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = run_train(["data=imagenet", "logger=none"], cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert f"data=imagenet needs its folder: pass data.root=DIR, or set {ENV}=DIR" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/*/*/config.yaml"))


def test_a_root_with_a_tilde_is_the_home_folder(monkeypatch, tmp_path):
    """data.root='~/imagenet' (quoted: the shell leaves ~ alone): validate_train accepted it,
    then the loaders looked for a folder literally named ~ (after the run dir was claimed)."""
    from powergrad.data import LoaderConfig, Shard, build_loaders
    from powergrad.data.generate import write_image_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "imagenet", classes=2, train_per_class=2, val_per_class=1,
                       size=(40, 30))  # fmt: skip
    cfg = compose_train("data=imagenet", "data.root='~/imagenet'", "loader=torch")
    validate_train(cfg, world_size=1)
    loaders = build_loaders(OmegaConf.to_object(cfg.data), LoaderConfig("torch", 0), Shard(2))
    assert loaders.train_images == 4 and loaders.val_images == 2
