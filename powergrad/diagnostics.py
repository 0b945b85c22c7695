"""Training diagnostics: the paper's logit statistics (Section 5.3), the norms of the pooled
features (Fig. 4c/f) and per-filter weight norms (Figs. 4-6).

:class:`LogitStats` and :class:`FeatureStats` accumulate on the device; nothing leaves it until
their ``compute``, called once per epoch. :func:`filter_norm_record` is the per-filter L2 norm
snapshot behind the paper's Figs. 4-6 (filters that "zero out").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from powergrad.distributed import all_reduce_max, all_reduce_sum
from powergrad.models import conv_layers_paper_order, per_filter_norms

__all__ = [
    "ZERO_FILTER_NORM",
    "FeatureStats",
    "LogitStats",
    "filter_norm_record",
    "pooled_features",
]

# A filter whose weight L2 norm is below this counts as "zeroed out" (paper Section 5.2).
ZERO_FILTER_NORM = 1e-6


class LogitStats:
    """Running logit statistics over every sample seen: no host sync until :meth:`compute`.

    Reported, over all N x C logit entries of the epoch (this project's definitions):
    ``logit_norm`` (mean over samples of the L2 norm of the logit vector), ``logit_mean``,
    ``logit_max`` and ``logit_var`` (mean, max and population variance of all entries).

    And per image, as the authors' fork defines them (fork timm/utils/logit_stats.py:4-15,
    printed with --logit-stats): ``logit_mean_per_image`` (mean over images of |mean over
    classes|), ``logit_max_per_image`` (mean over images of |max over classes|) and
    ``logit_var_per_image`` (mean over images of the unbiased variance over classes). The fork's
    ``logit_norm`` is the same as ours. The fork computes them on training batches only at its
    log points (fork train.py:516-521) and, on the val set, as an equal-weight mean of per-batch
    means (train.py:621, 638); here every image of the epoch counts once. Sums are float64 so
    the variance does not cancel.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # [sum of per-sample norms, samples, sum of entries, sum of squared entries, entries]
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.max = torch.full((), -torch.inf, dtype=torch.float64, device=device)
        # [sum over images of |row mean|, of |row max|, of unbiased row variance]
        self.per_image = torch.zeros(3, dtype=torch.float64, device=device)

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
        self.per_image += torch.stack(
            [
                z.mean(dim=1).abs().sum(),
                z.amax(dim=1).abs().sum(),
                z.var(dim=1).sum(),  # unbiased, as torch's default in the fork
            ]
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums (CPU tensors), for a mid-epoch checkpoint."""
        return {"sums": self.sums.cpu(), "max": self.max.cpu(), "per_image": self.per_image.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore running sums saved by :meth:`state_dict` (a checkpoint from before the
        per-image sums existed leaves them at zero: they then cover the rest of the epoch)."""
        self.sums.copy_(state["sums"])
        self.max.copy_(state["max"])
        if "per_image" in state:
            self.per_image.copy_(state["per_image"])

    def compute(self) -> dict[str, float]:
        """Statistics over all ranks (one all-reduce, one host sync)."""
        sums = all_reduce_sum(torch.cat([self.sums, self.per_image]))
        peak = all_reduce_max(self.max.clone())
        norm_sum, samples, total, squares, entries, mean_abs, max_abs, var = sums.tolist()
        keys = ("norm", "mean", "max", "var", "mean_per_image", "max_per_image", "var_per_image")
        if samples == 0:
            return {f"logit_{k}": float("nan") for k in keys}
        mean = total / entries
        return {
            "logit_norm": norm_sum / samples,
            "logit_mean": mean,
            "logit_max": float(peak),
            "logit_var": max(squares / entries - mean * mean, 0.0),
            "logit_mean_per_image": mean_abs / samples,
            "logit_max_per_image": max_abs / samples,
            "logit_var_per_image": var / samples,
        }


class FeatureStats:
    """The pooled features (the input of the classifier, after global average pooling): the
    paper's Fig. 4c/f plot their norms, and channels that are 0 for every image ("zeroed out
    features", Section 5.2).

    Reported: ``feature_norm`` (mean over images of the L2 norm of the pooled feature vector)
    and ``feature_zeroed`` (channels whose pooled value was exactly 0 for every image seen).
    The channel count is learnt from the first batch (a rank that saw none learns it from the
    others in :meth:`channel_max_all_ranks`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of norms, images]
        self.channel_max: torch.Tensor | None = None  # per channel, max |value| over images

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        """Add a batch of pooled features (N x channels)."""
        f = features.detach().flatten(1).double()
        self.sums += torch.stack(
            [
                torch.linalg.vector_norm(f, dim=1).sum(),
                torch.full((), f.shape[0], dtype=f.dtype, device=f.device),
            ]
        )
        peak = f.abs().amax(dim=0)
        self.channel_max = peak if self.channel_max is None else self.channel_max.maximum(peak)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums (CPU tensors), for a mid-epoch checkpoint."""
        state = {"sums": self.sums.cpu()}
        if self.channel_max is not None:
            state["channel_max"] = self.channel_max.cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore running sums saved by :meth:`state_dict`."""
        self.sums.copy_(state["sums"])
        if "channel_max" in state:
            self.channel_max = state["channel_max"].to(self.sums.device)

    def channel_max_all_ranks(self) -> torch.Tensor | None:
        """Per-channel max |value| over all ranks' images; None if no rank saw a batch (a
        collective: every rank must call it)."""
        device = self.sums.device
        width = 0 if self.channel_max is None else self.channel_max.numel()
        width = int(all_reduce_max(torch.tensor(width, device=device)))
        if width == 0:
            return None
        mine = self.channel_max if self.channel_max is not None else torch.zeros(width)
        return all_reduce_max(mine.to(device=device, dtype=torch.float64).clone())

    def compute(self) -> dict[str, float]:
        """Statistics over all ranks (collectives: every rank must call it)."""
        norm_sum, images = all_reduce_sum(self.sums.clone()).tolist()
        peak = self.channel_max_all_ranks()
        if peak is None or not images:
            return {"feature_norm": float("nan"), "feature_zeroed": float("nan")}
        return {"feature_norm": norm_sum / images, "feature_zeroed": int((peak == 0).sum())}


@contextlib.contextmanager
def pooled_features(model: nn.Module, stats: FeatureStats) -> Iterator[None]:
    """While inside, every forward of ``model`` adds its pooled features to ``stats``.

    A forward hook on the timm model's ``global_pool`` (its output feeds the classifier; Fig.
    4c's "output side of the global average pooling layer"). Nothing is hooked for a model
    without one or under torch.compile (a hook added to a compiled model is not seen by its
    graph): ``stats`` then stays empty and reports NaN.
    """
    bare, compiled = model, False
    while True:
        if isinstance(bare, nn.parallel.DistributedDataParallel | nn.DataParallel):
            bare = bare.module
        elif isinstance(getattr(bare, "_orig_mod", None), nn.Module):
            bare, compiled = bare._orig_mod, True
        else:
            break
    pool = getattr(bare, "global_pool", None)
    if compiled or not isinstance(pool, nn.Module):
        yield
        return
    handle = pool.register_forward_hook(lambda module, inputs, out: stats.update(out))
    try:
        yield
    finally:
        handle.remove()


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
