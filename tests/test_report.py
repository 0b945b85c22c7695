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


def test_welch_fisher_and_verdicts():
    from scipy import stats

    hi, lo = [2.0, 2.1, 1.9, 2.05], [1.0, 1.2, 0.9]
    test = study.welch(hi, lo)
    ref = stats.ttest_ind(hi, lo, equal_var=False)
    assert (test.n_a, test.n_b) == (4, 3)
    assert test.t == pytest.approx(ref.statistic) and test.p == pytest.approx(ref.pvalue)
    assert test.diff == pytest.approx(statistics.fmean(hi) - statistics.fmean(lo))
    assert study.welch([1.0], lo) is None
    # Verdicts read the Holm-adjusted p and the paper's direction.
    assert study.verdict(+0.98, 0.01) == "holds"
    assert study.verdict(-0.98, 0.01) == "against the claim"
    assert study.verdict(+0.98, 0.01, direction=-1) == "against the claim"
    assert study.verdict(+0.98, 0.06) == study.verdict(-0.98, 0.06) == "within noise"
    assert study.verdict(float("nan"), float("nan")) == "not testable"
    # Fisher's exact test of divergence counts: 5 of 5 vs 0 of 5 is 2 tables of C(10, 5) = 252.
    assert study.fisher(5, 5, 0, 5) == pytest.approx(2 / 252)
    assert study.fisher(0, 5, 0, 5) == 1.0


def test_holm_adjusts_the_textbook_example():
    # Holm's procedure on the example of Wikipedia's "Holm-Bonferroni method": p = 0.01, 0.04,
    # 0.03, 0.005 at level 0.05 rejects H1 and H4 only. Adjusted by hand, in sorted order:
    # 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(1 x 0.04, 0.06) = 0.06.
    adjusted = study.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [p < 0.05 for p in adjusted] == [True, False, False, True]
    assert study.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert study.holm([]) == []


def test_diverged_runs_count_at_chance_and_failed_runs_not_at_all():
    runs = [
        {"status": "ok", "summary": {"val_top1": 90.0}},
        {"status": "diverged", "history": []},
        {"status": "failed", "log_tail": "Traceback"},
    ]
    assert study.accuracies(runs, "val_top1", chance=10.0) == [90.0, 10.0]


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


# Seed-to-seed spread of a synthetic group: its values are mean + SPREAD[seed] * std.
SPREAD = (-1.0, -0.5, 0.0, 0.5, 1.0)


def _record(point, part, method, alpha, batch, epochs, seed, val, **kw):
    """One runs.json entry shaped like scripts/cpu_study.py's (data, not a run): a finished
    run with final val top-1 ``val`` (or a diverged one with ``status="diverged"``)."""
    train = kw.get("train", val - 5)
    loss, norm = kw.get("loss", 0.2), kw.get("norm", 16.0)
    history = [
        {"epoch": e, "train_top1": train * e / epochs, "val_top1": val * e / epochs,
         "train_loss": loss * epochs / e, "val_loss": loss, "val_logit_norm": norm}
        for e in range(1, epochs + 1)
    ]  # fmt: skip
    entry = {
        "point": point, "part": part, "seed": seed, "model": kw.get("model", "resnet18"),
        "method": method, "alpha": alpha, "batch": batch, "epochs": epochs,
        "warmup": kw.get("warmup", 1.0), "paper_row": kw.get("paper_row"),
        "paper_batch": kw.get("paper_batch"), "process_wall_s": 30.0,
    }  # fmt: skip
    if kw.get("status") == "diverged":
        history[-1]["train_loss"] = 4e12
        return {**entry, "status": "diverged", "history": history}
    summary = {
        "train_top1": train, "val_top1": val, "val_top1_final": val, "val_top1_best": val,
        "best_epoch": epochs, "train_loss": loss * 1.5, "val_loss": loss, "logit_norm": norm,
        "train_logit_norm": norm, "steps": epochs * (1437 // batch), "wall_s": 25.0,
        "git_sha": "f" * 40,
    }  # fmt: skip
    entry.update(status="ok", summary=summary, history=history)
    if part == "b":
        entry["filter_norms"] = {
            "steps": [0, 10], "layer_names": [f"conv{i}" for i in range(20)],
            "layer_filters": [64] * 20, "zeroed": [[0] * 20] * 2, "collapsed": [[0] * 20] * 2,
            "min_norm": [0.3] * 20,
        }  # fmt: skip
        if method == "baseline":  # one plotted method per batch keeps the test quick
            traj = {"1": [[0.5, 0.4], [0.45, 0.35]], "11": [[0.2, 0.3], [0.2, 0.3]]}
            entry["filter_norms"]["trajectories"] = traj
    return entry


def _synthetic_study(out: Path) -> None:
    """runs.json + provenance.json of a study in the current design with known effects."""
    runs = []

    def group(point, part, method, alpha, batch, epochs, mean, std, **kw):
        for seed, k in enumerate(SPREAD):
            status = kw.get("statuses", ["ok"] * 5)[seed]
            extra = {k2: v for k2, v in kw.items() if k2 != "statuses"}
            extra["train"] = kw.get("train", mean - 5) + k * std
            runs.append(_record(point, part, method, alpha, batch, epochs, seed,
                                mean + k * std, status=status, **extra))  # fmt: skip

    # (a): PGT clearly raises train accuracy, val within noise; the 60% runs.
    group("a_baseline", "a", "baseline", None, 128, 10, 97.5, 0.8, train=92.9,
          paper_row="t1_resnet18_cosine_baseline")  # fmt: skip
    group("a_pgt_0.25", "a", "pgt", 0.25, 128, 10, 97.8, 0.8, train=98.9, loss=0.3, norm=45,
          paper_row="t1_resnet18_cosine_pgt")  # fmt: skip
    group("a60_baseline", "a60", "baseline", None, 128, 6, 96.0, 1.0, warmup=0.6)
    group("a60_pgt_0.25", "a60", "pgt", 0.25, 128, 6, 97.0, 1.0, warmup=0.6)
    # (c): loss and logit norm fall as alpha rises.
    for alpha, loss, norm in ((0.05, 2.0, 180.0), (0.1, 1.0, 97.0), (0.5, 0.25, 25.0)):
        group(f"c_pgt_{alpha:g}", "c", "pgt", alpha, 128, 10, 97.5, 0.5, loss=loss, norm=norm)
    # (b): at the large batch every PGT 0.25 run diverges; at the small one PGT is far below
    # the baseline (against the claim), AGC + PGT clearly above AGC.
    nonorm = {"model": "resnet18_nonorm"}
    large = {"paper_batch": 1024, **nonorm}
    group("b_b256_baseline", "b", "baseline", None, 256, 20, 80.0, 2.0, **large,
          paper_row="t2_b1024_baseline")  # fmt: skip
    group("b_b256_pgt_0.92", "b", "pgt", 0.92, 256, 20, 80.5, 2.0, **large,
          paper_row="t2_b1024_pgt")  # fmt: skip
    group("b_b256_pgt_0.25", "b", "pgt", 0.25, 256, 20, 80.0, 2.0, **large,
          statuses=["diverged"] * 5)  # fmt: skip
    small = {"paper_batch": 256, **nonorm}
    for method, alpha, mean in (("baseline", None, 90.0), ("gc", None, 90.5), ("agc", None, 91.0),
                                ("pgt", 0.25, 60.0), ("gc_pgt", 0.25, 90.0),
                                ("agc_pgt", 0.25, 96.0)):  # fmt: skip
        name = f"b_b64_{method}" + ("" if alpha is None else f"_{alpha:g}")
        group(name, "b", method, alpha, 64, 20, mean, 0.6, **small, paper_row=f"t2_b256_{method}")
    (out / "runs.json").write_text(json.dumps({"num_classes": 10, "runs": runs}))
    prov = {"command": "python scripts/cpu_study.py", "git_sha": "f" * 40, "jobs": 2, "seeds": 5}
    (out / "provenance.json").write_text(json.dumps(prov))


def _verdict_rows(text: str) -> list[list[str]]:
    """The verdict table's rows: claim, comparison, n, effect, test, raw p, Holm p, verdict."""
    claims = text.split("## The paper's claims at this scale")[1].split("Reading, per claim")[0]
    rows = [ln.strip("| ").split(" | ") for ln in claims.splitlines() if ln.startswith("| ")]
    return rows[1:]  # after the header


def test_study_verdicts_on_synthetic_runs(tmp_path):
    _synthetic_study(tmp_path)
    text = study.render_cpu_study(tmp_path)
    rows = _verdict_rows(text)

    def row(claim: str, comparison: str) -> list[str]:
        (found,) = [c for c in rows if c[0].startswith(claim) and c[1].startswith(comparison)]
        return found

    # Holm over the whole family: every adjusted p at least its raw p; the count is stated.
    tested = [cells for cells in rows if cells[5] != "-"]
    assert f"{len(tested)} two-sided tests" in text
    for cells in tested:
        raw, adj = (0.0 if c == "< 0.001" else float(c) for c in cells[5:7])
        assert adj >= raw
    assert row("Table 1: PGT raises train", "PGT 0.25 - baseline")[-1] == "holds"
    assert row("Table 1: PGT raises test", "PGT 0.25 - baseline, val top-1 % (final")[-1] == (
        "within noise"
    )
    fig3c = row("Fig. 3c", "PGT 0.25 at 6 epochs - baseline at 10")
    assert fig3c[2] == "5 (0) vs 5 (0)" and fig3c[3].startswith("-0.50 (")
    assert row("Sec. 5.3: loss", "Spearman(alpha, final train loss)")[-1] == "holds"
    # Significantly opposite to the paper: "against the claim", not "within noise".
    pgt_small = row("Table 2, batch 64 (the paper's 256): PGT 0.25 beats", "PGT 0.25 - baseline")
    assert pgt_small[3] == "-30.00 (+1.018)" and pgt_small[-1] == "against the claim"
    agc = row("Table 2, batch 64 (the paper's 256): AGC + PGT 0.25 beats AGC", "AGC + PGT 0.25")
    assert agc[3] == "+5.00 (+1.558)" and agc[-1] == "holds"
    assert row("Table 2, batch 64 (the paper's 256): GC + PGT 0.25 beats GC", "GC + PGT 0.25 - GC")
    # Every run of a point diverged: counted at chance (10%) in the Welch test, n diverged shown,
    # and Fisher's exact test of 5/5 vs 0/5 (p = 2/252) joins the family.
    caption = "Table 2's caption: PGT beats the non-BN baseline at any batch; here batch 256"
    diverged = row(caption, "PGT 0.25 - baseline")
    assert diverged[2] == "5 (5) vs 5 (0)" and diverged[3].startswith("-70.00")
    assert diverged[-1] == "against the claim"
    fisher = row(caption, "PGT 0.25 vs baseline, fraction of runs diverged")
    assert fisher[3] == "+1.00 (< 0)" and fisher[4] == "Fisher exact" and fisher[5] == "0.008"
    assert float(fisher[6]) >= 0.05 and fisher[-1] == "within noise"
    assert "(raw p = 0.008, the opposite direction, not significant after Holm)" in text
    # No Fisher test where neither group diverged.
    assert sum("fraction of runs diverged" in c[1] for c in rows) == 1
    assert row("Sec. 5.2", "zeroed filters (norm < 1e-6)")[-1] == "not observed"
    table_b = text.split("## (b)")[1].split("## The paper's claims")[0]
    assert "| 256 (1024) | PGT | 0.25 | - | 5 | 5 | 10.00 ± 0.00 (n=5) | 10.00 ± 0.00 (n=5) | " \
        "all diverged |" in table_b  # fmt: skip
    assert "rerunning it as it ran takes about 20 minutes" in text  # 80 runs x 30 s / 2
    for png in ("a_accuracy_loglog.png", "c_vs_alpha.png", "b_filter_norms_b64.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


COMMITTED = ROOT / "results" / "cpu" / "runs.json"


def _committed_points() -> set[str]:
    return {r["point"] for r in json.loads(COMMITTED.read_text())["runs"]}


@pytest.mark.skipif(
    not COMMITTED.is_file() or "a60_pgt_0.25" not in _committed_points(),
    reason="results/cpu predates the current study design: rerun scripts/cpu_study.py --fresh",
)
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
    # Every point with 5 seeds or more, all from one clean commit.
    points = {r["point"] for r in runs}
    assert all(sum(r["point"] == p for r in runs) >= 5 for p in points)
    provenance = json.loads((ROOT / "results" / "cpu" / "provenance.json").read_text())
    assert provenance["clean"] and len(provenance["invocations"]) == 1
    shas = {r["summary"]["git_sha"] for r in runs if r["status"] == "ok"}
    assert shas == {provenance["git_sha"]}
    # The design: a separate 60%-length PGT run; Table 2's batches give >= 100 optimizer steps
    # (finished runs); GC and GC + PGT beside the others; AGC + PGT vs AGC tested.
    assert {"a60_pgt_0.25", "b_b64_gc", "b_b64_gc_pgt_0.25"} <= points
    assert (
        min(r["summary"]["steps"] for r in runs if r["part"] == "b" and r["status"] == "ok") >= 100
    )
    rows = _verdict_rows(text)
    assert any(c[1].startswith("AGC + PGT 0.25 - AGC") for c in rows)
    assert all(c[-1] in ("holds", "against the claim", "within noise", "not testable",
                         "not observed") for c in rows)  # fmt: skip
    assert "Holm" in text and "skip_nonfinite_steps=true" in text
    for png in ("a_accuracy_loglog.png", "c_vs_alpha.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert list(tmp_path.glob("b_filter_norms_b*.png"))


def test_cpu_study_refuses_an_unknown_point_before_any_work(tmp_path):
    out, runs = tmp_path / "cpu", tmp_path / "runs"
    args = ["--only", "a_pgt_0.25,b_b512_agc", "--allow-dirty", "--runs-root", str(runs)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cpu_study.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: --only: unknown point(s) b_b512_agc; the points: ")
    assert len(proc.stderr.splitlines()) == 1 and "b_b64_gc_pgt_0.25" in proc.stderr
    assert not out.exists() and not runs.exists()


@pytest.mark.slow
def test_cpu_study_script_end_to_end(tmp_path):
    out, runs = tmp_path / "cpu", tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    args = [
        sys.executable,
        str(ROOT / "scripts" / "cpu_study.py"),
        "--only",
        "a60_pgt_0.25,b_b256_baseline",
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
    data = json.loads((out / "runs.json").read_text())
    assert data["num_classes"] == 10
    by_point = {r["point"]: r for r in data["runs"]}
    assert sorted(by_point) == ["a60_pgt_0.25", "b_b256_baseline"]
    assert all(r["status"] == "ok" and r["process_wall_s"] > 0 for r in data["runs"])
    # The 60%-length run: 60% of 2 epochs is 1, its warmup 60% of one epoch.
    short = by_point["a60_pgt_0.25"]
    assert (short["epochs"], short["warmup"], len(short["history"])) == (1, 0.6, 1)
    base = by_point["b_b256_baseline"]
    assert (base["paper_batch"], base["paper_row"]) == (1024, "t2_b1024_baseline")
    assert base["summary"]["steps"] == 2 * (1437 // 256)
    assert len(base["filter_norms"]["zeroed"][-1]) == 20  # the paper's 20 conv layers
    prov = json.loads((out / "provenance.json").read_text())
    assert "scripts/cpu_study.py --only" in prov["command"] and prov["wall_s_total"] > 0
    assert prov["git_sha"] != "unknown" and len(prov["points"]) == 2
    assert "## (b)" in (out / "README.md").read_text()
    # Rerunning resumes: every run is finished, nothing trains again.
    again = subprocess.run([*args, "--no-report"], env=env, capture_output=True, text=True)
    assert again.returncode == 0
    assert json.loads((out / "provenance.json").read_text())["invocations"][-1]["ran"] == 0
