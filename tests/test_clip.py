"""powergrad.clip: GC equals torch's clip_grad_norm_, AGC clips unit-wise and spares the head."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import compose_train
from timm.utils.agc import adaptive_clip_grad
from torch import nn

from powergrad.clip import GradClipper
from powergrad.config import ConfigError, validate_train
from powergrad.models import build_model

HEAD = ("fc.weight", "fc.bias")


def _with_grads(name: str = "resnet18", seed: int = 0) -> nn.Module:
    """A real model with real cross-entropy gradients from a tiny batch."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    F.cross_entropy(model(images), labels).backward()
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """An independent copy of ``model`` including its ``.grad`` tensors (deepcopy drops them)."""
    clone = copy.deepcopy(model)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        q.grad = p.grad.clone()
    return clone


def _total_norm(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _unit_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-output-unit L2 norms (whole-tensor norm for 1-D), broadcastable against ``x``."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x.flatten(1), dim=1).view(-1, *[1] * (x.ndim - 1))


def test_method_files_hold_the_cited_thresholds():
    assert compose_train("method=agc").method.clip_threshold == 0.01  # NFNets, timm's AGC
    assert compose_train("method=gc").method.clip_threshold == 1.0  # ViT's global norm 1


def test_none_is_a_no_op():
    model = _with_grads()
    before = _grads(model)
    GradClipper("none", 0.0, model)()
    after = _grads(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


# The clipper trusts its validated inputs; the config refuses bad ones at start-up.
@pytest.mark.parametrize("mode", ["value", "AGC"])
def test_unknown_mode_is_refused_by_the_config(mode):
    with pytest.raises(ConfigError, match=r"method\.clip_mode"):
        validate_train(compose_train(f"method.clip_mode={mode}"), world_size=1)


@pytest.mark.parametrize("threshold", ["0.0", "-1.0", "nan", "inf", "null"])
@pytest.mark.parametrize("method", ["gc", "agc"])
def test_bad_threshold_is_refused_by_the_config(method, threshold):
    cfg = compose_train(f"method={method}", f"method.clip_threshold={threshold}")
    with pytest.raises(ConfigError, match=r"needs method\.clip_threshold > 0"):
        validate_train(cfg, world_size=1)


def test_gc_equals_torch_clip_grad_norm():
    model = _with_grads("resnet18_nonorm")
    reference = _copy_with_grads(model)
    norm_before = _total_norm(p.grad for p in model.parameters())
    max_norm = norm_before / 4  # clipping must actually happen for the test to mean anything
    GradClipper("norm", max_norm, model)()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    assert _total_norm(p.grad for p in model.parameters()) == pytest.approx(max_norm, rel=1e-5)


def test_gc_below_threshold_changes_nothing():
    model = _with_grads()
    before = _grads(model)
    GradClipper("norm", 10 * _total_norm(before.values()), model)()
    after = _grads(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_agc_clips_unit_wise_and_spares_the_head():
    model = _with_grads()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model)
    # A clip factor at the median grad/weight ratio of the stem's filters clips about half of
    # them, so both branches of the rule are exercised on real gradients.
    ratios = _unit_norms(grads["conv1.weight"]) / _unit_norms(weights["conv1.weight"]).clamp(
        min=1e-3
    )
    clip_factor = float(ratios.flatten().median())

    reference = _copy_with_grads(model)
    GradClipper("agc", clip_factor, model)()
    body = [p for n, p in reference.named_parameters() if n not in HEAD]
    adaptive_clip_grad(body, clip_factor=clip_factor)

    clipped_units = 0
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, dict(reference.named_parameters())[name].grad), name
        if name in HEAD:
            assert torch.equal(p.grad, grads[name]), f"head grad {name} was changed"
            continue
        # NFNets' rule, written out: each unit's grad norm is capped at
        # clip_factor * max(||w_unit||, 1e-3); units under the cap keep their gradient.
        g, w = grads[name], weights[name]
        cap = clip_factor * _unit_norms(w).clamp(min=1e-3)
        g_norm = _unit_norms(g)
        expected = torch.where(g_norm < cap, g, g * cap / g_norm.clamp(min=1e-6))
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-12, msg=name)
        clipped_units += int((g_norm >= cap).sum())
        if name == "conv1.weight":
            per_filter = _unit_norms(p.grad).flatten()
            over = (_unit_norms(g) >= cap).flatten()
            assert 0 < int(over.sum()) < over.numel()
            torch.testing.assert_close(per_filter[over], cap.flatten()[over], rtol=1e-5, atol=0)
    assert clipped_units > 0


def test_agc_tiny_factor_clips_everything_but_the_head():
    model = _with_grads("resnet18_nonorm")
    before = _grads(model)
    GradClipper("agc", 1e-9, model)()
    for name, p in model.named_parameters():
        if name in HEAD:
            assert torch.equal(p.grad, before[name]), name
        else:
            assert _unit_norms(p.grad).max() < _unit_norms(before[name]).max(), name


@pytest.fixture
def process_group(tmp_path):
    """A real single-process gloo group, so DistributedDataParallel can wrap a CPU model."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["norm", "agc"])
def test_works_on_a_ddp_wrapped_model(process_group, mode):
    torch.manual_seed(0)
    bare = build_model("resnet18_nonorm", num_classes=10)
    reference = copy.deepcopy(bare)
    ddp = nn.parallel.DistributedDataParallel(bare)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    F.cross_entropy(ddp(images), labels).backward()
    F.cross_entropy(reference(images), labels).backward()

    clipper = GradClipper(mode, 1e-3, ddp)
    expected_params = [p for n, p in bare.named_parameters() if mode == "norm" or n not in HEAD]
    assert [id(p) for p in clipper.parameters] == [id(p) for p in expected_params]
    clipper()
    GradClipper(mode, 1e-3, reference)()
    for (name, p), q in zip(bare.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9, msg=name)
