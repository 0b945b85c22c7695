"""Training diagnostics: the paper's logit statistics (Section 5.3) and per-filter weight norms.

:class:`LogitStats` accumulates on the logits' device; nothing leaves the device until
:meth:`LogitStats.compute`, called once per epoch. :func:`filter_norm_record` is the
per-filter L2 norm snapshot behind the paper's Figs. 4-6 (filters that "zero out").
"""

from __future__ import annotations

import torch
from torch import nn

from powergrad.distributed import all_reduce_max, all_reduce_sum
from powergrad.models import conv_layers_paper_order, per_filter_norms

__all__ = ["ZERO_FILTER_NORM", "LogitStats", "filter_norm_record"]

# A filter whose weight L2 norm is below this counts as "zeroed out" (paper Section 5.2).
ZERO_FILTER_NORM = 1e-6


class LogitStats:
    """Running logit statistics over every sample seen: no host sync until :meth:`compute`.

    Reported: ``logit_norm`` (mean over samples of the L2 norm of the logit vector),
    ``logit_mean``, ``logit_max`` and ``logit_var`` (mean, max and population variance over all
    N x C logit entries). Sums are float64 so the variance does not cancel.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # [sum of per-sample norms, samples, sum of entries, sum of squared entries, entries]
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.max = torch.full((), -torch.inf, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        """Add a batch of logits (N x C)."""
        z = logits.detach().double()
        # Counts are filled on the device: new_tensor(count) would copy a host scalar with a
        # blocking H2D memcpy, a host sync per call on CUDA.
        batch = torch.stack(
            [
                torch.linalg.vector_norm(z, dim=1).sum(),
                torch.full((), z.shape[0], dtype=z.dtype, device=z.device),
                z.sum(),
                z.square().sum(),
                torch.full((), z.numel(), dtype=z.dtype, device=z.device),
            ]
        )
        self.sums += batch
        torch.maximum(self.max, z.max(), out=self.max)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums (CPU tensors), for a mid-epoch checkpoint."""
        return {"sums": self.sums.cpu(), "max": self.max.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore running sums saved by :meth:`state_dict`."""
        self.sums.copy_(state["sums"])
        self.max.copy_(state["max"])

    def compute(self) -> dict[str, float]:
        """Statistics over all ranks (one all-reduce, one host sync)."""
        sums = all_reduce_sum(self.sums.clone())
        peak = all_reduce_max(self.max.clone())
        norm_sum, samples, total, squares, entries = sums.tolist()
        if samples == 0:
            nan = float("nan")
            return {"logit_norm": nan, "logit_mean": nan, "logit_max": nan, "logit_var": nan}
        mean = total / entries
        return {
            "logit_norm": norm_sum / samples,
            "logit_mean": mean,
            "logit_max": float(peak),
            "logit_var": max(squares / entries - mean * mean, 0.0),
        }


@torch.no_grad()
def filter_norm_record(model: nn.Module) -> dict[str, object]:
    """Per-filter L2 norms of every conv layer, in the paper's layer order (1-based).

    Returns ``{"layers": [{"layer": i, "name": ..., "norms": [...], "zeroed": k}, ...],
    "zeroed": total}`` with ``zeroed`` counting filters whose norm is below ZERO_FILTER_NORM.
    """
    layers = []
    for i, (name, conv) in enumerate(conv_layers_paper_order(model), start=1):
        norms = per_filter_norms(conv).cpu()
        layers.append(
            {
                "layer": i,
                "name": name,
                "norms": [round(v, 6) for v in norms.tolist()],
                "zeroed": int((norms < ZERO_FILTER_NORM).sum()),
            }
        )
    return {"layers": layers, "zeroed": sum(layer["zeroed"] for layer in layers)}
