"""The paper's "Method" column as objects: the training loss and the gradient clipper.

A method is its config (configs/method/*.yaml: ``alpha``, ``label_smoothing``, ``clip_mode``,
``clip_threshold``); its name is derived from those values by :func:`method_label`, never
stored beside them. The config was validated at the entry point; these builders trust it.
"""

from __future__ import annotations

from torch import nn

from powergrad.clip import GradClipper
from powergrad.pgt import TRANSFORM_LABELS, TRANSFORMS

__all__ = ["build_clipper", "build_loss", "method_label", "method_tags"]

# The paper's names for the clipping modes (Table 2's "GC" and "AGC").
_CLIP_LABELS = {"none": "", "norm": "gc", "agc": "agc"}


def method_label(alpha: float | None, clip_mode: str, impl: str = "exact") -> str:
    """The paper's Method-column name of a method's values: baseline, pgt, gc, agc, gc_pgt,
    agc_pgt (a registered transform other than PGT's gives its own label for "pgt")."""
    parts = [_CLIP_LABELS[clip_mode], TRANSFORM_LABELS[impl] if alpha is not None else ""]
    return "_".join(p for p in parts if p) or "baseline"


def build_loss(method) -> nn.Module:
    """Training loss: mean-reduced cross-entropy, with the backward transform ``impl``
    (:data:`powergrad.pgt.TRANSFORMS`: the exact PGT formula, the authors' hook, ...) when
    alpha is set."""
    if method.alpha is None:
        return nn.CrossEntropyLoss(label_smoothing=method.label_smoothing)
    return TRANSFORMS[method.impl](method.alpha, method.label_smoothing)


def build_clipper(method, model: nn.Module) -> GradClipper:
    """Gradient clipper over ``model``'s parameters (the trainer calls it after unscale_)."""
    return GradClipper(method.clip_mode, method.clip_threshold or 0.0, model)


def method_tags(method) -> list[str]:
    """Short tags describing the method, e.g. ``["method:pgt", "alpha:0.25"]``."""
    tags = [f"method:{method_label(method.alpha, method.clip_mode, method.impl)}"]
    if method.alpha is not None:
        tags.append(f"alpha:{method.alpha:g}")
    if method.impl != "exact":
        tags.append(f"impl:{method.impl}")
    if method.label_smoothing:
        tags.append(f"ls:{method.label_smoothing:g}")
    if method.clip_mode != "none":
        tags.append(f"clip:{method.clip_mode}:{method.clip_threshold:g}")
    return tags
