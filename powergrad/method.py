"""The paper's "Method" column as objects: the training loss and the gradient clipper.

A method is its config (configs/method/*.yaml: ``alpha``, ``label_smoothing``, ``clip_mode``,
``clip_threshold``); its name is derived from those values by :func:`method_label`, never
stored beside them. The config was validated at the entry point; these builders trust it.
"""

from __future__ import annotations

from torch import nn

from powergrad.clip import GradClipper
from powergrad.pgt import TRANSFORM_LABELS, TRANSFORMS

__all__ = ["build_clipper", "build_loss", "initial_loss_scale", "method_label", "method_tags"]

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


def initial_loss_scale(method, rank_batch: int) -> float | None:
    """fp16 GradScaler's starting scale the method needs, or None for torch's default (2**16).

    The authors' hook recovers p from the gradient assuming the loss scale is N**2, N the
    per-rank loader batch (``rank_batch``): the scaler starts there and then grows and backs
    off as torch's default, as the fork's NativeScaler did (fork train.py:172-174; timm 0.4.12
    utils/cuda.py:36-49: ``torch.cuda.amp.GradScaler()``, x2 after 2000 unskipped steps). With
    256 images per rank that is the fork's scaler exactly: each growth to 2 N**2 makes the hook
    return NaN, that step is skipped and the scale halves back to N**2.
    """
    return float(rank_batch) ** 2 if method.impl == "authors_hook" else None


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
