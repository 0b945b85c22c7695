"""The paper's "Method" column as objects: the training criterion and the gradient clipper.

``method.alpha`` null gives the ordinary cross-entropy (``nn.CrossEntropyLoss``); a number gives
:class:`powergrad.pgt.PowerGradCrossEntropy` (same loss value, PGT gradient). ``clip_mode`` /
``clip_threshold`` give a :class:`powergrad.clip.GradClipper`; a null threshold takes the
documented default of its mode.
"""

from __future__ import annotations

from torch import nn

from powergrad.clip import AGC_DEFAULT_CLIP_FACTOR, GC_DEFAULT_MAX_NORM, GradClipper
from powergrad.config import check_method
from powergrad.pgt import PowerGradCrossEntropy

__all__ = ["build_clipper", "build_criterion", "clip_threshold", "method_tags"]

_DEFAULT_THRESHOLDS = {"none": 0.0, "norm": GC_DEFAULT_MAX_NORM, "agc": AGC_DEFAULT_CLIP_FACTOR}


def build_criterion(method) -> nn.Module:
    """Training loss for ``cfg.method``: mean-reduced CE, with the PGT backward when alpha is set."""
    check_method(method)
    if method.alpha is None:
        return nn.CrossEntropyLoss(label_smoothing=method.label_smoothing)
    return PowerGradCrossEntropy(method.alpha, label_smoothing=method.label_smoothing)


def clip_threshold(method) -> float:
    """The clip threshold in use: ``method.clip_threshold`` or the mode's documented default."""
    if method.clip_threshold is not None:
        return float(method.clip_threshold)
    return _DEFAULT_THRESHOLDS[method.clip_mode]


def build_clipper(method, model: nn.Module) -> GradClipper:
    """Gradient clipper for ``cfg.method`` over ``model``'s parameters (call after unscale_)."""
    check_method(method)
    return GradClipper(method.clip_mode, clip_threshold(method), model)


def method_tags(method) -> list[str]:
    """Short tags describing the method, e.g. ``["method:pgt", "alpha:0.25"]``."""
    tags = [f"method:{method.name}"]
    if method.alpha is not None:
        tags.append(f"alpha:{method.alpha:g}")
    if method.label_smoothing:
        tags.append(f"ls:{method.label_smoothing:g}")
    if method.clip_mode != "none":
        tags.append(f"clip:{method.clip_mode}:{clip_threshold(method):g}")
    return tags
