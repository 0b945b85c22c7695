"""powergrad.models: the paper's architectures, checked checkpoint loading, paper conv indexing."""

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from powergrad.models import (
    MODEL_NAMES,
    build_model,
    conv_layers_paper_order,
    load_state_dict_strict,
    load_timm_checkpoint,
    per_filter_norms,
)
from powergrad.optim import build_optimizer

# timm's canonical parameter counts at num_classes=1000 (timm model cards / pretrained_cfg).
# resnet18_nonorm is ResNet-18 minus the affine parameters of its 20 BatchNorms:
# 2 * (64 + 4*64 + 5*128 + 5*256 + 5*512) = 9,600 parameters fewer.
CANONICAL_PARAMS = {
    "resnet18": 11_689_512,
    "resnet18_nonorm": 11_689_512 - 9_600,
    "resnet50": 25_557_032,
    "seresnet50": 28_088_024,
    "resnet101": 44_549_160,
    "seresnet18": 11_779_624,
}

# What timm.create_model call produces each architecture, independently of build_model.
TIMM_REFERENCE = {
    "resnet18": ("resnet18", {}),
    "resnet18_nonorm": ("resnet18", {"norm_layer": nn.Identity}),
    "resnet50": ("resnet50", {}),
    "seresnet50": ("seresnet50", {}),
    "resnet101": ("resnet101", {}),
    "seresnet18": ("seresnet18", {}),
}


def _norm_modules(model: nn.Module) -> list[str]:
    """Names of every normalization module: torch's norm classes or any class named *Norm*."""
    torch_norms = (
        nn.modules.batchnorm._NormBase,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
        nn.RMSNorm,
    )
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch_norms) or "norm" in type(m).__name__.lower()
    ]


def _timm_checkpoint(state_dict: dict, arch: str) -> dict:
    """The dict timm's train.py CheckpointSaver writes to checkpoint-*.pth.tar."""
    return {
        "epoch": 3,
        "arch": arch,
        "state_dict": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.4, "params": [0, 1]}]},
        "version": 2,
        "args": argparse.Namespace(model=arch, lr=0.4, modify_softmax=0.25, clip_mode="agc"),
        "metric": 69.844,
    }


def test_model_names_cover_the_paper():
    assert set(MODEL_NAMES) == set(CANONICAL_PARAMS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count_matches_timm(name):
    model = build_model(name)
    assert isinstance(model, timm.models.ResNet)
    assert sum(p.numel() for p in model.parameters()) == CANONICAL_PARAMS[name]
    assert model.get_classifier().out_features == 1000


def test_num_classes_and_kwargs_reach_timm():
    model = build_model("resnet18", num_classes=10, drop_rate=0.25)
    assert model.get_classifier().out_features == 10
    assert model.drop_rate == 0.25


BN_MODELS = [name for name in MODEL_NAMES if name != "resnet18_nonorm"]


def _last_bns(model: nn.Module) -> set[int]:
    """ids of the last BatchNorm of every residual block (bn2 of a BasicBlock, bn3 otherwise)."""
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    return {id(b.bn2 if isinstance(b, BasicBlock) else b.bn3) for b in blocks}


@pytest.mark.parametrize("name", BN_MODELS)
def test_zero_init_last_false_starts_every_gamma_at_one(name):
    """The authors' fork never zeroed a gamma (docs/fork_evidence.md): all BN weights are 1."""
    model = build_model(name, zero_init_last=False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("name", BN_MODELS)
def test_default_zero_inits_exactly_the_last_bn_of_each_block(name):
    torch.manual_seed(0)
    model = build_model(name)
    torch.manual_seed(0)
    fork_like = build_model(name, zero_init_last=False)
    last = _last_bns(model)
    assert len(last) == {"resnet18": 8, "seresnet18": 8, "resnet101": 33}.get(name, 16)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            expected = torch.zeros_like if id(m) in last else torch.ones_like
            assert torch.equal(m.weight, expected(m.weight))
    # Zeroing draws no random numbers: every other tensor is the same under the same seed.
    ours, theirs = model.state_dict(), fork_like.state_dict()
    differing = {k for k in ours if not torch.equal(ours[k], theirs[k])}
    assert differing == {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and id(m) in last
    }


def test_zero_init_last_is_a_no_op_without_norm_layers():
    torch.manual_seed(0)
    default = build_model("resnet18_nonorm").state_dict()
    torch.manual_seed(0)
    fork_like = build_model("resnet18_nonorm", zero_init_last=False).state_dict()
    assert all(torch.equal(default[k], fork_like[k]) for k in default)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18_nonorm") as info:
        build_model("resnet34")
    assert all(name in str(info.value) for name in MODEL_NAMES)


def test_nonorm_variant_refuses_a_norm_layer():
    with pytest.raises(ValueError, match="norm_layer"):
        build_model("resnet18_nonorm", norm_layer=nn.BatchNorm2d)


def test_nonorm_has_no_normalization_at_all():
    assert _norm_modules(build_model("resnet18")), "the detector must see ResNet-18's BNs"
    model = build_model("resnet18_nonorm")
    assert _norm_modules(model) == []
    assert not any("running_" in name for name, _ in model.named_buffers())
    # Same topology otherwise: the conv and fc weights are shaped as in ResNet-18.
    reference = {k: v.shape for k, v in build_model("resnet18").state_dict().items()}
    for key, value in model.state_dict().items():
        assert reference[key] == value.shape


def test_nonorm_trains_a_step_on_a_tiny_input():
    torch.manual_seed(0)
    model = build_model("resnet18_nonorm", num_classes=10)
    optimizer = build_optimizer(model, global_batch=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    optimizer.step()
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loads_timm_checkpoint_of_its_architecture(name, tmp_path):
    arch, kwargs = TIMM_REFERENCE[name]
    torch.manual_seed(1)
    source = timm.create_model(arch, pretrained=False, **kwargs)
    # Non-default BN statistics, so buffers are checked as well as parameters.
    for value in source.state_dict().values():
        if value.is_floating_point():
            value.add_(torch.rand_like(value))
    path = tmp_path / "model_best.pth.tar"
    torch.save(_timm_checkpoint(source.state_dict(), arch), path)

    torch.manual_seed(2)
    model = build_model(name)
    loaded = load_state_dict_strict(model, load_timm_checkpoint(path), source=str(path))
    assert loaded is model
    expected, actual = source.state_dict(), model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_raw_state_dict_with_ddp_prefix_and_ema_choice(tmp_path):
    source = build_model("resnet18", num_classes=10)
    raw = tmp_path / "raw.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, raw)
    model = build_model("resnet18", num_classes=10)
    load_state_dict_strict(model, load_timm_checkpoint(raw))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    # DDP around torch.compile: both wrapper prefixes are stripped.
    compiled = {f"module._orig_mod.{k}": v + 1 for k, v in source.state_dict().items()}
    load_state_dict_strict(model, compiled)
    assert torch.equal(model.fc.bias, source.fc.bias + 1)

    ema = {k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    checkpoint = _timm_checkpoint(source.state_dict(), "resnet18") | {"state_dict_ema": ema}
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save(checkpoint, path)
    assert torch.equal(load_timm_checkpoint(path)["fc.bias"], source.fc.bias)
    assert torch.equal(load_timm_checkpoint(path, use_ema=True)["fc.bias"], ema["fc.bias"])

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": source.state_dict()}, wrapped)
    assert torch.equal(load_timm_checkpoint(wrapped)["fc.weight"], source.fc.weight)
    with pytest.raises(ValueError, match="state_dict_ema"):
        load_timm_checkpoint(wrapped, use_ema=True)


def test_checkpoint_without_weights_is_refused(tmp_path):
    path = tmp_path / "not_a_model.pth"
    torch.save({"epoch": 3, "metric": 1.0}, path)
    with pytest.raises(ValueError, match="no model weights"):
        load_timm_checkpoint(path)


def test_wrong_architecture_is_named_and_nothing_is_copied():
    model = build_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = build_model("resnet50", num_classes=10).state_dict()
    # Same-named, same-shaped tensor: must not be copied when the load is refused.
    wrong["conv1.weight"] = torch.full_like(wrong["conv1.weight"], 7.0)
    with pytest.raises(ValueError) as info:
        load_state_dict_strict(model, wrong, source="runs/r50/model_best.pth.tar")
    message = str(info.value)
    assert "runs/r50/model_best.pth.tar" in message
    assert "unexpected keys" in message and "layer1.0.conv3.weight" in message
    assert "shape mismatches" in message and "layer1.0.conv1.weight" in message
    assert "checkpoint looks like resnet50 / num_classes=10" in message
    assert "model is resnet18 / num_classes=1000" in message
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_tensor_value_is_a_mismatch():
    state = build_model("resnet18", num_classes=10).state_dict()
    state["fc.bias"] = None
    with pytest.raises(ValueError, match=r"fc\.bias: checkpoint NoneType vs model \(10,\)"):
        load_state_dict_strict(build_model("resnet18", num_classes=10), state)


def test_class_count_and_norm_mismatches_are_named():
    with pytest.raises(
        ValueError, match=r"fc\.weight: checkpoint \(10, 512\) vs model \(1000, 512\)"
    ):
        load_state_dict_strict(build_model("resnet18"), build_model("resnet18", 10).state_dict())
    with pytest.raises(ValueError, match=r"missing keys: bn1\.weight") as info:
        load_state_dict_strict(build_model("resnet18"), build_model("resnet18_nonorm").state_dict())
    assert "checkpoint looks like resnet18_nonorm" in str(info.value)


def test_paper_conv_order_matches_forward_order():
    model = build_model("resnet18_nonorm", num_classes=10)
    layers = conv_layers_paper_order(model)
    assert len(layers) == 20
    # The paper's layer 11 (1-based) has 256 filters; the stem has 64, the last conv 512.
    assert layers[10][1].out_channels == 256
    assert layers[0][1].out_channels == 64 and layers[-1][1].out_channels == 512
    assert [name for name, _ in layers if "downsample" in name] == [
        "layer2.0.downsample.0",
        "layer3.0.downsample.0",
        "layer4.0.downsample.0",
    ]
    executed = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: executed.append(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert [name for name, _ in layers] == executed


def test_se_convs_are_not_paper_layers():
    layers = conv_layers_paper_order(build_model("seresnet18"))
    assert len(layers) == 20 and all(".se." not in name for name, _ in layers)


def test_per_filter_norms():
    conv = nn.Conv2d(3, 5, kernel_size=3)
    with torch.no_grad():
        conv.weight[2].zero_()
    norms = per_filter_norms(conv)
    expected = torch.stack([conv.weight[i].detach().pow(2).sum().sqrt() for i in range(5)])
    assert norms.shape == (5,)
    torch.testing.assert_close(norms, expected)
    assert norms[2] == 0
    assert torch.equal(per_filter_norms(conv.weight), norms)
