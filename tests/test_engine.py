"""The training loop on real components: digits files, timm ResNet-18, timm schedules, CPU."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train, train_in_process
from omegaconf import OmegaConf

from powergrad import checkpoint
from powergrad.checkpoint import CheckpointError, NonFiniteError
from powergrad.clip import GradClipper
from powergrad.config import register_configs
from powergrad.data import Shard, build_loaders
from powergrad.diagnostics import LogitStats
from powergrad.engine import evaluate, make_grad_scaler
from powergrad.method import build_clipper, build_loss
from powergrad.models import build_model
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


BASE = (
    "logger=none",
    "loader.workers=0",
    "trainer.progress=false",
    "trainer.batch_size=64",
    "trainer.threads=1",
)


def _train(run_dir, *overrides):
    return train_in_process(run_dir, *BASE, *overrides)


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


def test_evaluate_sees_every_val_image_once_and_matches_a_direct_pass():
    cfg = compose_train(*BASE)
    shard = Shard(batch_size=64, rank=0, world_size=1, device=torch.device("cpu"), seed=0)
    loaders = build_loaders(OmegaConf.to_object(cfg.data), OmegaConf.to_object(cfg.loader), shard)
    model = build_model("resnet18", loaders.num_classes)
    out = evaluate(model, loaders.val, device=torch.device("cpu"))
    assert out["images"] == 360
    model.eval()
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in loaders.val]
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


def test_method_builds_pgt_loss_and_clipper():
    model = build_model("resnet18", 10)
    method = compose_train("method=agc_pgt", "method.alpha=0.5").method
    loss, clip = build_loss(method), build_clipper(method, model)
    assert isinstance(loss, PowerGradCrossEntropy) and loss.alpha == 0.5
    assert isinstance(clip, GradClipper) and (clip.mode, clip.threshold) == ("agc", 0.01)
    baseline = compose_train().method
    assert isinstance(build_loss(baseline), torch.nn.CrossEntropyLoss)
    assert build_clipper(baseline, model).mode == "none"


def test_fit_learns_and_writes_records_checkpoints_and_filter_norms(tmp_path):
    summary = _train(
        tmp_path,
        "method=pgt",
        "trainer.epochs=3",
        "trainer.warmup_epochs=0.5",
        "optim.lr_per_256=0.4",
        "trainer.filter_norms_every_steps=10",
    )
    assert set(summary) >= SUMMARY_KEYS
    assert json.loads((tmp_path / "summary.json").read_text())["val_top1"] == summary["val_top1"]
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["step"] for h in history] == [22, 44, 66]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr"):
        assert all(key in h for h in history), key
    logit_keys = [f"logit_{k}" for k in ("norm", "mean", "max", "var")]
    logit_keys += [f"logit_{k}_per_image" for k in ("mean", "max", "var")]  # the fork's
    for key in (*logit_keys, "feature_norm", "feature_zeroed"):
        assert all(f"val_{key}" in h and f"train_{key}" in h for h in history), key
    assert all(h["val_feature_norm"] > 0 and 0 <= h["train_feature_zeroed"] <= 512 for h in history)
    assert all(h["images_per_s"] > 0 and h["train_images"] == 22 * 64 for h in history)
    # Learning happened: well above chance (10 %) on held-out digits, loss going down.
    assert summary["val_top1"] > 50 and history[-1]["train_loss"] < history[0]["train_loss"]
    # Per-iteration cosine schedule: the lr after the last step is ~0 (min_lr), not the peak.
    assert history[-1]["lr"] < 1e-3 < history[0]["lr"]

    ckpt = checkpoint.load(tmp_path / "last.pt")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (3, 0, 66)
    assert ckpt["config"]["method"]["alpha"] == 0.25 and ckpt["history"] == history
    assert set(ckpt["model"]) == set(build_model("resnet18", 10).state_dict())
    best = checkpoint.load(tmp_path / "best.pt")
    assert best["best_val_top1"] == max(h["val_top1"] for h in history[: best["epoch"]])
    assert best["best_epoch"] == best["epoch"] == summary["best_epoch"]
    assert summary["val_top1_best"] == best["best_val_top1"]
    assert summary["val_top1_final"] == summary["val_top1"] == history[-1]["val_top1"]
    # best.pt is the weights and their identity only; resuming state stays in last.pt.
    assert set(best["model"]) == set(ckpt["model"]) and "optimizer" not in best
    with pytest.raises(CheckpointError, match="weights only; resume from the run's last"):
        checkpoint.restore(
            best, model=None, optimizer=None, scaler=None, scheduler=None, meter=None, loader=None
        )

    norms = [json.loads(x) for x in (tmp_path / "filter_norms.jsonl").read_text().splitlines()]
    assert [r["step"] for r in norms] == [10, 20, 30, 40, 50, 60]
    layers = norms[-1]["layers"]
    assert len(layers) == 20 and layers[10]["layer"] == 11 and len(layers[10]["norms"]) == 256


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr * weight_decay ~ 1e4: weights grow ~1e4-fold per step and overflow fp32 within a few
    # steps, a real divergence.
    with pytest.raises(NonFiniteError, match=r"last good checkpoint: .*last\.pt"):
        _train(
            tmp_path,
            "optim.lr_per_256=1e8",
            "trainer.warmup_epochs=0",
            "trainer.checkpoint_every_steps=1",
            "trainer.log_every_steps=1",
        )
    ckpt = checkpoint.load(tmp_path / "last.pt")
    assert 0 < ckpt["step"] < 22
    # Parameters and buffers (BN running statistics) alike: nothing non-finite is written.
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "summary.json").exists()


def test_bf16_autocast_on_cpu_trains_one_epoch(tmp_path):
    summary = _train(
        tmp_path,
        "trainer.epochs=1",
        "trainer.warmup_epochs=0",
        "trainer.precision=bf16",
        "trainer.device=cpu",
    )
    assert summary["val_images"] == 360 and summary["nonfinite_losses"] == 0
    assert torch.isfinite(torch.tensor(summary["train_loss"]))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_cuda_precisions_with_channels_last(tmp_path, precision):
    summary = _train(
        tmp_path,
        "trainer.epochs=2",
        f"trainer.precision={precision}",
        "trainer.channels_last=true",
        "trainer.device=cuda",
        "method=pgt",
    )
    assert summary["val_images"] == 360 and summary["val_top1"] > 20
    assert summary["nonfinite_losses"] <= 2  # fp16: the scaler's first steps may overflow


@pytest.mark.gpu
def test_torch_compile_trains_and_checkpoints_the_bare_model(tmp_path):
    summary = _train(
        tmp_path,
        "trainer.epochs=2",
        "trainer.compile=true",
        "trainer.precision=bf16",
        "trainer.device=cuda",
    )
    assert summary["val_top1"] > 20
    keys = set(checkpoint.load(tmp_path / "last.pt")["model"])
    assert keys and not any(k.startswith("_orig_mod.") for k in keys)


def test_skip_nonfinite_steps_skips_like_the_fp16_scaler_and_is_exact_otherwise():
    assert not make_grad_scaler(torch.device("cpu"), "fp32").is_enabled()
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    base = torch.nn.Linear(8, 3).state_dict()

    def fresh():
        model = torch.nn.Linear(8, 3)
        model.load_state_dict(base)
        return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True)

    model, opt = fresh()
    scaler = make_grad_scaler(torch.device("cpu"), "fp32", skip_nonfinite_steps=True)
    for step in range(4):
        loss = F.cross_entropy(model(x), y)
        if step == 1:
            loss = loss * float("nan")  # a non-finite step: skipped, optimizer state untouched
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    # Three plain SGD steps give the same weights bit for bit: the scale is a power of two.
    plain, plain_opt = fresh()
    for _ in range(3):
        plain_opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()
    for k, v in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_compiled_evaluation_compiles_once_and_scores_like_eager():
    # 20 val images in batches of 8: 8, 8, 4. Dynamo's guards, hence its recompilations, do not
    # depend on the backend; "eager" runs the captured graphs with the ordinary kernels
    # (inductor's C++ build takes minutes on 2 cores; the GPU check compiles for real).
    from torch._dynamo.utils import counters

    from powergrad.data.config import DataConfig, LoaderConfig

    data = DataConfig(
        name="synthetic",
        num_classes=4,
        image_size=16,
        synthetic_train_images=16,
        synthetic_val_images=20,
    )
    loaders = build_loaders(data, LoaderConfig(backend="torch", workers=0), Shard(batch_size=8))
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # tiny, with BatchNorm: train and eval differ
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    net = torch.compile(model, backend="eager")

    def train_step():
        model.train()
        images, target = next(iter(loaders.train.epoch(0)))
        F.cross_entropy(net(images), target).backward()

    def graphs():
        return counters["stats"]["unique_graphs"]

    torch._dynamo.reset()
    counters.clear()
    try:
        train_step()
        assert graphs() == 1
        compiled = evaluate(net, loaders.val, device=cpu, pad_last_batch=True)
        # Eval mode without grad: one compilation, the last batch (4 images) included.
        assert graphs() == 2
        eager = evaluate(model, loaders.val, device=cpu)
        train_step()
        evaluate(net, loaders.val, device=cpu, pad_last_batch=True)
        assert graphs() == 2  # the next epoch reuses both graphs
        evaluate(net, loaders.val, device=cpu)
        assert graphs() == 3  # unpadded, the smaller last batch is compiled once more
    finally:
        torch._dynamo.reset()
    assert compiled["images"] == eager["images"] == 20
    assert compiled["top1"] == eager["top1"] and compiled["top5"] == eager["top5"]
    for key in ("loss", "logit_norm", "logit_mean", "logit_max", "logit_var"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5), key
