"""powergrad.compare: seeds of one configuration averaged (mean ± std, n) in compare.md, one row
per run in compare.csv, both in compare.json; the CLI and the multirun callback write the same."""

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_train
from omegaconf import OmegaConf

from powergrad import compare
from powergrad.config import register_configs

register_configs()  # the typed schema (train_schema) that configs/train.yaml composes onto
ROOT = Path(__file__).resolve().parents[1]


def _run(root, name, *overrides, seed, val_top1, wall_s=10.0):
    """A finished 2-epoch run directory as train.py writes it (config, summary, metrics)."""
    cfg = OmegaConf.to_container(compose_train(*overrides, f"seed={seed}"), resolve=True)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {
        "model": cfg["model"]["name"],
        "method": "pgt" if cfg["method"]["alpha"] is not None else "baseline",
        "alpha": cfg["method"]["alpha"],
        "sched": cfg["sched"]["name"],
        "batch_size": cfg["trainer"]["batch_size"],
        "seed": seed,
        "dataset": cfg["data"]["name"],
        "epochs": 2,
        "train_top1": val_top1 + 5,
        "val_top1": val_top1,
        "val_top1_final": val_top1,
        "val_top1_best": val_top1 + 1,
        "best_epoch": 1,
        "train_loss": 1.0,
        "val_loss": 1.5,
        "logit_norm": 3.0,
        "wall_s": wall_s,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    history = [{"epoch": 1, "train_top1": 50.0, "val_top1": val_top1 + 1},
               {"epoch": 2, "train_top1": 60.0, "val_top1": val_top1}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return run


def _sweep(root):
    return [
        _run(root, "0_baseline", "method=baseline", seed=0, val_top1=60.0),
        _run(root, "1_pgt", "method=pgt", seed=0, val_top1=62.0),
        _run(root, "2_pgt", "method=pgt", seed=1, val_top1=64.0),
        _run(root, "3_pgt", "method=pgt", seed=2, val_top1=63.0, wall_s=12.0),
        # Differs from the PGT runs in more than the seed: a configuration of its own.
        _run(root, "4_pgt", "method=pgt", "method.label_smoothing=0.1", seed=0, val_top1=61.0),
    ]


def _rows(table):
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:] if ln.startswith("|")]  # fmt: skip


def test_seeds_of_one_configuration_are_averaged(tmp_path):
    runs = _sweep(tmp_path / "sweep")
    table = compare.compare_runs(runs, tmp_path)
    assert (tmp_path / "compare.md").read_text().startswith(table.splitlines()[0])
    rows = _rows(table)
    assert [(r["model"], r["sched"], r["method"], r["alpha"], r["seed"], r["n"]) for r in rows] == [
        ("resnet18", "cosine", "baseline", "-", "0", "1"),
        ("resnet18", "cosine", "pgt", "0.25", "0,1,2", "3"),
        ("resnet18", "cosine", "pgt", "0.25", "0", "1"),
    ]
    assert rows[0]["val top-1 %"] == "60.00"  # one seed: the value alone
    std = statistics.stdev([62.0, 64.0, 63.0])
    assert rows[1]["val top-1 %"] == f"63.00 ± {std:.2f}"
    assert rows[1]["best val top-1 %"] == f"64.00 ± {std:.2f}"
    assert rows[1]["wall s"] == "10.7 ± 1.2"

    # compare.csv: one row per run, its configuration key shared by the seeds.
    with (tmp_path / "compare.csv").open() as f:
        per_run = list(csv.DictReader(f))
    assert [(Path(r["run_dir"]).name, r["seed"], r["val_top1_final"]) for r in per_run] == [
        ("0_baseline", "0", "60.0"),
        ("1_pgt", "0", "62.0"),
        ("2_pgt", "1", "64.0"),
        ("3_pgt", "2", "63.0"),
        ("4_pgt", "0", "61.0"),
    ]
    keys = [r["config"] for r in per_run]
    assert keys[1] == keys[2] == keys[3] and len(set(keys)) == 3
    assert keys[1].startswith("resnet18 pgt a=0.25 cosine b")

    data = json.loads((tmp_path / "compare.json").read_text())
    assert [r["seed"] for r in data["rows"]] == [0, 0, 1, 2, 0]
    pgt = data["configurations"][1]
    assert (pgt["seeds"], pgt["n"], pgt["key"]) == ([0, 1, 2], 3, keys[1])
    assert pgt["val_top1_final"] == {"mean": 63.0, "std": std, "n": 3}
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_a_metric_missing_in_some_seeds_shows_its_own_n(tmp_path):
    runs = [
        _run(tmp_path / "s", "0_pgt", "method=pgt", seed=0, val_top1=62.0),
        _run(tmp_path / "s", "1_pgt", "method=pgt", seed=1, val_top1=64.0),
    ]
    summary = json.loads((runs[1] / "summary.json").read_text())
    summary["val_loss"] = float("nan")  # a diverged seed
    (runs[1] / "summary.json").write_text(json.dumps(summary))
    (row,) = _rows(compare.compare_runs(runs, tmp_path))
    assert row["n"] == "2" and row["val loss"] == "1.5000 (n=1)"


def test_cli_writes_the_same_files(tmp_path):
    """Into an --out folder that does not exist yet (created; before: a traceback)."""
    _sweep(tmp_path / "sweep")
    out = tmp_path / "new" / "out"
    dirs = [str(p) for p in (tmp_path / "sweep").iterdir()]
    proc = subprocess.run(
        [sys.executable, "-m", "powergrad.compare", *dirs, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | sched | batch | seed | n | method | alpha |" in proc.stdout
    assert "| 0,1,2 | 3 | pgt | 0.25 |" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "compare.csv",
        "compare.json",
        "compare.md",
        "compare.png",
    ]
    assert (out / "compare.md").read_text().strip() == proc.stdout.split("\n\nwritten:")[0].strip()


def test_crashed_corrupt_and_copied_runs_are_named_not_dropped(tmp_path):
    """A crashed run (no summary.json), a corrupt summary.json, a last metrics.jsonl line cut
    short and run folders copied within the sweep: each named in a note (compare.md,
    compare.json, the returned text), the copies counted once. (Before: the corrupt file made
    the whole compare fail with a traceback naming no file, a crashed run vanished without a
    note, a copy counted as another seed.) The sweep folder itself stands for its jobs."""
    sweep = tmp_path / "sweep"
    runs = _sweep(sweep)
    with (runs[1] / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "val_')  # killed mid-write
    summary = json.loads((runs[3] / "summary.json").read_text())
    (runs[3] / "summary.json").write_text(json.dumps({**summary, "wandb_id": "1x2y3z"}))
    shutil.copytree(runs[2], sweep / "2_pgt_copy")
    shutil.copytree(runs[3], sweep / "3_pgt_copy")
    (runs[4] / "summary.json").write_text('{"model": "resnet18", ')
    crashed = sweep / "5_crashed"
    crashed.mkdir()
    shutil.copy(runs[0] / "config.yaml", crashed)
    (crashed / "metrics.jsonl").write_text('{"epoch": 1, "val_top1": 30.0}\n')
    out = tmp_path / "new" / "out"  # created
    text = compare.compare_runs([sweep], out)
    rows = _rows(text.split("\n\nnotes:")[0])
    assert [(r["method"], r["seed"], r["n"]) for r in rows] == [
        ("baseline", "0", "1"),
        ("pgt", "0,1,2", "3"),
    ]
    notes = json.loads((out / "compare.json").read_text())["notes"]
    assert notes[0] == (
        f"{runs[1] / 'metrics.jsonl'}: its last line is cut short; read the 2 other epoch record(s)"
    )
    assert notes[1].startswith(f"{runs[4] / 'summary.json'}: not readable as JSON (")
    assert notes[2] == (
        f"{crashed}: no summary.json, the run crashed, was killed or is still running "
        "(1 epoch(s) in metrics.jsonl): left out"
    )
    assert notes[3:] == [
        f"{sweep / '2_pgt_copy'}: a copy of {runs[2]} (identical config, summary and history): "
        "counted once",
        f"{sweep / '3_pgt_copy'}: a copy of {runs[3]} (the same wandb id 1x2y3z): counted once",
    ]
    assert (out / "compare.md").read_text().endswith("\n".join(f"- {n}" for n in notes) + "\n")
    assert text.endswith(notes[-1])


def test_cli_refuses_a_missing_folder_in_one_line(tmp_path):
    runs = _sweep(tmp_path / "sweep")
    proc = subprocess.run(
        [sys.executable, "-m", "powergrad.compare", str(runs[0]), str(tmp_path / "nowhere")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nowhere'}: no such folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing written
    (tmp_path / "empty").mkdir()
    with pytest.raises(compare.CompareError, match=r"no run to compare: .*empty: not a run folder"):
        compare.compare_runs([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "a_file").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "powergrad.compare", str(runs[0]), "--out", "a_file"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert (proc.returncode, proc.stderr) == (2, "error: --out a_file: not a folder\n")
