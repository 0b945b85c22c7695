"""The training loop on real components: digits files, timm ResNet-18, timm schedules, CPU."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train

from powergrad import distributed as pgdist
from powergrad.build import build_context, prepare_runtime
from powergrad.checkpoint import load_checkpoint
from powergrad.config import register_configs
from powergrad.diagnostics import LogitStats
from powergrad.engine import EpochMeter, NonFiniteLossError, TrainState, evaluate, fit, restore
from powergrad.pgt import PowerGradCrossEntropy

register_configs()


SUMMARY_KEYS = {
    "train_top1",
    "val_top1",
    "val_top5",
    "train_loss",
    "val_loss",
    "logit_norm",
    "epochs",
    "seed",
    "val_images",
    "git_sha",
    "wall_s",
}


def _context(run_dir, *overrides):
    cfg = compose_train(
        "logger=none",
        "loader.workers=0",
        "trainer.progress=false",
        "trainer.batch_size=64",
        "trainer.threads=1",
        *overrides,
    )
    prepare_runtime(cfg)
    run_dir.mkdir(exist_ok=True)
    return build_context(cfg, run_dir, pgdist.setup(cfg.trainer.device))


def test_logit_stats_match_the_closed_form():
    logits = torch.randn(50, 7, dtype=torch.float64) * 3 + 1
    stats = LogitStats()
    for chunk in logits.split(16):
        stats.update(chunk.float())
    out = stats.compute()
    z = logits.float().double()
    assert out["logit_norm"] == pytest.approx(z.norm(dim=1).mean().item(), rel=1e-9)
    assert out["logit_mean"] == pytest.approx(z.mean().item(), rel=1e-9)
    assert out["logit_max"] == pytest.approx(z.max().item(), rel=1e-9)
    assert out["logit_var"] == pytest.approx(z.var(unbiased=False).item(), rel=1e-9)


def test_evaluate_sees_every_val_image_once_and_matches_a_direct_pass(tmp_path):
    ctx = _context(tmp_path)
    out = evaluate(ctx.model, ctx.val_loader, device=torch.device("cpu"))
    assert out["images"] == 360
    ctx.model.eval()
    with torch.no_grad():
        pairs = [(ctx.model(x), y) for x, y in ctx.val_loader]
    logits = torch.cat([p[0] for p in pairs]).double()
    target = torch.cat([p[1] for p in pairs])
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    top5 = logits.topk(5, dim=1).indices
    assert out["top1"] == pytest.approx(100 * (top5[:, 0] == target).double().mean().item())
    assert out["top5"] == pytest.approx(
        100 * (top5 == target[:, None]).any(1).double().mean().item()
    )
    assert out["logit_norm"] == pytest.approx(logits.norm(dim=1).mean().item(), rel=1e-6)
    assert out["logit_var"] == pytest.approx(logits.var(unbiased=False).item(), rel=1e-5)


def test_method_builds_pgt_loss_and_clipper(tmp_path):
    ctx = _context(tmp_path, "method=agc_pgt", "method.alpha=0.5")
    assert isinstance(ctx.criterion, PowerGradCrossEntropy) and ctx.criterion.alpha == 0.5
    assert ctx.clipper.mode == "agc" and ctx.clipper.threshold == 0.01
    baseline = _context(tmp_path / "b")
    assert isinstance(baseline.criterion, torch.nn.CrossEntropyLoss)
    assert baseline.clipper.mode == "none"


def test_fit_learns_and_writes_records_checkpoints_and_filter_norms(tmp_path):
    ctx = _context(
        tmp_path,
        "method=pgt",
        "trainer.epochs=3",
        "trainer.warmup_epochs=0.5",
        "optim.lr_per_256=0.4",
        "trainer.filter_norms_every_steps=10",
    )
    summary = fit(ctx, TrainState())
    assert set(summary) >= SUMMARY_KEYS
    assert json.loads((tmp_path / "summary.json").read_text())["val_top1"] == summary["val_top1"]
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["step"] for h in history] == [22, 44, 66]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr"):
        assert all(key in h for h in history), key
    for key in ("logit_norm", "logit_mean", "logit_max", "logit_var"):
        assert all(f"val_{key}" in h and f"train_{key}" in h for h in history), key
    assert all(h["images_per_s"] > 0 and h["train_images"] == 22 * 64 for h in history)
    # Learning happened: well above chance (10 %) on held-out digits, loss going down.
    assert summary["val_top1"] > 50 and history[-1]["train_loss"] < history[0]["train_loss"]
    # Per-iteration cosine schedule: the lr after the last step is ~0 (min_lr), not the peak.
    assert history[-1]["lr"] < 1e-3 < history[0]["lr"]

    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (3, 0, 66)
    assert ckpt["config"]["method"]["alpha"] == 0.25 and ckpt["history"] == history
    assert set(ckpt["model"]) == set(ctx.model.state_dict())
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best_val_top1"] == max(h["val_top1"] for h in history[: best["epoch"]])
    # best.pt is the weights and their identity only; resuming state stays in last.pt.
    assert set(best["model"]) == set(ckpt["model"]) and "optimizer" not in best
    with pytest.raises(ValueError, match="weights only; resume from the run's last"):
        restore(ctx, best, EpochMeter(torch.device("cpu")))

    norms = [json.loads(x) for x in (tmp_path / "filter_norms.jsonl").read_text().splitlines()]
    assert [r["step"] for r in norms] == [10, 20, 30, 40, 50, 60]
    layers = norms[-1]["layers"]
    assert len(layers) == 20 and layers[10]["layer"] == 11 and len(layers[10]["norms"]) == 256


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr * weight_decay ~ 1e4: weights grow ~1e4-fold per step and overflow fp32 within a few
    # steps, a real divergence.
    ctx = _context(
        tmp_path,
        "optim.lr_per_256=1e8",
        "trainer.warmup_epochs=0",
        "trainer.checkpoint_every_steps=1",
        "trainer.log_every_steps=1",
    )
    with pytest.raises(NonFiniteLossError, match="Last good checkpoint"):
        fit(ctx, TrainState())
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert 0 < ckpt["step"] < 22
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "summary.json").exists()


def test_bf16_autocast_on_cpu_trains_one_epoch(tmp_path):
    ctx = _context(
        tmp_path,
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "trainer.precision=bf16",
        "trainer.device=cpu",
    )
    summary = fit(ctx, TrainState())
    assert summary["val_images"] == 360 and summary["nonfinite_losses"] == 0
    assert torch.isfinite(torch.tensor(summary["train_loss"]))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_cuda_precisions_with_channels_last(tmp_path, precision):
    ctx = _context(
        tmp_path,
        "trainer.epochs=2",
        f"trainer.precision={precision}",
        "trainer.channels_last=true",
        "trainer.device=cuda",
        "method=pgt",
    )
    assert ctx.scaler.is_enabled() == (precision == "fp16")
    summary = fit(ctx, TrainState())
    assert summary["val_images"] == 360 and summary["val_top1"] > 20
    assert summary["nonfinite_losses"] <= 2  # fp16: the scaler's first steps may overflow


@pytest.mark.gpu
def test_torch_compile_trains_and_checkpoints_the_bare_model(tmp_path):
    ctx = _context(
        tmp_path,
        "trainer.epochs=2",
        "trainer.compile=true",
        "trainer.precision=bf16",
        "trainer.device=cuda",
    )
    summary = fit(ctx, TrainState())
    assert summary["val_top1"] > 20
    keys = set(load_checkpoint(tmp_path / "last.pt")["model"])
    assert keys and not any(k.startswith("_orig_mod.") for k in keys)
