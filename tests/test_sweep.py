"""Sweeps through Hydra's submitit launcher, run for real by submitit's local executor on CPU.

The local executor is the SLURM launcher's stand-in: the same submitit job environment
(ranks from the job's tasks), pickled Hydra job and requeue protocol, in local processes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parents[1]


def submitit_env():
    """Jobs unpickle the task in a fresh interpreter: powergrad must be importable there (as
    after ``pip install -e .``); no wandb service inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_seed_sweep_of_two_rank_jobs_through_submitit_local(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2",  # each job: 2 ranks (gloo), ranks from submitit
            "method=pgt",
            "seed=0,1",
            "logger=wandb",
            "logger.mode=offline",
            f"logger.sync_dir={tmp_path / 'osh'}",
            "trainer.epochs=1",
            "trainer.warmup_epochs=0",
            "trainer.batch_size=128",
            "trainer.threads=1",
            "trainer.progress=false",
            "loader.workers=0",
        ],
        cwd=tmp_path,
        env=submitit_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One sweep directory: every job (another process each) landed in the one the launcher made.
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == [
        "0_pgt",
        "1_pgt",
        "compare.csv",
        "compare.json",
        "compare.md",
        "compare.png",
        "multirun.yaml",
    ]
    assert list(sweep.glob(".submitit/*/*_1_log.out"))  # rank 1 of a job ran as its own task
    runs = []
    for seed, job in enumerate(["0_pgt", "1_pgt"]):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["seed"] == seed
        assert summary["val_images"] == 360 and summary["epochs"] == 1
        run = read_offline_run(sweep / job)
        assert run["group"] == sweep.name and run["exit_code"] == 0
        runs.append(run)
    # wandb-osh hook: one command file per offline run, holding its directory.
    commands = sorted(p.read_text() for p in (tmp_path / "osh").glob("*.command"))
    assert commands == sorted(str(Path(r["files"][-1]).resolve()) for r in runs)
    # The seeds of one configuration share the job type (the dashboard averages them).
    assert runs[0]["job_type"] == runs[1]["job_type"]
    assert runs[0]["job_type"].startswith("resnet18 pgt a=0.25 cosine b128 ")
    table = json.loads((sweep / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in table["rows"]] == [("pgt", 0), ("pgt", 1)]
    # The two seeds are one configuration: one row of compare.md, n = 2.
    assert [(c["seeds"], c["n"]) for c in table["configurations"]] == [([0, 1], 2)]


# A sweep on tiny settings: 16 random 32x32 images, 1 epoch, no wandb (tests/test_experiments.py).
TINY = [
    "data=synthetic",
    "data.num_classes=10",
    "data.image_size=32",
    "data.synthetic_train_images=16",
    "data.synthetic_val_images=8",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.batch_size=8",
    "trainer.epochs=1",
    "trainer.warmup_epochs=0",
    "trainer.threads=1",
    "trainer.progress=false",
    "logger=none",
]


def test_sweep_config_runs_a_multirun_without_dash_m(tmp_path):
    """configs/sweep/*.yaml set hydra.mode=MULTIRUN: `+sweep=seeds` alone runs the three seeds
    (Hydra 1.3's CLI, as lightning-hydra-template's hparams_search configs), then compares them."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "+sweep=seeds", *TINY],
        cwd=tmp_path,
        env=submitit_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # no single run: the multirun's jobs only
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_baseline", "1_baseline", "2_baseline"]
    seeds = [json.loads((sweep / j / "summary.json").read_text())["seed"] for j in jobs]
    assert seeds == [0, 1, 2]
    # compare.md: the three seeds averaged in one row (seeds 0,1,2, n = 3).
    row = next(ln for ln in (sweep / "compare.md").read_text().splitlines() if "| baseline |" in ln)
    assert row.startswith("| resnet18 | cosine | 8 | 0,1,2 | 3 | baseline | - | ")
    assert " ± " in row and row in proc.stdout
    assert len((sweep / "compare.csv").read_text().splitlines()) == 1 + 3  # header + one per run


def test_sweep_group_is_listed_in_help():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: resnet18_alpha, resnet50_alpha, seeds" in proc.stdout


def test_help_says_how_sweep_is_typed():
    # The sweep group is appended, not chosen: Hydra's group=option line alone would mislead.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True
    )
    assert "+sweep=NAME" in proc.stdout and "no -m" in proc.stdout
