"""The config tree composes with real Hydra, and bad configs fail early with clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from powergrad.config import (
    ConfigError,
    default_run_dir,
    register_configs,
    validate_eval,
    validate_train,
)
from powergrad.method import method_label
from powergrad.models import MODEL_NAMES
from powergrad.optim import milestone_epochs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

register_configs()


def _compose(*overrides, name="train"):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_default_is_the_cpu_main_job_on_digits():
    cfg = _compose()
    validate_train(cfg, world_size=1)
    method = method_label(cfg.method.alpha, cfg.method.clip_mode)
    assert (cfg.model.name, method, cfg.sched.name) == ("resnet18", "baseline", "cosine")
    assert cfg.method.alpha is None
    assert cfg.data.name == "digits" and cfg.data.image_size == 32
    assert cfg.trainer.device == "auto" and cfg.trainer.precision == "fp32"
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "auto"
    assert OmegaConf.is_struct(cfg)


# The paper's Method column: file name -> (uses PGT, clip mode).
METHODS = {
    "baseline": (False, "none"),
    "pgt": (True, "none"),
    "gc": (False, "norm"),
    "agc": (False, "agc"),
    "gc_pgt": (True, "norm"),
    "agc_pgt": (True, "agc"),
}


def test_the_method_files_are_the_papers_method_column():
    assert sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml")) == sorted(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_composes_and_its_derived_label_is_its_file_name(method):
    cfg = _compose(f"method={method}")
    validate_train(cfg, world_size=1)
    uses_pgt, clip_mode = METHODS[method]
    assert method_label(cfg.method.alpha, cfg.method.clip_mode) == method
    assert (cfg.method.alpha is not None) == uses_pgt
    assert cfg.method.clip_mode == clip_mode
    assert "name" not in cfg.method  # derived, never stored beside the values


def test_pgt_default_alpha_is_the_papers_resnet18_value():
    assert _compose("method=pgt").method.alpha == 0.25


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_model_config_composes(model):
    cfg = _compose(f"model={model}")
    validate_train(cfg, world_size=1)
    assert cfg.model.name == model


def test_paper_trainer_and_step_schedule():
    cfg = _compose("trainer=paper", "sched=step")
    if torch.cuda.is_available():
        validate_train(cfg, world_size=4)
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            validate_train(cfg, world_size=4)
    t = cfg.trainer
    assert (t.batch_size, t.epochs, t.warmup_epochs, t.precision) == (1024, 100, 5, "fp16")
    assert milestone_epochs(list(cfg.sched.milestones), t.epochs) == [30, 60, 90]
    assert cfg.optim.lr_per_256 == 0.1 and cfg.optim.nesterov is True


def test_authors_readme_schedule_composes():
    # The authors' README: 90 cosine epochs + 10 cooldown at the parser's min-lr 1e-4.
    cfg = _compose(
        "trainer=paper", "trainer.device=cpu", "trainer.precision=fp32", "recipe=authors_code"
    )
    validate_train(cfg, world_size=4)
    s = cfg.sched
    assert (s.name, s.cooldown_epochs, s.min_lr, cfg.trainer.epochs) == ("cosine", 10, 1e-4, 100)


def test_public_overrides_reach_the_config(tmp_path):
    cfg = _compose(
        "method=pgt",
        "method.alpha=0.05",
        "method.label_smoothing=0.1",
        "sched=step",
        "loader=dali",
        "trainer.epochs=10",
        "trainer.batch_size=256",
        "trainer.precision=bf16",
        "seed=3",
        "logger=none",
        "data=imagenet",
        f"data.root={tmp_path}",
    )
    validate_train(cfg, world_size=2)
    assert cfg.method.alpha == 0.05 and cfg.method.label_smoothing == 0.1
    assert cfg.loader.backend == "dali" and cfg.data.name == "imagenet"
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.seed) == (10, 256, 3)
    assert cfg.logger.name == "none"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model=resnet1800", "model/resnet1800"),
        ("method=pgtt", "method/pgtt"),
        ("data=cifar", "data/cifar"),
    ],
)
def test_unknown_group_option_is_named(override, needle):
    with pytest.raises(MissingConfigException, match=needle):
        _compose(override)


def test_misspelled_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="epoch"):
        _compose("trainer.epoch=3")
    with pytest.raises(ConfigCompositionException, match="alpah"):
        _compose("method.alpah=0.3")


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="alpha"):
        _compose("method=pgt", "method.alpha=abc")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.name=vit"], "model.name='vit'"),
        (["method=pgt", "method.alpha=1.5"], "out of range"),
        (["method=pgt", "method.alpha=-0.1"], "out of range"),
        (["method=gc", "method.clip_mode=clip"], "method.clip_mode='clip'"),
        (["method=pgt", "method.clip_mode=agc"], "needs method.clip_threshold"),
        (["method=agc", "method.clip_threshold=0"], "needs method.clip_threshold"),
        (["method.label_smoothing=1.0"], "label_smoothing"),
        (["trainer.precision=fp16", "trainer.device=cpu"], "fp16 needs CUDA"),
        (["trainer.precision=fp64"], "precision='fp64'"),
        (["data=imagenet"], "data.root=DIR"),
        (["data=imagenet", "data.root=/no/such/dir"], "no such directory"),
        (["trainer.warmup_epochs=30"], "warmup_epochs"),
        (["sched=step", "sched.milestones=[1.5]"], "fraction"),
        (["recipe=authors_code", "trainer.epochs=10"], "cooldown_epochs=10"),
        (["logger.mode=sometimes"], "logger.mode"),
        # Checked by DataConfig / LoaderConfig or torch only once the run dir was claimed
        # (a traceback, and the run's files left behind) before validate_train checked them.
        (["data.on_bad_file=maybe"], "data.on_bad_file='maybe'"),
        (["data.image_size=0"], "data.image_size=0: must be positive"),
        (["loader.prefetch=0"], "loader.prefetch=0"),
        (["seed=-1"], "seed=-1: must be in"),
        # BatchNorm cannot train on one image per rank and step (a traceback in step 1).
        (["trainer.batch_size=1"], "model=resnet18 has BatchNorm"),
        (["trainer.batch_size=4", "trainer.accum_steps=4"], "1 image per rank and step"),
        (["data.bad_files=/no/such.tsv"], "data.bad_files=/no/such.tsv: no such file"),
    ],
)
def test_bad_values_raise_config_error(overrides, needle):
    cfg = _compose(*overrides)
    with pytest.raises(ConfigError, match=needle):
        validate_train(cfg, world_size=1)


def test_one_image_per_rank_is_refused_only_with_batch_norm():
    with pytest.raises(ConfigError, match=r"trainer.batch_size=2 / \(world size 2 x"):
        validate_train(_compose("trainer.batch_size=2"), world_size=2)
    validate_train(_compose("model=resnet18_nonorm", "trainer.batch_size=1"), world_size=1)
    validate_train(_compose("trainer.batch_size=2"), world_size=1)


def test_dataset_files_are_checked_before_the_run_starts(tmp_path):
    """A data.root that is a file; a bad-file manifest that is not text (was: a traceback of
    the loaders after the run directory was claimed)."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"data.root=.*file: a file, not a folder"):
        validate_train(_compose(f"data.root={tmp_path / 'file'}"), world_size=1)
    (tmp_path / "bad_files.tsv").write_bytes(b"\xff\xfe binary")
    with pytest.raises(ConfigError, match=f"manifest {tmp_path / 'bad_files.tsv'} is not"):
        validate_train(_compose(f"data.root={tmp_path}"), world_size=1)


def test_global_batch_must_divide_by_world_size():
    cfg = _compose("trainer.batch_size=100")
    validate_train(cfg, world_size=4)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        validate_train(cfg, world_size=3)


def test_eval_config_requires_an_existing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint=PATH"):
        validate_eval(_compose(name="eval"))
    with pytest.raises(ConfigError, match="no such file"):
        validate_eval(_compose(f"checkpoint={tmp_path}/x.pt", name="eval"))
    with pytest.raises(ConfigError, match=f"checkpoint={tmp_path}: a folder, not a file"):
        validate_eval(_compose(f"checkpoint={tmp_path}", name="eval"))
    weights = tmp_path / "w.pth.tar"
    weights.write_bytes(b"")
    validate_eval(_compose(f"checkpoint={weights}", "model=resnet50", name="eval"))


def test_run_dirs_differ_between_processes_started_together():
    code = "from powergrad.config import default_run_dir; print(default_run_dir())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    dirs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(d.startswith("outputs/") for d in dirs)
    assert len(set(dirs)) == 3
    # Within one process the directory is fixed, however often Hydra resolves it.
    assert default_run_dir() == default_run_dir()
