"""scripts/bench_job.py and scripts/plain_train.py measure what they claim: the plain script
trains the recipe end to end, the whole-job bench runs its three variants (c without checkpoints
and with val only at the end), and its statistics are right. Nothing here asserts a speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_job  # noqa: E402

from powergrad.data.generate import write_image_folder  # noqa: E402


def test_ratio_ci_is_the_geometric_mean_of_per_round_ratios():
    r = bench_job.ratio_ci([2.0, 8.0, 4.0], [1.0, 2.0, 1.0])  # ratios 2, 4, 4
    assert r["ratio"] == pytest.approx((2 * 4 * 4) ** (1 / 3))
    assert r["per_round"] == pytest.approx([2.0, 4.0, 4.0])
    lo, hi = r["ci95"]
    assert lo < r["ratio"] < hi
    # t with 2 degrees of freedom on the log ratios
    logs = [math.log(2), math.log(4), math.log(4)]
    mean = sum(logs) / 3
    sd = (sum((x - mean) ** 2 for x in logs) / 2) ** 0.5
    assert math.log(hi) - mean == pytest.approx(4.302653 * sd / 3**0.5, rel=1e-5)


def test_ratio_ci_of_identical_ratios_has_zero_width_and_one_round_none():
    r = bench_job.ratio_ci([3.0, 6.0], [1.0, 2.0])
    assert r["ratio"] == pytest.approx(3.0)
    assert r["ci95"] == pytest.approx([3.0, 3.0])
    assert all(math.isnan(x) for x in bench_job.ratio_ci([3.0], [1.0])["ci95"])


def test_steady_skips_the_first_epoch():
    assert bench_job.steady([100.0, 3.0, 5.0, 4.0]) == 4.0
    assert bench_job.steady([7.0]) == 7.0


def test_summarize_ratios_point_the_same_way():
    """> 1 means a is faster, for images/s (a/b) and for times (b/a) alike."""

    def run(ips, epoch, wall):
        return {
            "train_images_per_s": ips,
            "epoch_s": epoch,
            "wall_s": wall,
            "peak_pss_mib": 100.0,
            "epoch_wall_s": [epoch, epoch],
        }

    runs = {"a": [run(200.0, 5.0, 20.0)] * 2, "b": [run(100.0, 10.0, 40.0)] * 2}
    s = bench_job.summarize(runs, epochs=2)
    for key in ("train_images_per_s", "epoch_s", "wall_s"):
        assert s["ratios"]["a/b"][key]["ratio"] == pytest.approx(2.0)
    assert s["variants"]["a"]["outside_epochs_s"] == pytest.approx(10.0)
    assert s["variants"]["a"]["projected_30_epoch_wall_s"] == pytest.approx(10.0 + 30 * 5.0)


def test_tree_pss_counts_this_process():
    assert bench_job.tree_pss_kib(os.getpid()) > 10_000  # python + torch: tens of MiB at least


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    # 2 classes x 8 train images: 2 steps of batch 8 per epoch; 32x32 like the digits.
    root = tmp_path_factory.mktemp("tiny") / "data"
    return write_image_folder(root, classes=2, train_per_class=8, val_per_class=2, size=(32, 32))


def test_plain_train_runs_the_recipe_and_reports_each_epoch(tiny_folder):
    cmd = [sys.executable, "scripts/plain_train.py", f"--root={tiny_folder}", "--epochs=2"]
    cmd += ["--batch-size=8", "--workers=0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["epoch"] for x in lines[:-1]] == [1, 2]
    for x in lines[:-1]:
        assert math.isfinite(x["train_loss"]) and 0 <= x["val_top1"] <= 100
        assert x["images_per_s"] == pytest.approx(2 * 8 / x["train_s"])
    assert lines[-1]["val_top1"] == lines[-2]["val_top1"]


@pytest.mark.slow
def test_bench_job_runs_four_variants_and_writes_the_report(tiny_folder, tmp_path):
    out = tmp_path / "bench"
    args = ["--epochs=2", "--rounds=1", "--workers=1", "--batch-size=8", f"--root={tiny_folder}"]
    args.append("--variants=a,b,c,d")
    report = bench_job.main([*args, f"--out={out}", "--name=t"])
    runs = report["runs"]
    assert set(runs) == {"a", "b", "c", "d"}
    a, b, c, d = runs["a"][0], runs["b"][0], runs["c"][0], runs["d"][0]
    for r in (a, b, c, d):
        assert len(r["epoch_wall_s"]) == len(r["images_per_s"]) == 2
        assert r["wall_s"] > sum(r["epoch_wall_s"]) > 0
        assert r["peak_pss_mib"] > 0
    # a: last.pt + best.pt written each epoch, val each epoch; c: no checkpoint, val at the end.
    assert len(a["save_s"]) == 2 and a["checkpoint_bytes"] > 0
    assert len(a["evaluate_s"]) == 2
    assert c["save_s"] == [] and c["checkpoint_bytes"] == 0
    assert len(c["evaluate_s"]) == 1
    assert "trainer.eval_every_epochs=1000000" in c["command"]
    assert "logger=none" in a["command"] and "trainer.eval_every" not in a["command"]
    # d: the same run on DALI; both loaders report their wait per epoch.
    assert "loader=dali" in d["command"] and "loader=dali" not in a["command"]
    assert len(a["loader_wait_s"]) == len(d["loader_wait_s"]) == 2
    saved = json.loads((out / "t.json").read_text())
    # The command as typed, with the environment it ran under (e.g. OMP_WAIT_POLICY=PASSIVE).
    assert saved["meta"]["git_sha"] and "python scripts/bench_job.py" in saved["meta"]["command"]
    assert set(saved["summary"]["ratios"]) == {"a/b", "a/c", "d/a"}
    assert "| a/b |" in (out / "t.md").read_text()
