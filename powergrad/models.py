"""Models for the paper's tables: timm ResNets, the BN-free ResNet-18, checked checkpoint loading.

Every model is a plain ``timm`` model built with ``pretrained=False``, so ``get_classifier()``,
``reset_classifier()``, ``default_cfg`` and timm-format state dicts all work unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models import clean_state_dict
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "conv_layers_paper_order",
    "load_state_dict_strict",
    "load_timm_checkpoint",
    "per_filter_norms",
    "pretrained_file",
    "unwrap_model",
]

# Model name -> (timm architecture, extra timm kwargs). ``resnet18_nonorm`` is the authors'
# ``resnet18_wobn``: the same ResNet-18 with every BatchNorm replaced by an identity (Table 2).
_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("resnet18", {}),
    "resnet18_nonorm": ("resnet18", {"norm_layer": nn.Identity}),
    "resnet50": ("resnet50", {}),
    "seresnet50": ("seresnet50", {}),
    "resnet101": ("resnet101", {}),
    "seresnet18": ("seresnet18", {}),
}

MODEL_NAMES: tuple[str, ...] = tuple(_ARCHS)

# Signature of a timm ResNet state dict -> model name, used only to word error messages.
# Key: (blocks per stage, bottleneck?, squeeze-excitation?, has norm layers?).
_SIGNATURES: dict[tuple[tuple[int, ...], bool, bool, bool], str] = {
    ((2, 2, 2, 2), False, False, True): "resnet18",
    ((2, 2, 2, 2), False, False, False): "resnet18_nonorm",
    ((3, 4, 6, 3), True, False, True): "resnet50",
    ((3, 4, 6, 3), True, True, True): "seresnet50",
    ((3, 4, 23, 3), True, False, True): "resnet101",
    ((2, 2, 2, 2), False, True, True): "seresnet18",
}

# How many offending keys each error message lists per category.
_MAX_LISTED = 5


def build_model(
    name: str, num_classes: int = 1000, *, zero_init_last: bool = True, **kwargs: Any
) -> nn.Module:
    """Build one of :data:`MODEL_NAMES` as a randomly initialised timm model.

    Args:
        name: a name from :data:`MODEL_NAMES`.
        num_classes: classifier width (1000 for ImageNet-1K).
        zero_init_last: zero the last BatchNorm weight (gamma) of every residual block, so each
            block starts as its shortcut (timm's default, ``ResNet(zero_init_last=True)``).
            False starts every gamma at 1, which is what the authors' models did: their timm
            fork's ``init_weights`` guards the zeroing with ``isinstance(self.norm_layer,
            nn.BatchNorm2d)``, always False for the class it holds (docs/fork_evidence.md).
            No effect on ``resnet18_nonorm``, which has no norm layers.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``, ``drop_path_rate``).

    Raises:
        ValueError: for an unknown name, or a kwarg that would undo the variant's definition.
    """
    if name not in _ARCHS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    arch, variant_kwargs = _ARCHS[name]
    clash = sorted(set(variant_kwargs) & set(kwargs))
    if clash:
        raise ValueError(f"model {name!r} fixes {clash}; do not pass them")
    return timm.create_model(
        arch,
        pretrained=False,
        num_classes=num_classes,
        zero_init_last=zero_init_last,
        **variant_kwargs,
        **kwargs,
    )


def pretrained_file(name: str) -> str | None:
    """A local copy of timm's pretrained weights for model ``name`` (its default pretrained
    tag), or None: the pretrained_cfg's ``file``, the Hugging Face cache (``hf_hub_id``:
    model.safetensors / pytorch_model.bin) or torch.hub's cache of its ``url``. Never
    downloads (compute nodes have no network)."""
    if name == "resnet18_nonorm":
        return None  # timm has no weights for the BN-free variant
    cfg = timm.models.get_pretrained_cfg(_ARCHS[name][0])
    if cfg is None:
        return None
    if cfg.file and os.path.isfile(cfg.file):
        return str(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
            found = filename and try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return found
    if cfg.url:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        if os.path.isfile(cached):
            return cached
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the bare model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def load_timm_checkpoint(path: str | os.PathLike, *, use_ema: bool = False) -> dict[str, Any]:
    """Read model weights from a timm-style checkpoint file, on the CPU.

    Accepts a raw state dict, or a dict holding one under ``"state_dict"`` (timm train.py's
    ``checkpoint-*.pth.tar`` / ``model_best.pth.tar``, the format the authors released),
    ``"state_dict_ema"`` (its EMA weights, chosen with ``use_ema=True``) or ``"model"``.
    Loading uses ``weights_only=True``; the ``argparse.Namespace`` that timm stores under
    ``"args"`` is allow-listed so those files load without unpickling arbitrary code.

    Returns:
        The state dict (tensor values), still carrying any ``module.`` prefix;
        :func:`load_state_dict_strict` strips it.

    Raises:
        ValueError: when no state dict is found, or ``use_ema`` is set and there are no EMA weights.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
    if use_ema:
        if "state_dict_ema" not in obj:
            raise ValueError(f"{path}: use_ema=True but the checkpoint has no 'state_dict_ema'")
        state = obj["state_dict_ema"]
    elif "state_dict" in obj:
        state = obj["state_dict"]
    elif "model" in obj:
        state = obj["model"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise ValueError(
            f"{path}: no model weights found; top-level keys: {sorted(map(str, obj))[:10]}"
        )
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: model weights are a {type(state).__name__}, not a dict")
    return dict(state)


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _describe(state_dict: Mapping[str, Any]) -> str:
    """Guess 'resnet50 / num_classes=10' from the keys and shapes of a timm ResNet state dict."""
    blocks = []
    for stage in range(1, 5):
        indices = {
            int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))
        }
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = any(re.search(r"\.conv3\.weight$", k) for k in state_dict)
    se = any(".se." in k for k in state_dict)
    norm = any(re.search(r"(^|\.)bn\d\.weight$", k) for k in state_dict)
    name = _SIGNATURES.get(
        (tuple(blocks), bottleneck, se, norm),
        f"an unknown architecture (blocks per stage {tuple(blocks)}, "
        f"bottleneck={bottleneck}, se={se}, norm={norm})",
    )
    fc = state_dict.get("fc.weight")
    classes = f"num_classes={fc.shape[0]}" if isinstance(fc, torch.Tensor) else "no fc layer"
    return f"{name} / {classes}"


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, Any], *, source: str = ""
) -> nn.Module:
    """Copy a timm-format state dict into ``model``, refusing any architecture mismatch.

    All keys and shapes are compared before anything is copied, so a failed load leaves the
    model untouched. ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes on the
    checkpoint keys are stripped, and a wrapped ``model`` is unwrapped.

    Args:
        model: the (possibly wrapped) model to load into.
        state_dict: e.g. the result of :func:`load_timm_checkpoint`.
        source: where the weights came from (a path), quoted in error messages.

    Returns:
        The bare model that was loaded.

    Raises:
        ValueError: naming the first few missing keys, unexpected keys and shape mismatches,
            plus a guess of both architectures ("checkpoint looks like resnet50 / num_classes=10,
            model is resnet18 / num_classes=1000").
    """
    target = unwrap_model(model)
    state = clean_state_dict(dict(state_dict))  # timm's: drops module. / _orig_mod. prefixes
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(state[k])} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]
    if missing or unexpected or mismatched:
        where = f" from {source}" if source else ""
        lines = [f"cannot load weights{where}: architecture mismatch"]
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
                lines.append(f"  {len(items)} {label}: {', '.join(items[:_MAX_LISTED])}{more}")
        lines.append(f"  checkpoint looks like {_describe(state)}, model is {_describe(expected)}")
        raise ValueError("\n".join(lines))
    target.load_state_dict(state, strict=True)
    return target


def conv_layers_paper_order(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The ResNet's convolutions in forward order, as the paper numbers them (Section 5.2).

    For ResNet-18 this is 20 layers: the stem conv, then each block's ``conv1``, ``conv2`` and,
    where a block has one, its ``downsample`` conv (which timm runs after ``conv2``). The paper's
    layer ``i`` (1-based) is element ``i - 1``; its layer 11 is ``layer3.0.conv1`` (256 filters).
    Convolutions inside squeeze-excitation modules are not layers in this numbering.

    Returns:
        ``(qualified name, module)`` pairs; names are relative to the unwrapped model.
    """
    bare = unwrap_model(model)
    return [
        (name, module)
        for name, module in bare.named_modules()
        if isinstance(module, nn.Conv2d) and ".se." not in f".{name}."
    ]


def per_filter_norms(conv: nn.Conv2d | torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter of a conv weight: shape ``(out_channels,)``, float32."""
    weight = conv.weight if isinstance(conv, nn.Module) else conv
    return torch.linalg.vector_norm(weight.detach().float().flatten(1), dim=1)
