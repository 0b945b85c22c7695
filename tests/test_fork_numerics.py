"""The authors' numerics (issue 23, items 1-2): their hook run through the trainer under fp16
AMP sees what the fork's saw, and the truncated transform equals the fork's hook on fp16 tensors.

The fork's code is in tests/fork_code.py, as they wrote it. fp16 autocast and GradScaler run on
the CPU here (torch >= 2.3); CUDA's fp16 arithmetic can differ in the last bit of a sum.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from fork_code import ForkLabelSmoothingCrossEntropy, fork_power_grad

from powergrad.checkpoint import TrainState
from powergrad.config import ConfigError, register_configs, validate_train
from powergrad.data import Shard, build_loaders
from powergrad.data.config import DataConfig, LoaderConfig
from powergrad.engine import EpochMeter, make_grad_scaler, train_one_epoch
from powergrad.method import build_loss, initial_loss_scale
from powergrad.models import build_model
from powergrad.optim import build_scheduler
from powergrad.pgt import TruncatedPGTCrossEntropy, fork_fp16_logit_grad, pgt_probs

register_configs()
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def _fork_grad(z16, target, alpha, ls):
    """The fork's step on fp16 logits ``z16``: its hook on them, its fp32 loss (autocast), the
    loss scaled by N^2 (GradScaler at N^2); returns the logits' fp16 gradient."""
    n, c = z16.shape
    x = z16.clone().requires_grad_()
    args = SimpleNamespace(num_classes=c, smoothing=ls, modify_softmax=alpha)
    x.register_hook(fork_power_grad(target, args))
    if ls:
        loss_fn = ForkLabelSmoothingCrossEntropy(ls, num_classes=c, device=z16.device)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()
    (loss_fn(x.float(), target) * float(n * n)).backward()
    return x.grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_authors_hook_through_the_engine_sees_the_forks_fp16_gradient(device):
    """train_one_epoch under fp16 autocast with method.impl=authors_hook (label smoothing on, as
    in Table 3): at every step the hook receives the fp16 logits gradient at the scaler's scale
    N^2 and returns exactly what the fork's power_grad returns for that fp16 tensor.
    (test_pgt.py compares the loss module with the fork's without smoothing too.)"""
    n, classes, alpha, ls = 8, 10, 0.25, 0.1
    device = torch.device(device)
    method = compose_train(
        "method=pgt", f"method.alpha={alpha}", f"method.label_smoothing={ls}",
        "method.impl=authors_hook",
    ).method  # fmt: skip
    data = DataConfig(
        name="synthetic",
        num_classes=classes,
        image_size=16,  # fp16 convolutions are slow on the CPU
        synthetic_train_images=2 * n,
        synthetic_val_images=n,
    )
    shard = Shard(n, device=device)
    loaders = build_loaders(data, LoaderConfig(backend="torch", workers=0), shard)
    torch.manual_seed(0)
    model = build_model("resnet18_nonorm", classes).to(device)
    seen = []

    def record(module, inputs, logits):
        step = {"logits": logits.detach().clone()}
        logits.register_hook(lambda g: step.update(incoming=g.clone()))  # runs before the loss's
        seen.append(step)

    model.register_forward_hook(record)
    model.get_classifier().register_full_backward_hook(
        lambda module, grad_in, grad_out: seen[-1].update(outgoing=grad_out[0].clone())
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = make_grad_scaler(device, "fp16", init_scale=initial_loss_scale(method, n))
    sched = build_scheduler(
        optimizer, compose_train().sched, epochs=1, warmup_epochs=0, iters_per_epoch=2
    )
    targets = [t for _, t in loaders.train.epoch(0)]
    steps = train_one_epoch(
        model, loaders.train, build_loss(method), optimizer, scaler, sched, lambda: None,
        EpochMeter(device), TrainState(), amp_dtype=torch.float16, channels_last=False,
    )  # fmt: skip
    args = SimpleNamespace(num_classes=classes, smoothing=ls, modify_softmax=alpha)
    for i, _ in enumerate(steps):
        step, target = seen[i], targets[i]
        assert step["logits"].dtype == step["incoming"].dtype == torch.float16
        # What the fork's hook received: its fp32 loss gradient at scale N^2, rounded to fp16.
        x = step["logits"].float().requires_grad_()
        fork_loss = ForkLabelSmoothingCrossEntropy(ls, num_classes=classes, device=device)
        (fork_loss(x, target) * float(n * n)).backward()
        assert torch.equal(step["incoming"], x.grad.half())
        assert torch.equal(step["outgoing"], fork_power_grad(target, args)(step["incoming"]))
        assert torch.equal(step["outgoing"], _fork_grad(step["logits"], target, alpha, ls))
    assert len(seen) == 2 and scaler.get_scale() == n * n


def _same(a, b):
    return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("n", [256, 12])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_truncated_transform_is_the_forks_hook_on_fp16_tensors(n, ls):
    """pgt_fp16_truncated, from fp32 logits at scale 1, gives the fork's unscaled logits
    gradient bit for bit, NaN where the fork's is NaN (with smoothing at N = 12 its recovered
    p of a row goes below 0); classes whose p underflows fp16 get p' = 0."""
    c, alpha = 1000, 0.05
    gen = torch.Generator().manual_seed(n)
    z16 = (8.0 * torch.randn(n, c, generator=gen)).half()  # RMS 8: the paper's logit norms
    target = torch.randint(0, c, (n,), generator=gen)
    fork = _fork_grad(z16, target, alpha, ls)
    assert _same(fork_fp16_logit_grad(z16, target, alpha, ls), fork)
    y = z16.float().requires_grad_()
    TruncatedPGTCrossEntropy(alpha, ls)(y, target).backward()
    # GradScaler unscales by multiplying with the fp32 reciprocal of S = N^2.
    assert _same(y.grad, fork.float() * torch.tensor(1.0 / (n * n)))
    assert bool(torch.isnan(fork).any()) == (n == 12 and ls > 0)
    if n == 256:
        q = (1.0 - ls) * F.one_hot(target, c) + ls / c
        p_fork = fork.float() / n + q
        truncated = (p_fork.abs() < 1e-6) & (F.one_hot(target, c) == 0)  # p' = 0, up to fp16 q
        assert truncated.float().mean() > 0.5  # most classes, at this logit norm
        exact = pgt_probs(z16.float(), alpha)
        assert (exact[truncated] > 0).all() and exact[truncated].sum() / n > 0.5


def test_truncated_transform_agrees_with_exact_pgt_at_small_logits():
    """Where no p underflows fp16 (RMS 2), the truncated transform is PGT up to fp16 rounding."""
    n, c, alpha = 256, 1000, 0.25
    gen = torch.Generator().manual_seed(1)
    z = 2.0 * torch.randn(n, c, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    grads = []
    for loss_fn in (
        TruncatedPGTCrossEntropy(alpha),
        build_loss(compose_train("method=pgt").method),
    ):
        x = z.clone().requires_grad_()
        loss_fn(x, target).backward()
        grads.append(x.grad * n)  # in units of p' - q
    assert (grads[0] - grads[1]).abs().sum(dim=1).median() < 5e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.precision=bf16"], "trainer.precision=bf16"),
        (["trainer.precision=fp32"], "trainer.precision=fp32"),
        (["trainer.precision=fp16", "trainer.accum_steps=2"], "trainer.accum_steps=2"),
    ],
)
def test_authors_hook_is_refused_where_it_cannot_be_exact(overrides, message, tmp_path):
    cfg = compose_train(
        "method=pgt", "method.impl=authors_hook", "trainer.device=cpu", f"data.root={tmp_path}",
        *overrides,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        validate_train(cfg, world_size=1)
    # The truncated transform replicates the fork's p' at any precision and accumulation.
    truncated = ("method=pgt", "method.impl=pgt_fp16_truncated", "trainer.device=cpu")
    validate_train(
        compose_train(*truncated, *[o for o in overrides if "fp16" not in o]), world_size=1
    )


def test_the_scaler_starts_at_the_per_rank_batch_squared_for_the_hook():
    hook = compose_train("method=pgt", "method.impl=authors_hook").method
    assert initial_loss_scale(hook, 256) == 2.0**16  # the fork's NativeScaler's first scale
    assert initial_loss_scale(compose_train("method=pgt").method, 256) is None
    assert make_grad_scaler(CPU, "fp16", init_scale=64.0**2).get_scale() == 4096.0


def test_numerics_script_measures_the_forks_truncation(tmp_path):
    """scripts/numerics.py on two logit scales: agreement at RMS 2, truncation at RMS 8."""
    cmd = [sys.executable, str(ROOT / "scripts" / "numerics.py"), "--out", str(tmp_path)]
    cmd += ["--rms", "2,8", "--alphas", "0.05,1", "--batches", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "numerics.json").read_text())
    by = {(p["rms"], p["alpha"]): p for p in result["points"]}
    assert by[(2.0, 0.05)]["l1_median"] < 0.01 and by[(2.0, 0.05)]["underflow_fraction"] < 1e-3
    assert by[(8.0, 0.05)]["l1_median"] > 1.0 and by[(8.0, 0.05)]["underflow_fraction"] > 0.5
    assert by[(8.0, 1.0)]["l1_median"] < 1e-3  # at alpha 1 the lost classes carry ~nothing
    assert (tmp_path / "numerics.png").stat().st_size > 0
    assert "| 8 (" in (tmp_path / "README.md").read_text()
