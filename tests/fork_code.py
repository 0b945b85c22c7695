"""The authors' code as their timm fork wrote it, for tests to compare against (test-only).

GitHub bishshoy/power-grad-transform (stored as skalien/power-grad-transform), commit 9caa97e;
docs/fork_evidence.md cites every line. Kept as written, only formatted (ruff), so the tests
compare this project's code with theirs, not with a second copy of ours.
"""

import torch
import torch.nn.functional as F
from torch import nn


def fork_power_grad(labels, args):
    """``power_grad`` of ``ResNet.forward`` (fork timm/models/resnet.py:831-844), closing over
    labels and args (``num_classes``, ``smoothing``, ``modify_softmax``) as the fork's does."""

    def power_grad(grad):
        nonlocal labels, args
        q = torch.ones(1, dtype=grad.dtype, device=grad.device) * F.one_hot(
            labels, num_classes=args.num_classes
        )
        q = (1.0 - args.smoothing) * q + args.smoothing / args.num_classes
        g = grad / grad.shape[0]
        p = g + q

        p = p ** (args.modify_softmax)
        p /= p.sum(-1, keepdim=True)

        g = p - q
        g = g * grad.shape[0]
        return g

    return power_grad


class ForkLabelSmoothingCrossEntropy(nn.Module):
    """The fork's own rewrite of timm's LabelSmoothingCrossEntropy (fork
    timm/loss/cross_entropy.py:6-27), with the device and class count as arguments instead of
    its ``device='cuda'`` and ``self.C = 1000`` (and without its print)."""

    def __init__(self, smoothing=0.1, num_classes=1000, device="cpu"):
        super().__init__()
        assert smoothing < 1.0
        self.d = smoothing * torch.ones(1, device=device)
        self.C = num_classes

    def forward(self, x, target):
        logp = F.log_softmax(x, dim=-1)
        q = F.one_hot(target, num_classes=self.C)
        q_new = (1.0 - self.d) * q + self.d / self.C
        loss = (-q_new * logp).sum(dim=-1)
        return loss.mean()


def logit_statistics(output):
    """The fork's logit statistics (fork timm/utils/logit_stats.py:4-15), per image, averaged."""
    logit_norm = output.norm(dim=-1).mean()
    logit_mean = output.mean(dim=-1).abs().mean()
    logit_max = output.max(dim=-1)[0].abs().mean()
    logit_var = output.var(dim=-1).mean()

    return [logit_norm, logit_mean, logit_max, logit_var]
