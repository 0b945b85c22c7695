"""scripts/report.py on real runs: paper tables with our numbers or "not run", and the CPU study.

Runs are real trainings (ResNet-18 rows of Table 1, a few steps on tiny synthetic data); the
CPU-study rendering is checked on the committed results/cpu/runs.json and, end to end, on a
micro study run by scripts/cpu_study.py itself.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train

from powergrad import distributed as pgdist
from powergrad.build import run_training
from powergrad.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import report  # noqa: E402

register_configs()

TINY = [
    "data=synthetic",
    "data.num_classes=10",
    "data.image_size=32",
    "data.synthetic_train_images=16",
    "data.synthetic_val_images=16",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.batch_size=8",
    "trainer.epochs=2",
    "trainer.warmup_epochs=0",
    "trainer.threads=1",
    "trainer.progress=false",
    "logger=none",
]


def _train(run_dir: Path, *overrides: str) -> dict:
    cfg = compose_train(*overrides, *TINY)
    run_dir.mkdir(parents=True)
    return run_training(cfg, run_dir, pgdist.setup("cpu"))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """Two seeds of Table 1's ResNet-18 cosine PGT row, one of its baseline: real runs."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    _train(root / "pgt0", "experiment=t1_resnet18_cosine_pgt", "seed=0")
    _train(root / "pgt1", "experiment=t1_resnet18_cosine_pgt", "seed=1")
    _train(root / "base0", "experiment=t1_resnet18_cosine_baseline", "seed=0")
    # Two points of the ResNet-18 alpha grid (one process per point, as a multirun would).
    _train(root / "sweep_a005", "+sweep=resnet18_alpha", "method.alpha=0.05")
    _train(root / "sweep_a1", "+sweep=resnet18_alpha", "method.alpha=1.0")
    torch.set_num_threads(threads)
    yield root
    shutil.rmtree(root)  # checkpoints: module-scoped dirs outlive tmp_path's cleanup


def _row_line(tables: str, start: str) -> str:
    return next(line for line in tables.splitlines() if line.startswith(start))


def test_tables_put_our_runs_beside_the_papers_and_say_not_run_elsewhere(runs_root, tmp_path):
    assert (
        report.main(["--runs", str(runs_root), "--dataset", "synthetic", "--out", str(tmp_path)])
        == 0
    )
    tables = (tmp_path / "tables.md").read_text()
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in runs_root.iterdir()}
    pgt_test = [summaries[k]["val_top1"] for k in ("pgt0", "pgt1")]
    pgt_train = [summaries[k]["train_top1"] for k in ("pgt0", "pgt1")]
    line = _row_line(tables, "| ResNet-18 | cosine | PGT | 0.25 |")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4:6] == ["70.53", "70.298"]  # the paper's, from results/paper.yaml
    expected_test = (statistics.fmean(pgt_test), statistics.stdev(pgt_test), 2)
    assert cells[6] == report.fmt_ms((statistics.fmean(pgt_train), statistics.stdev(pgt_train), 2))
    assert cells[7] == report.fmt_ms(expected_test)
    assert "(n=2)" in cells[7]
    assert cells[8] == "+0.090"  # paper: 70.298 - 70.208
    base = (summaries["base0"]["val_top1"], 0.0, 1)
    assert cells[9] == report.fmt_delta(expected_test, base)
    base_line = _row_line(tables, "| ResNet-18 | cosine | baseline | - |")
    assert "(n=1)" in base_line
    # Every other row of all three tables: not run (28 distinct rows + 4 shared in Table 3).
    other = [
        ln
        for ln in tables.splitlines()
        if ln.startswith("| ") and "paper train" not in ln and ln not in (line, base_line)
    ]
    assert len(other) == 14 + 10 + 8 - 2
    assert all(report.NOT_RUN in ln for ln in other)
    rows = (tmp_path / "README_rows.md").read_text()
    assert "experiment=t1_resnet18_cosine_pgt" in rows and "(n=2)" in rows
    assert "+sweep=resnet50_alpha" in rows and "eval.py checkpoint=" in rows
    # Fig. 3 for the row that ran, beside its baseline.
    png = tmp_path / "figures" / "fig3_t1_resnet18_cosine_pgt.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The alpha grid that ran: its accuracy / loss / logit norm vs alpha figure and its status.
    assert (tmp_path / "figures" / "resnet18_alpha.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "figures" / "resnet50_alpha.png").exists()
    grid_line = next(ln for ln in rows.splitlines() if "+sweep=resnet18_alpha" in ln)
    assert "see figures" in grid_line


def test_runs_on_another_dataset_never_fill_a_paper_row(runs_root, tmp_path):
    report.main(["--runs", str(runs_root), "--out", str(tmp_path)])  # default: imagenet only
    tables = (tmp_path / "tables.md").read_text()
    assert "(n=" not in tables
    assert _row_line(tables, "| ResNet-18 | cosine | PGT | 0.25 |").count(report.NOT_RUN) == 2


def test_unfinished_run_is_left_out(runs_root, tmp_path):
    run = tmp_path / "cut"
    _train(run, "experiment=t1_resnet18_cosine_pgt")
    summary = json.loads((run / "summary.json").read_text())
    assert report.load_run_dir(run) is not None
    # A run that stopped before its budget (trainer.epochs) is not a result for its row.
    summary["epochs"] = 1
    (run / "summary.json").write_text(json.dumps(summary))
    assert report.load_run_dir(run) is None


def test_statistics_helpers():
    assert report.mean_std([1.0, 2.0, 3.0, None, float("nan")]) == (2.0, 1.0, 3)
    assert report.mean_std([]) is None
    assert report.fmt_ms(None) == "not run"
    assert report.fmt_ms((70.25, 0.5, 3)) == "70.25 ± 0.50 (n=3)"
    assert report.fmt_delta((2.0, 0.3, 3), (1.0, 0.4, 4)) == "+1.00 ± 0.26"
    assert report.verdict((2.0, 0.3, 3), (1.0, 0.4, 4)).startswith("higher (")
    assert report.verdict((1.2, 0.3, 3), (1.0, 0.4, 4)).startswith("within noise")
    assert report.baseline_id(report.load_paper(), "table3", {"model": "resnet50",
        "sched": "cosine", "label_smoothing": 0.1}) == "t3_row4"  # fmt: skip


def test_gpu_hours_estimate():
    # 100 epochs x 1,281,167 images at the assumed 1,150 img/s per V100.
    assert report.gpu_hours("resnet50", 100) == pytest.approx(100 * 1_281_167 / 1150 / 3600)


COMMITTED = ROOT / "results" / "cpu" / "runs.json"


@pytest.mark.skipif(not COMMITTED.is_file(), reason="the CPU study has not been run yet")
def test_cpu_study_report_renders_the_committed_study(tmp_path):
    for name in ("runs.json", "provenance.json"):
        (tmp_path / name).write_bytes((ROOT / "results" / "cpu" / name).read_bytes())
    text = report.render_cpu_study(tmp_path)
    runs = json.loads(COMMITTED.read_text())["runs"]
    assert text == (tmp_path / "README.md").read_text()
    for part in ("## (a)", "## (b)", "## (c)", "## The paper's claims at this scale"):
        assert part in text
    # Every point with at least 3 seeds (the study's minimum), and the means are the runs'.
    points = {r["point"] for r in runs}
    assert all(sum(r["point"] == p for r in runs) >= 3 for p in points)
    base = [r["summary"]["val_top1"] for r in runs if r["point"] == "a_baseline"]
    stat = (statistics.fmean(base), statistics.stdev(base), len(base))
    assert "| baseline | - | " in text and report.fmt_ms(stat) in text
    for png in ("a_accuracy_loglog.png", "c_vs_alpha.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert list(tmp_path.glob("b_filter_norms_b*.png"))


@pytest.mark.slow
def test_cpu_study_script_end_to_end(tmp_path):
    out, runs = tmp_path / "cpu", tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    args = [
        sys.executable,
        str(ROOT / "scripts" / "cpu_study.py"),
        "--only",
        "a_pgt_0.25,b_b512_agc",
        "--seeds",
        "1",
        "--epochs-a",
        "2",
        "--epochs-b",
        "2",
        "--runs-root",
        str(runs),
        "--out",
        str(out),
    ]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "runs.json").read_text())["runs"]
    assert sorted(r["point"] for r in data) == ["a_pgt_0.25", "b_b512_agc"]
    assert all(r["status"] == "ok" and len(r["history"]) == 2 for r in data)
    agc = next(r for r in data if r["point"] == "b_b512_agc")
    assert len(agc["filter_norms"]["zeroed"][-1]) == 20  # the paper's 20 conv layers
    prov = json.loads((out / "provenance.json").read_text())
    assert "scripts/cpu_study.py --only" in prov["command"] and prov["wall_s_total"] > 0
    assert prov["git_sha"] != "unknown"
    assert "## (a)" in (out / "README.md").read_text()
    # Rerunning resumes: every run is finished, nothing trains again.
    again = subprocess.run([*args, "--no-report"], env=env, capture_output=True, text=True)
    assert again.returncode == 0
    assert json.loads((out / "provenance.json").read_text())["invocations"][-1]["ran"] == 0
