"""train.py as users run it: the main job's multirun, run directories, and clear CLI errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_train, tiny
from wandb_offline import read_offline_run

from powergrad.method import method_label

ROOT = Path(__file__).resolve().parents[1]
# The default job, shrunk to seconds: 1 epoch of 22 steps at batch 64, one CPU thread.
SMALL = [
    "trainer.epochs=1",
    "trainer.warmup_epochs=0",
    "trainer.batch_size=64",
    "trainer.threads=1",
    "loader.workers=0",
]


def _env(tmp_path, **extra):
    """The environment of a fresh clone: no wandb credentials, mode or service."""
    drop = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    netrc = tmp_path / "empty_netrc"
    netrc.write_text("")
    return {**env, "NETRC": str(netrc), **extra}


@pytest.mark.slow
def test_main_job_multirun_prints_and_writes_the_comparison(tmp_path):
    proc = run_train(["-m", "method=baseline,pgt", *SMALL], cwd=tmp_path, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0_baseline", "1_pgt"]

    # stderr is a pipe: no progress bar, but step and epoch lines (the powergrad logger, on
    # stdout and in each run's train.log), the wandb offline notice, then the table.
    assert "\r" not in proc.stderr and "epoch 1/1 done: step 22 loss" in proc.stdout
    assert "logging offline" in proc.stdout
    header = (
        "| model | sched | batch | seed | n | method | alpha | train top-1 % | val top-1 % | "
        "train loss | val loss | logit norm | wall s |"
    )
    assert header in proc.stdout
    # One row per configuration (here one seed each): model, schedule, batch, seeds, n, method.
    rows = [
        ln for ln in proc.stdout.splitlines() if ln.startswith("| resnet18 | cosine | 64 | 0 |")
    ]
    assert len(rows) == 2 and rows[1].startswith("| resnet18 | cosine | 64 | 0 | 1 | pgt | 0.25 |")
    assert (sweep / "compare.md").read_text().startswith(header)
    table = json.loads((sweep / "compare.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["baseline", "pgt"]
    assert len((sweep / "compare.csv").read_text().splitlines()) == 1 + 2  # one row per run
    assert table["total_wall_s"] > 0
    assert (sweep / "compare.png").read_bytes()[:4] == b"\x89PNG"

    for job in jobs:
        run_dir = sweep / job
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["val_images"] == 360 and summary["epochs"] == 1
        assert (run_dir / "last.pt").exists() and (run_dir / "config.yaml").exists()
        run = read_offline_run(run_dir)
        assert run["group"] == sweep.name and run["job_type"].startswith(
            f"resnet18 {summary['method']}"
        )
        assert "model:resnet18" in run["tags"] and f"method:{summary['method']}" in run["tags"]
        method = run["config"]["method"]
        assert method_label(method["alpha"], method["clip_mode"]) == summary["method"]
        assert run["config"]["git_sha"] == summary["git_sha"] != "unknown"
        assert run["summary"]["val/top1"]["last"] == summary["val_top1"]
    assert "alpha:0.25" in read_offline_run(sweep / "1_pgt")["tags"]

    # Resuming the baseline run as a PGT run is refused before anything is built.
    wrong = run_train([f"trainer.resume={sweep / '0_baseline'}", "method=pgt"], cwd=tmp_path)
    assert wrong.returncode == 2
    assert "would change the experiment mid-run: method.alpha: None -> 0.25" in wrong.stderr
    assert "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_runs_started_together_get_their_own_directories(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *SMALL, "logger=none"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    run_dirs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/summary.json"))
    assert len(run_dirs) == 2
    # A new run refuses a directory that already holds one.
    again = run_train([*SMALL, "logger=none", f"hydra.run.dir={run_dirs[0]}"], cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["trainer.epoch=3"], "error: trainer.epoch: no such key (Key 'epoch' not in "),
        (["method=pgtt"], "error: method=pgtt: method has no option 'pgtt'; did you mean pgt?"),
        (["method=pgt", "method.alpha=2"], "error: method.alpha=2.0 is out of range"),
        (["data=imagenet"], "error: data=imagenet needs its folder: pass data.root=DIR"),
        # Was ignored: the default run trained (here the tiny one, in seconds).
        (
            tiny("experiment=t1_resnet50_cosine_pgtt"),
            "error: experiment=t1_resnet50_cosine_pgtt: experiment has no option",
        ),
    ],
)
def test_cli_errors_are_clear(tmp_path, args, needle):
    """One line, exit status 2, nothing written (not even an empty outputs/ folder)."""
    proc = run_train(args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(needle) and proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
