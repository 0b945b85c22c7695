"""scripts/report.py on real runs: paper tables with our numbers or "not run", and the CPU study.

Runs are real trainings (ResNet-18 rows of Table 1, a few steps on tiny synthetic data); the
scripts run as subprocesses, their library pieces (powergrad.results, .tables, .study) are
imported. The CPU-study rendering is checked on the committed results/cpu/runs.json and, end to
end, on a micro study run by scripts/cpu_study.py itself.
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
from conftest import train_in_process

from powergrad import results, study, tables
from powergrad.results import NOT_RUN, fmt_delta, fmt_ms

ROOT = Path(__file__).resolve().parents[1]

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
    "sched.cooldown_epochs=0",  # the rows' released recipe cools down 10 epochs
    "trainer.threads=1",
    "trainer.progress=false",
    "logger=none",
]


def _train(run_dir: Path, *overrides: str) -> dict:
    return train_in_process(run_dir, *overrides, *TINY)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """Two seeds of Table 1's ResNet-18 cosine PGT row, one of its baseline: real runs."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    _train(root / "pgt0", "experiment=t1_resnet18_cosine_pgt", "seed=0")
    _train(root / "pgt1", "experiment=t1_resnet18_cosine_pgt", "seed=1")
    _train(root / "base0", "experiment=t1_resnet18_cosine_baseline", "seed=0")
    # Two points of the ResNet-18 alpha grid (one process per point, as a multirun would).
    _train(root / "sweep_a01", "+sweep=resnet18_alpha", "method.alpha=0.1")
    _train(root / "sweep_a1", "+sweep=resnet18_alpha", "method.alpha=1.0")
    torch.set_num_threads(threads)
    yield root
    shutil.rmtree(root)  # checkpoints: module-scoped dirs outlive tmp_path's cleanup


def _row_line(tables: str, start: str) -> str:
    return next(line for line in tables.splitlines() if line.startswith(start))


def _report(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _ms(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values), len(values)


def test_tables_put_our_runs_beside_the_papers_and_say_not_run_elsewhere(runs_root, tmp_path):
    _report("--runs", str(runs_root), "--dataset", "synthetic", "--out", str(tmp_path))
    tables_md = (tmp_path / "tables.md").read_text()
    summaries = {d.name: json.loads((d / "summary.json").read_text()) for d in runs_root.iterdir()}

    def best(s: dict) -> float:  # train.py's key today, the new one once summaries carry it
        return s.get("val_top1_best", s.get("best_val_top1"))

    pgt = [summaries[k] for k in ("pgt0", "pgt1")]
    line = _row_line(tables_md, "| ResNet-18 | cosine | PGT | 0.25 |")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4:6] == ["70.53", "70.298"]  # the paper's, from results/paper.yaml
    # Table 1 is compared at the best epoch (paper.yaml: test_epoch best); the final beside it.
    header = _row_line(tables_md, "| model | sched |")
    assert "| ours test (best epoch) | ours test (final epoch) |" in header
    expected_test = _ms([best(s) for s in pgt])
    assert cells[6] == fmt_ms(_ms([s["train_top1"] for s in pgt]))
    assert cells[7] == fmt_ms(expected_test)
    assert cells[8] == fmt_ms(_ms([s["val_top1"] for s in pgt]))
    assert "(n=2)" in cells[7]
    assert cells[9] == "+0.090"  # paper: 70.298 - 70.208
    base = (best(summaries["base0"]), 0.0, 1)
    assert cells[10] == fmt_delta(expected_test, base)
    assert "Ours test is the best epoch's top-1" in tables_md and "model_best" in tables_md
    base_line = _row_line(tables_md, "| ResNet-18 | cosine | baseline | - |")
    assert "(n=1)" in base_line
    # Every other row of all three tables: not run (28 distinct rows + 4 shared in Table 3).
    other = [
        ln
        for ln in tables_md.splitlines()
        if ln.startswith("| ") and "paper train" not in ln and ln not in (line, base_line)
    ]
    assert len(other) == 14 + 10 + 8 - 2
    assert all(NOT_RUN in ln for ln in other)
    rows = (tmp_path / "README_rows.md").read_text()
    assert "experiment=t1_resnet18_cosine_pgt" in rows and "(n=2) (best epoch)" in rows
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
    _report("--runs", str(runs_root), "--out", str(tmp_path))  # default: imagenet only
    tables_md = (tmp_path / "tables.md").read_text()
    assert "(n=" not in tables_md
    assert _row_line(tables_md, "| ResNet-18 | cosine | PGT | 0.25 |").count(NOT_RUN) == 3


def test_unfinished_run_is_left_out(runs_root, tmp_path):
    run = tmp_path / "cut"
    _train(run, "experiment=t1_resnet18_cosine_pgt")
    summary = json.loads((run / "summary.json").read_text())
    assert results.load_run(run) is not None
    # A run that stopped before its budget (trainer.epochs) is not a result for its row...
    summary["epochs"] = 1
    (run / "summary.json").write_text(json.dumps(summary))
    assert results.load_run(run) is None
    # ... but compare (a sweep's side-by-side table) shows it.
    assert results.load_run(run, finished_only=False)["summary"]["epochs"] == 1


def test_statistics_helpers():
    assert results.mean_std([1.0, 2.0, 3.0, None, float("nan")]) == (2.0, 1.0, 3)
    assert results.mean_std([]) is None
    assert fmt_ms(None) == "not run"
    assert fmt_ms((70.25, 0.5, 3)) == "70.25 ± 0.50 (n=3)"
    assert fmt_delta((2.0, 0.3, 3), (1.0, 0.4, 4)) == "+1.00 ± 0.26"
    assert results.baseline_id(results.load_paper(), "table3", {"model": "resnet50",
        "sched": "cosine", "label_smoothing": 0.1}) == "t3_row4"  # fmt: skip


def test_welch_verdicts():
    from scipy import stats

    hi, lo = [2.0, 2.1, 1.9, 2.05], [1.0, 1.2, 0.9]
    test = study.welch(hi, lo)
    ref = stats.ttest_ind(hi, lo, equal_var=False)
    assert (test.n_a, test.n_b) == (4, 3)
    assert test.t == pytest.approx(ref.statistic) and test.p == pytest.approx(ref.pvalue)
    assert test.diff == pytest.approx(statistics.fmean(hi) - statistics.fmean(lo))
    assert study.verdict(test) == "holds"  # significant, in the paper's direction
    assert study.verdict(study.welch(lo, hi)) == "contradicts"
    assert study.verdict(test, direction=-1) == "contradicts"
    assert study.verdict(study.welch([1.0, 1.5, 0.8], [1.1, 0.9, 1.3])) == "within noise"
    assert study.welch([1.0], lo) is None and study.verdict(None) == "not testable"
    text = study.fmt_test(test)
    assert text.startswith("+0.98 (n = 4 vs 3, t = ") and text.endswith("): holds")


def test_final_and_best_fall_back_to_the_old_summary_keys():
    history = [{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 70.0},
               {"epoch": 3, "val_top1": 60.0}]  # fmt: skip
    old = results.final_and_best({"val_top1": 60.0, "best_val_top1": 70.0}, history)
    assert (old["val_top1_final"], old["val_top1_best"], old["best_epoch"]) == (60.0, 70.0, 2)
    new = {"val_top1": 1.0, "val_top1_final": 60.0, "val_top1_best": 71.0, "best_epoch": 3}
    assert results.final_and_best(new, history) == new  # the new keys win
    # No val at all (best_val_top1 was -inf, written as null): nothing invented.
    empty = results.final_and_best({"val_top1": None, "best_val_top1": None}, [])
    assert empty["val_top1_best"] is None and empty["best_epoch"] is None


def test_compare_table_carries_final_and_best(tmp_path):
    from powergrad import compare

    for name, final, best_top1 in (("0_baseline", 60.0, 65.0), ("1_pgt", 62.0, 62.0)):
        run = tmp_path / name
        run.mkdir()
        summary = {"method": name[2:], "alpha": None, "val_top1": final, "best_val_top1": best_top1}
        (run / "summary.json").write_text(json.dumps(summary))
        history = [{"epoch": 1, "val_top1": best_top1}, {"epoch": 2, "val_top1": final}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    table = compare.compare_runs(sorted(tmp_path.iterdir()), tmp_path)
    assert table.splitlines()[0].endswith("| wall s | best val top-1 % | best epoch |")
    assert "| baseline | - | - | 60.00 |" in table and table.splitlines()[2].endswith(
        "| 65.00 | 1 |"
    )
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [(r["val_top1_final"], r["val_top1_best"], r["best_epoch"]) for r in rows] == [
        (60.0, 65.0, 1),
        (62.0, 62.0, 1),
    ]


def test_paper_yaml_says_which_epoch_each_table_compares():
    paper = results.load_paper()
    for name, table in paper["tables"].items():
        assert table["test_epoch"] in ("best", "final"), name
        assert "model_best" in table["test_epoch_why"], name
        assert results.compared_test_key(paper, name) == "val_top1_best"
    assert "model_best" in paper["test_epoch_source"]


def test_gpu_hours_estimate():
    # 100 epochs x 1,281,167 images at the assumed 1,150 img/s per V100.
    assert tables.gpu_hours("resnet50", 100) == pytest.approx(100 * 1_281_167 / 1150 / 3600)


COMMITTED = ROOT / "results" / "cpu" / "runs.json"


@pytest.mark.skipif(not COMMITTED.is_file(), reason="the CPU study has not been run yet")
def test_cpu_study_report_renders_the_committed_study(tmp_path):
    for name in ("runs.json", "provenance.json"):
        (tmp_path / name).write_bytes((ROOT / "results" / "cpu" / name).read_bytes())
    text = study.render_cpu_study(tmp_path)
    runs = json.loads(COMMITTED.read_text())["runs"]
    assert text == (tmp_path / "README.md").read_text()
    # The committed README is this rendering, never a hand-edited copy.
    assert text == (ROOT / "results" / "cpu" / "README.md").read_text()
    for part in ("## (a)", "## (b)", "## (c)", "## The paper's claims at this scale"):
        assert part in text
    # Every point with 5 seeds (issue 11: n >= 5), all from one clean commit; the means are
    # the runs'.
    points = {r["point"] for r in runs}
    assert all(sum(r["point"] == p for r in runs) >= 5 for p in points)
    provenance = json.loads((ROOT / "results" / "cpu" / "provenance.json").read_text())
    assert provenance["clean"] and len(provenance["invocations"]) == 1
    shas = {r["summary"]["git_sha"] for r in runs if r["status"] == "ok"}
    assert shas == {provenance["git_sha"]}
    base = [r["summary"]["val_top1"] for r in runs if r["point"] == "a_baseline"]
    stat = (statistics.fmean(base), statistics.stdev(base), len(base))
    assert "| baseline | - | " in text and fmt_ms(stat) in text
    # Every verdict is Welch's t-test with its n per group, difference, t and p.
    claims = text.split("## The paper's claims at this scale")[1].split("Scale caveat")[0]
    assert "> 2 SE" not in text and "Welch" in claims
    for verdict in ("holds", "within noise", "contradicts"):
        for hit in claims.split(f"): {verdict}")[:-1]:
            tail = hit[-60:]
            assert "n = " in tail and "t = " in tail and "p " in tail, tail
    assert "epoch 7" in claims and "grid step" in claims  # Fig. 3c's epoch resolution
    assert "Val departs from the claim at alpha 0.5" in claims  # val loss below the baseline's
    # Diverged runs skipped non-finite steps and still diverged through finite losses.
    assert "skip_nonfinite_steps=true" in text and "skipping steps does not prevent" in text
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
        "--allow-dirty",
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
