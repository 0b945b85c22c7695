"""Gradient clipping for the paper's Table 2: global-norm clipping (GC) and adaptive clipping (AGC).

Both are "Type I" gradient changes: they rewrite each parameter's ``.grad`` after the backward
pass. The trainer calls the clipper after ``GradScaler.unscale_(optimizer)`` and before
``scaler.step(optimizer)``, so thresholds apply to true (unscaled) gradients. Under DDP the
gradients are already all-reduced, so every rank computes the same clipping.

The paper does not state its thresholds; configs/method/gc.yaml and agc.yaml hold the usual
published values, with their sources.
"""

from __future__ import annotations

from timm.models._manipulate import model_parameters
from timm.utils import dispatch_clip_grad
from torch import nn

from powergrad.models import unwrap_model

__all__ = ["CLIP_MODES", "GradClipper"]

CLIP_MODES: tuple[str, ...] = ("none", "norm", "agc")


class GradClipper:
    """Clip the current gradients of ``model`` in place, the way timm's train.py does.

    Modes:
        ``"none"``: do nothing.
        ``"norm"`` (GC): scale all gradients so their global L2 norm is at most ``threshold``
            (``torch.nn.utils.clip_grad_norm_`` over every parameter, head included).
        ``"agc"`` (AGC): for each output unit (row of a linear weight, filter of a conv weight;
            a whole tensor for 1-D parameters), clip the gradient norm to
            ``threshold * max(||w||, 1e-3)`` (timm's ``adaptive_clip_grad``). The classifier
            head is excluded, as in NFNets and timm's ``model_parameters(exclude_head=True)``,
            which drops the last two parameters (the head's weight and bias).

    Args:
        mode: one of :data:`CLIP_MODES`.
        threshold: GC max norm or AGC clip factor; must be finite and > 0 (ignored for "none").
        model: the model whose gradients are clipped; DDP/compile wrappers are unwrapped.
    """

    def __init__(self, mode: str, threshold: float, model: nn.Module) -> None:
        self.mode = mode
        self.threshold = float(threshold)
        bare = unwrap_model(model)
        # Resolved once: the parameter list (and which ones count as the head) is fixed.
        self.parameters = list(model_parameters(bare, exclude_head=mode == "agc"))

    def __call__(self) -> None:
        """Clip the ``.grad`` of the selected parameters in place (no host sync)."""
        if self.mode == "none":
            return
        dispatch_clip_grad(self.parameters, value=self.threshold, mode=self.mode)

    def __repr__(self) -> str:
        return f"GradClipper(mode={self.mode!r}, threshold={self.threshold})"
