"""The benchmark scripts measure what they claim: the minimal loop and the trainer's step do the
same work, the scripts run end to end at toy sizes, the RSS sampler sees real allocations, the
training path imports no DALI, and (on CUDA) the trainer's step never waits for the GPU.

The scripts run as subprocesses (tests import no script): what can only be checked inside one
comes from its ``--self-check`` mode, which prints one JSON line and exits 1 when a check fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_CHECKS = ("same_training", "meter_losses", "median_ci95", "peak_rss")


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _json_lines(stdout: str) -> list:
    return [json.loads(x) for x in stdout.splitlines() if x.startswith(("{", "["))]


def _self_check(*args: str) -> dict[str, dict]:
    proc = _script("bench_train.py", "--self-check", *args)
    lines = _json_lines(proc.stdout)
    assert lines and "self_check" in lines[-1], proc.stdout[-2000:] + proc.stderr[-3000:]
    checks = lines[-1]["self_check"]
    # The exit status is the verdict: 0 exactly when every check held.
    assert (proc.returncode == 0) == all(r["ok"] for r in checks.values()), proc.stderr[-3000:]
    return checks


@pytest.fixture(scope="module")
def cpu_checks() -> dict[str, dict]:
    """bench_train.py's CPU self-checks, run once (one interpreter start) for the tests below."""
    checks = _self_check(",".join(CPU_CHECKS))
    assert set(checks) == set(CPU_CHECKS)
    return checks


def test_minimal_loop_and_trainer_step_compute_the_same_training(cpu_checks):
    """Same initial weights, same batch, same hyper-parameters: after two SGD steps the
    hand-written loop and the trainer's chunk (powergrad.engine.train_one_epoch) hold the same
    weights, BN statistics and momentum. So their timing ratio compares equal work."""
    r = cpu_checks["same_training"]
    assert r["ok"], r
    assert r["initial_differ"] == [] and r["state_differ"] == [] and r["momentum_differ"] == 0
    assert r["state_tensors_moved"] > 0  # the weights did move
    assert r["momentum_buffers"] > 0


def test_trainer_meter_saw_the_minimal_loops_losses(cpu_checks):
    r = cpu_checks["meter_losses"]
    assert r["ok"], r
    assert r["meter_samples"] == 12 and r["meter_nonfinite"] == 0
    assert r["trainer_losses"] == pytest.approx(r["minimal_losses"], rel=1e-5)
    assert r["meter_loss_sum_per_image"] == pytest.approx(sum(r["minimal_losses"]), rel=1e-5)


def test_median_ci95_brackets_the_median(cpu_checks):
    r = cpu_checks["median_ci95"]
    assert r["ok"], r
    med, lo, hi = r["median_lo_hi_1_to_21"]
    assert med == 11.0 and lo < med < hi
    assert r["median_lo_hi_single"][0] == 2.0


def test_peak_rss_sees_an_allocation(cpu_checks):
    # 300 MiB written (not just reserved), held for a moment so the 0.1 s sampler sees it.
    r = cpu_checks["peak_rss"]
    assert r["ok"], r
    assert r["peak_rss_main_mib"] >= 300
    assert r["peak_pss_tree_mib"] >= 250  # a sample may land before the last pages are touched


def test_bench_train_tiny_prints_every_variant_and_ratio():
    proc = _script("bench_train.py", "--tiny", "--models", "resnet18")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = _json_lines(proc.stdout)
    assert res["model"] == "resnet18"
    assert set(res["images_per_s"]) == {"minimal", "ours_ce", "ours_pgt"}
    assert all(v > 0 for v in res["images_per_s"].values())
    table = proc.stdout.split("{")[0]
    for variant in res["images_per_s"]:
        assert f"  {variant} " in table
    for prefix, label in (("ratio_", "wall"), ("cpu_ratio_", "cpu ")):
        for key in ("ours_ce_vs_minimal", "ours_pgt_vs_ours_ce", "ours_pgt_vs_minimal"):
            r = res[prefix + key]
            assert 0 < r["ci95_lo"] <= r["median"] <= r["ci95_hi"]
            assert f"{label} {key}" in table


def test_training_path_imports_no_dali():
    """train.py (the entry point, loaded by file path) and the torch/synthetic data backends,
    in a fresh interpreter: DALI is imported only for data.backend=dali."""
    code = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('train_entry', 'train.py'); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "from powergrad.data import torch_backend, synthetic; "
        "assert 'powergrad.engine' in sys.modules; "
        "print(any(m.startswith('nvidia.dali') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
def test_trainer_step_never_syncs_the_host_on_cuda():
    """No .item(), no blocking copy, no stream sync between log steps, at bf16 and fp32 (fp16
    excluded: the GradScaler's inf check is one .item() per step by design)."""
    r = _self_check("no_host_sync", "--device", "cuda")["no_host_sync"]
    for precision in ("bf16", "fp32"):
        assert r[precision]["error"] is None, r[precision]["error"]
        assert r[precision]["steps"] == 6
    assert r["ok"]


def test_bench_optim_times_both_sgd_paths_on_the_same_gradients():
    proc = _script("bench_optim.py", "--models", "resnet18", "--rounds", "2", "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ((result,),) = _json_lines(proc.stdout)
    assert set(result["ms_per_step"]) == {"multi_tensor", "fused"}
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    assert result["ratio_multi_tensor_vs_fused"] > 0
    assert result["max_weight_diff"] < 1e-6  # the same update, up to float rounding
