"""The benchmark scripts measure what they claim: the minimal loop and the trainer's step do the
same work, the scripts run end to end at toy sizes, the RSS sampler sees real allocations, the
training path imports no DALI, and (on CUDA) the trainer's step never waits for the GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_optim  # noqa: E402
import bench_train  # noqa: E402
import gpu_check  # noqa: E402


def _cfg(method="baseline", steps=2, device="cpu", precision="fp32"):
    return bench_train.compose_config(
        "resnet18",
        method,
        image_size=32,
        batch=4,
        steps=steps,
        precision=precision,
        channels_last=False,
        compile=False,
        device=device,
        threads=1,
    )


def test_minimal_loop_and_trainer_step_compute_the_same_training(tmp_path):
    """Same initial weights, same batch, same hyper-parameters: after two SGD steps the
    hand-written loop and powergrad.engine.train_one_epoch hold the same weights, BN
    statistics and momentum, and saw the same losses. So their timing ratio compares equal work."""
    cfg = _cfg()
    ctx, chunk = bench_train.build_ours(cfg, tmp_path / "ours")
    images, target = ctx.train_loader.batch
    model, optimizer, run = bench_train.build_minimal(cfg, images, target, 1000)
    ours_state = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    for key, value in model.state_dict().items():
        assert torch.equal(value, ours_state[key]), key
    run(2)
    chunk()
    after_ours = ctx.model.state_dict()
    after_min = model.state_dict()
    changed = 0
    for key, value in after_min.items():
        # The trainer's lr at its 2nd step is cos(pi / T) of the peak with T = 1e5 steps:
        # relative difference ~5e-10, far below this tolerance.
        torch.testing.assert_close(after_ours[key], value, rtol=1e-5, atol=1e-7, msg=key)
        changed += not torch.equal(value, ours_state[key])
    assert changed > 0  # the weights did move
    ours_momentum = [ctx.optimizer.state[p]["momentum_buffer"] for p in ctx.model.parameters()]
    min_momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    for a, b in zip(ours_momentum, min_momentum, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_trainer_meter_saw_the_minimal_loops_losses(tmp_path):
    cfg = _cfg(steps=3)
    ctx, _ = bench_train.build_ours(cfg, tmp_path / "ours")
    images, target = ctx.train_loader.batch
    _, _, run = bench_train.build_minimal(cfg, images, target, 1000)
    losses = torch.stack(run(3))
    from powergrad.engine import EpochMeter, TrainState, train_one_epoch

    meter = EpochMeter(torch.device("cpu"))
    train_one_epoch(ctx, TrainState(), meter)
    loss_sum, _, samples, nonfinite = meter.sums.tolist()
    assert samples == 12 and nonfinite == 0
    assert loss_sum / 4 == pytest.approx(losses.double().sum().item(), rel=1e-5)


def test_median_ci95_brackets_the_median():
    med, lo, hi = bench_train.median_ci95([float(x) for x in range(1, 22)])
    assert med == 11.0 and lo < med < hi
    assert bench_train.median_ci95([2.0])[0] == 2.0


def test_bench_train_tiny_prints_every_variant_and_ratio(capsys):
    results = bench_train.main(["--tiny", "--models", "resnet18"])
    (res,) = results
    assert set(res["images_per_s"]) == {"minimal", "ours_ce", "ours_pgt"}
    assert all(v > 0 for v in res["images_per_s"].values())
    for prefix in ("ratio_", "cpu_ratio_"):
        for key in ("ours_ce_vs_minimal", "ours_pgt_vs_ours_ce", "ours_pgt_vs_minimal"):
            r = res[prefix + key]
            assert 0 < r["ci95_lo"] <= r["median"] <= r["ci95_hi"]
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert json.loads(lines[-1])["model"] == "resnet18"


def test_peak_rss_sees_an_allocation(tmp_path):
    # 300 MiB written (not just reserved), held for a moment so the 0.1 s sampler sees it.
    code = "import time; b = b'x' * (300 * 2**20); time.sleep(0.6)"
    out = bench_train.peak_rss([sys.executable, "-c", code], tmp_path, {})
    assert out["peak_rss_main_mib"] >= 300
    assert out["peak_pss_tree_mib"] >= 250  # a sample may land before the last pages are touched


def test_training_path_imports_no_dali():
    code = (
        "import sys; import powergrad.build, powergrad.engine, powergrad.data; "
        "from powergrad.data import torch_backend, synthetic; "
        "print(any(m.startswith('nvidia.dali') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_gpu_check_runs_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(
        ["--device", "cpu", "--tiny", "--no-tests", "--models", "resnet18", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # Its value depends on what this process imported before (test_training_path_imports_no_dali
    # checks the property in a fresh interpreter).
    assert isinstance(report["imports"]["dali_imported_by_training_path"], bool)
    (bench,) = report["benchmarks"]
    assert "error" not in bench and bench["precision"] == "bf16" and bench["channels_last"]
    assert set(bench["images_per_s"]) == {"minimal", "ours_ce", "ours_pgt"}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_trainer_step_never_syncs_the_host_on_cuda(tmp_path, precision):
    """No .item(), no blocking copy, no stream sync between log steps (fp16 excluded: the
    GradScaler's inf check is one .item() per step by design)."""
    cfg = _cfg(steps=6, device="cuda", precision=precision)
    ctx, chunk = bench_train.build_ours(cfg, tmp_path / "ours")
    chunk()  # warm-up: cuDNN autotuning and lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chunk()  # steps 7..12: no log step (log_every_steps=50) inside
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(ctx.train_loader.steps) == 6


def test_bench_optim_times_both_sgd_paths_on_the_same_gradients():
    (result,) = bench_optim.main(["--models", "resnet18", "--rounds", "2", "--steps", "1"])
    assert set(result["ms_per_step"]) == {"multi_tensor", "fused"}
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    assert result["ratio_multi_tensor_vs_fused"] > 0
    assert result["max_weight_diff"] < 1e-6  # the same update, up to float rounding
