"""The command line checked before Hydra starts (powergrad.command_line): every group option,
key, type and value of every job of a run or sweep, refused in one line, exit 2, nothing written.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_train, tiny

from powergrad.command_line import check_command_line
from powergrad.config import (
    ConfigError,
    EvalConfig,
    TrainConfig,
    register_configs,
    validate_eval,
    validate_train,
)

register_configs()
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def check(*argv):
    check_command_line(CONFIGS, "train", argv, schema=TrainConfig, validate=validate_train)


def check_eval(*argv):
    check_command_line(CONFIGS, "eval", argv, schema=EvalConfig, validate=validate_eval)


def refused(*argv, line=check):
    with pytest.raises(ConfigError) as err:
        line(*argv)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # Was silently ignored (`optional experiment`): the default digits run trained.
        (
            ["experiment=t1_resnet50_cosine_pgtt"],
            "experiment has no option 't1_resnet50_cosine_pgtt'; did you mean "
            "t1_resnet50_cosine_pgt? valid: fig3c_resnet50_pgt, t1_resnet101_cosine_baseline, ",
        ),
        (["model=resnet5"], "did you mean resnet50? valid: resnet101, resnet18, resnet18_nonorm"),
        (["method=pgtt"], "method has no option 'pgtt'; did you mean pgt?"),
        (["data=imagenett"], "data has no option 'imagenett'"),
        (["loader=dalli"], "loader has no option 'dalli'"),
        (["sched=cosin"], "sched has no option 'cosin'"),
        (["recipe=paper"], "recipe has no option 'paper'"),
        (["trainer=papr"], "trainer has no option 'papr'"),
        (["logger=wandbb"], "logger has no option 'wandbb'"),
        (["optim=adam"], "optim has no option 'adam'; valid: sgd"),
        (["+sweep=seed"], "sweep has no option 'seed'; did you mean seeds?"),
        (["-m", "hydra/launcher=slurmm"], "hydra/launcher has no option 'slurmm'"),
        # Each value of a sweep, before any job.
        (["-m", "method=baseline,pgtt"], "method has no option 'pgtt'"),
        (["-m", "model=glob(zz*)"], "model=glob(zz*): matches no option"),
    ],
)
def test_every_group_option_is_checked_with_the_valid_names(argv, needle):
    assert needle in refused(*argv)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["model.nmae=x"], "model.nmae: no such key (Key 'nmae' not in 'ModelConfig'); did "),
        (["model.nmae=x"], "; did you mean model.name?"),
        (["modle=resnet18"], "modle: no such key (Key 'modle' not in 'TrainConfig'); did you "),
        # Hydra's own message suggests the +; the key is then added and never read.
        (["+model.nmae=x"], "model.nmae: no such key in the config"),
        (["trainer.epochs=abc"], "trainer.epochs: Value 'abc' of type 'str' could not be"),
        (["logger.tags=abc"], "logger.tags: Invalid value assigned"),
        (["data.root=~/x"], "data.root=~/x: not a valid override (quote"),
        (["model=resnet18,resnet50"], "several values run a sweep, add -m"),
        (["-m", "hydra.launcher.partition=gpu"], "hydra.launcher.partition: no such key"),
    ],
)
def test_keys_types_and_syntax_are_one_line(argv, needle):
    assert needle in refused(*argv)


def test_every_job_of_a_sweep_is_validated_before_the_first_runs():
    # Was: job 0 trained to the end, then job 1 stopped.
    assert "method.alpha=1.5 is out of range" in refused("-m", "method=pgt", "method.alpha=0.5,1.5")
    # A sweep file's values (+sweep=seeds: seed=0,1,2) are crossed with the command line's.
    assert "has BatchNorm" in refused("+sweep=seeds", "trainer.batch_size=2,1")
    # Jobs that run elsewhere (SLURM) are checked for names, keys and types only: the login
    # node that launches them may have neither the GPU nor the data.
    check("-m", "hydra/launcher=slurm", "trainer.device=cuda", "data=imagenet", "seed=0,1")
    assert "no option 'resnet5'" in refused("-m", "hydra/launcher=slurm", "model=resnet18,resnet5")


def test_valid_command_lines_pass(tmp_path):
    check()
    check("-m", "method=baseline,pgt")
    check("+sweep=seeds", "method=pgt")
    check("--cfg", "job", "experiment=t1_resnet18_cosine_pgt")  # prints only: no job to validate
    check("model=resnet18_nonorm", "trainer.batch_size=1", "data.root='~'")
    weights = tmp_path / "w.pth.tar"
    weights.write_bytes(b"")
    check_eval(f"checkpoint={weights}", "model=resnet50")
    assert "model has no option 'resnet5'" in refused(
        f"checkpoint={weights}", "model=resnet5", line=check_eval
    )


def test_the_entry_points_refuse_in_one_line_and_write_nothing(tmp_path):
    """train.py -m with one bad value among good ones; eval.py with a misspelled model."""
    sweep = run_train(["-m", *tiny("method=pgt", "method.alpha=0.5,1.5")], cwd=tmp_path)
    assert sweep.returncode == 2, sweep.stderr[-2000:]
    assert sweep.stderr == "error: method.alpha=1.5 is out of range: PGT needs 0 <= alpha <= 1\n"
    evaluation = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "checkpoint=x.pt", "model=resnet5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluation.returncode == 2 and evaluation.stderr.count("\n") == 1
    assert evaluation.stderr.startswith("error: model=resnet5: model has no option 'resnet5'")
    assert list(tmp_path.iterdir()) == []  # no multirun/ folder, no multirun.yaml
