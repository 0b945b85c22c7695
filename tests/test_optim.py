"""powergrad.optim: linear-scaled Nesterov SGD, decay groups, the paper's per-iteration schedules."""

import math
import re

import pytest
import torch
from conftest import compose_train
from omegaconf import OmegaConf

from powergrad.config import ConfigError, SchedConfig, validate_train
from powergrad.models import build_model
from powergrad.optim import build_optimizer, build_scheduler, peak_lr

# The paper's ImageNet setting: global batch 1024, 100 epochs; 1,281,167 training images give
# 1251 full batches of 1024 per epoch (the training loader drops the last partial batch).
EPOCHS, IPE = 100, 1251
WARMUP = 5 * IPE  # iterations
TOTAL = EPOCHS * IPE  # iterations


def _scheduler(
    optimizer,
    *,
    name,
    epochs,
    iters_per_epoch,
    warmup_epochs=5,
    milestones=(30, 60, 90),
    **sched,
):
    """build_scheduler with a ``cfg.sched`` of the schema's defaults, milestones in epochs."""
    node = OmegaConf.structured(SchedConfig(name=name, **sched))
    node.milestones = [m / epochs for m in milestones]
    return build_scheduler(
        optimizer, node, epochs=epochs, warmup_epochs=warmup_epochs, iters_per_epoch=iters_per_epoch
    )


def _lr(optimizer) -> float:
    lrs = {g["lr"] for g in optimizer.param_groups}
    assert len(lrs) == 1, f"param groups disagree on lr: {lrs}"
    return lrs.pop()


def _lr_at(scheduler, optimizer, iteration: int) -> float:
    scheduler.step_update(iteration)
    return _lr(optimizer)


@pytest.fixture(scope="module")
def resnet18():
    return build_model("resnet18", num_classes=10)


def test_peak_lr_linear_scaling():
    assert peak_lr(0.1, 1024) == pytest.approx(0.4)
    assert peak_lr(0.1, 256) == pytest.approx(0.1)
    assert peak_lr(0.1, 512) == pytest.approx(0.2)
    for batch in (0, -256, 2.5, True):
        with pytest.raises(ValueError):
            peak_lr(0.1, batch)
    with pytest.raises(ValueError):
        peak_lr(0.0, 256)


def test_optimizer_flags_and_groups(resnet18):
    optimizer = build_optimizer(resnet18, global_batch=1024)
    assert isinstance(optimizer, torch.optim.SGD)
    by_param = {}
    for group in optimizer.param_groups:
        assert group["nesterov"] is True
        assert group["momentum"] == 0.9
        assert group["lr"] == pytest.approx(0.4)
        for p in group["params"]:
            assert id(p) not in by_param, "a parameter is in two groups"
            by_param[id(p)] = group["weight_decay"]
    named = dict(resnet18.named_parameters())
    assert set(by_param) == {id(p) for p in named.values()}
    for name, p in named.items():
        # Conv and linear weights decay; biases and BatchNorm scales/shifts do not.
        expected = 5e-4 if p.ndim > 1 else 0.0
        assert by_param[id(p)] == expected, name
    assert by_param[id(named["bn1.weight"])] == 0.0
    assert by_param[id(named["fc.bias"])] == 0.0
    assert by_param[id(named["fc.weight"])] == 5e-4
    assert by_param[id(named["layer3.0.downsample.0.weight"])] == 5e-4


def test_weight_decay_only_shrinks_weights():
    """One real step with zero loss gradient: only decayed weights move, by the Nesterov amount."""
    model = build_model("resnet18", num_classes=10)
    optimizer = build_optimizer(model, global_batch=256, lr_per_256=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # SGD: g = wd * w; buf = g; Nesterov direction = g + momentum * buf = 1.9 * wd * w.
    shrink = 1 - 0.1 * 1.9 * 5e-4
    for name, p in model.named_parameters():
        expected = before[name] * shrink if p.ndim > 1 else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)


def test_nesterov_can_be_disabled(resnet18):
    optimizer = build_optimizer(resnet18, global_batch=256, nesterov=False, weight_decay=0.0)
    assert all(g["nesterov"] is False for g in optimizer.param_groups)
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)


def test_cosine_pinned_iterations(resnet18):
    optimizer = build_optimizer(resnet18, global_batch=1024)
    scheduler = _scheduler(optimizer, name="cosine", epochs=EPOCHS, iters_per_epoch=IPE)
    # Building the scheduler sets iteration 0's lr before any step.
    assert _lr(optimizer) == pytest.approx(4e-4)
    assert _lr_at(scheduler, optimizer, 0) == pytest.approx(4e-4)
    assert _lr_at(scheduler, optimizer, 1) == pytest.approx(4e-4 + (0.4 - 4e-4) / WARMUP)
    assert _lr_at(scheduler, optimizer, WARMUP - 1) < 0.4
    assert _lr_at(scheduler, optimizer, WARMUP) == pytest.approx(0.4)
    # Cosine over the remaining T - W iterations; halfway, cos = 0 (to within half a step).
    half = WARMUP + (TOTAL - WARMUP) // 2
    assert _lr_at(scheduler, optimizer, half) == pytest.approx(0.2, abs=1e-5)
    last = _lr_at(scheduler, optimizer, TOTAL - 1)
    assert 0 < last < 0.4 * (math.pi / (TOTAL - WARMUP)) ** 2 / 4 * 1.01
    assert _lr_at(scheduler, optimizer, TOTAL) == 0.0


def test_cosine_with_min_lr(resnet18):
    optimizer = build_optimizer(resnet18, global_batch=1024)
    scheduler = _scheduler(
        optimizer, name="cosine", epochs=EPOCHS, iters_per_epoch=IPE, min_lr=1e-5
    )
    half = WARMUP + (TOTAL - WARMUP) // 2
    assert _lr_at(scheduler, optimizer, half) == pytest.approx(0.2 + 1e-5 / 2, abs=1e-5)
    assert _lr_at(scheduler, optimizer, TOTAL - 1) == pytest.approx(1e-5, abs=1e-9)
    assert _lr_at(scheduler, optimizer, TOTAL + 5) == pytest.approx(1e-5)


def test_cosine_with_cooldown_holds_min_lr_for_the_last_epochs(resnet18):
    """The authors' README recipe: cosine until epoch 90, then 10 epochs at min_lr."""
    optimizer = build_optimizer(resnet18, global_batch=1024)
    scheduler = _scheduler(optimizer, name="cosine", epochs=EPOCHS, iters_per_epoch=IPE, min_lr=1e-5,
        cooldown_epochs=10,
    )  # fmt: skip
    decay_end = 90 * IPE
    assert _lr_at(scheduler, optimizer, WARMUP) == pytest.approx(0.4)
    half = WARMUP + (decay_end - WARMUP) // 2
    assert _lr_at(scheduler, optimizer, half) == pytest.approx(0.2 + 1e-5 / 2, abs=1e-5)
    assert _lr_at(scheduler, optimizer, decay_end - 1) > 1e-5
    for i in (decay_end, decay_end + 1, 95 * IPE, TOTAL - 1):
        assert _lr_at(scheduler, optimizer, i) == pytest.approx(1e-5, rel=1e-12), i


def test_step_pinned_iterations(resnet18):
    optimizer = build_optimizer(resnet18, global_batch=1024)
    scheduler = _scheduler(optimizer, name="step", epochs=EPOCHS, iters_per_epoch=IPE)
    assert _lr(optimizer) == pytest.approx(4e-4)
    assert _lr_at(scheduler, optimizer, WARMUP) == pytest.approx(0.4)
    assert _lr_at(scheduler, optimizer, 30 * IPE - 1) == pytest.approx(0.4)
    assert _lr_at(scheduler, optimizer, 30 * IPE) == pytest.approx(0.04)
    assert _lr_at(scheduler, optimizer, 60 * IPE - 1) == pytest.approx(0.04)
    assert _lr_at(scheduler, optimizer, 60 * IPE) == pytest.approx(0.004)
    assert _lr_at(scheduler, optimizer, 90 * IPE - 1) == pytest.approx(0.004)
    assert _lr_at(scheduler, optimizer, 90 * IPE) == pytest.approx(0.0004)
    assert _lr_at(scheduler, optimizer, TOTAL - 1) == pytest.approx(0.0004)


def _closed_form(name, i, *, peak, epochs, ipe, warmup_epochs, warmup_lr, milestones):
    warmup, total = warmup_epochs * ipe, epochs * ipe
    if i < warmup:
        return warmup_lr + (peak - warmup_lr) * i / warmup
    if name == "cosine":
        return peak * (1 + math.cos(math.pi * (i - warmup) / (total - warmup))) / 2
    return peak * 0.1 ** sum(m * ipe <= i for m in milestones)


@pytest.mark.parametrize("name", ["cosine", "step"])
def test_trainer_loop_uses_closed_form_lr_each_iteration(name):
    """Drive the scheduler exactly as the trainer does and record the lr of every real step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer(model, global_batch=512)
    spec = dict(epochs=6, iters_per_epoch=4, warmup_epochs=2, warmup_lr=1e-3, milestones=(3, 5))
    scheduler = _scheduler(optimizer, name=name, **spec)
    used = []
    num_updates = 0
    for _epoch in range(spec["epochs"]):
        for _ in range(spec["iters_per_epoch"]):
            model(torch.randn(2, 4)).square().mean().backward()
            used.append(_lr(optimizer))
            optimizer.step()
            optimizer.zero_grad()
            num_updates += 1
            scheduler.step_update(num_updates)
    expected = [
        _closed_form(
            name,
            i,
            peak=0.2,
            epochs=6,
            ipe=4,
            warmup_epochs=2,
            warmup_lr=1e-3,
            milestones=(3, 5),
        )
        for i in range(24)
    ]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_resume_restores_the_schedule(resnet18, tmp_path):
    def fresh():
        opt = build_optimizer(resnet18, global_batch=1024)
        return opt, _scheduler(opt, name="cosine", epochs=EPOCHS, iters_per_epoch=IPE)

    optimizer, scheduler = fresh()
    k = 40_000
    scheduler.step_update(k)
    path = tmp_path / "last.pth"
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)
    state = torch.load(path, map_location="cpu", weights_only=True)

    resumed_opt, resumed_sched = fresh()
    assert _lr(resumed_opt) == pytest.approx(4e-4)  # a fresh schedule starts at warmup
    resumed_opt.load_state_dict(state["optimizer"])
    resumed_sched.load_state_dict(state["scheduler"])
    assert _lr(resumed_opt) == _lr(optimizer)
    for i in (k + 1, k + 1000, TOTAL - 1):
        assert _lr_at(resumed_sched, resumed_opt, i) == _lr_at(scheduler, optimizer, i)

    # Scheduler state alone is enough once step_update(num_updates) is called.
    only_sched_opt, only_sched = fresh()
    only_sched.load_state_dict(state["scheduler"])
    assert _lr_at(only_sched, only_sched_opt, k) == _lr_at(scheduler, optimizer, k)


# build_scheduler trusts its validated config; these reach a run only through the config.
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["sched.name=linear"], "sched.name='linear'"),
        (["trainer.warmup_epochs=100"], "warmup_epochs"),
        (["trainer.warmup_epochs=-1"], "warmup_epochs"),
        (["sched.min_lr=-1e-6"], "min_lr"),
        (["sched=step", "sched.milestones=[0.6,1.2]"], "fraction"),
        (["sched=step", "sched.milestones=[0.01,0.6]"], "after the warmup"),
        (["sched=step", "sched.decay_rate=1.5"], "decay_rate"),
        (["sched.cooldown_epochs=95"], "cooldown_epochs"),
        (["sched.cooldown_epochs=-1"], "cooldown_epochs"),
        (["sched.stepping=sometimes"], "sched.stepping"),
        (["sched=step", "sched.stepping=fork_epoch", "sched.milestones=[0.3,0.5]"], "multiples"),
        (["optim.peak_lr=0"], "peak_lr"),
    ],
)
def test_invalid_schedules_are_refused_by_the_config(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate_train(compose_train(*overrides), world_size=1)


def test_fused_sgd_takes_the_same_steps_up_to_rounding():
    """Real ResNet-18 forward/backward steps: fused SGD (the trainer's fp32/bf16 choice) equals the
    default multi-tensor SGD up to float rounding, decay groups and Nesterov included."""
    torch.manual_seed(0)
    base = build_model("resnet18", num_classes=10)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3, 5, 9])
    weights = {}
    for fused in (False, True):
        model = build_model("resnet18", num_classes=10)
        model.load_state_dict(base.state_dict())
        optimizer = build_optimizer(model, global_batch=256, fused=fused)
        for _ in range(4):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), target).backward()
            optimizer.step()
        weights[fused] = model.state_dict()
        assert optimizer.defaults["fused"] is fused and optimizer.param_groups[1]["fused"] is fused
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_fused_sgd_mishandles_a_skipped_first_step_so_no_grad_scaler_gets_it():
    # train.py builds fused SGD only without a GradScaler. Why: a first step the scaler skips must leave no optimizer state. The default SGD does;
    # fused SGD keeps momentum buffers made by torch.empty_like and never written.
    states = {}
    for fused in (False, True):
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        loss = model(torch.full((2, 4), float("inf"))).sum()  # an overflowing step
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        assert scaler.get_scale() == 2.0**15  # the scaler saw the overflow and backed off
        states[fused] = [s.get("momentum_buffer") for s in optimizer.state.values()]
    assert states[False] == [] and len(states[True]) == 2
