"""The exact PowerGrad Transform (PGT) cross-entropy.

Forward: the ordinary cross-entropy (the logged loss value is unchanged).
Backward: the gradient w.r.t. the logits ``z`` is ``softmax(alpha * z) - q`` instead of
``softmax(z) - q`` (times the reduction factor), where ``q`` is the (label-smoothed) target
distribution. ``softmax(alpha * z) == p**alpha / sum(p**alpha)`` is the paper's ``p'``, computed
here without forming ``p**alpha`` (no underflow, one exp pass).

Unlike the paper's reference tensor hook, which recovers ``p`` from the incoming gradient and is
exact only when the AMP loss scale equals N**2, this is the formula itself: exact under any outer
loss scale, batch size, reduction and precision. It is purely local math on each rank's own
logits, so under DDP every rank computes the exact PGT gradient of its own mean loss and DDP's
gradient averaging then behaves exactly as for the ordinary cross-entropy.

Two opt-ins replicate what the authors' code computed instead (docs/fork_evidence.md):
:class:`AuthorsHookCrossEntropy` is their tensor hook itself, which needs their fp16 AMP setting
(loss scale N**2) to be right; :class:`TruncatedPGTCrossEntropy` is the transform that hook
computed there, at any precision: fp16 rounds every class whose ``p`` is below ~3e-8 to 0 and
gives it ``p' = 0`` (the exact transform gives it ``p**alpha``).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "TRANSFORMS",
    "TRANSFORM_LABELS",
    "AuthorsHookCrossEntropy",
    "PowerGradCrossEntropy",
    "TruncatedPGTCrossEntropy",
    "authors_pgt_hook",
    "fork_fp16_logit_grad",
    "pgt_cross_entropy",
    "pgt_probs",
    "register_transform",
    "stationary_threshold",
]

_REDUCTIONS = ("mean", "sum", "none")
_LOG2_E = 1.0 / math.log(2.0)  # exp(x) == exp2(x * log2(e))


def _check_real(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise ValueError if it is not a finite real number."""
    # bool is an int subclass but never a meaningful exponent or smoothing factor.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_alpha(alpha: object) -> float:
    """Validate the PGT exponent: a finite real number in [0, 1]; returns it as a float."""
    alpha = _check_real("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def _check_label_smoothing(label_smoothing: object) -> float:
    label_smoothing = _check_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    return label_smoothing


def _check_reduction(reduction: object) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("logits and target must be torch.Tensor")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating (N, C) tensor, got shape {tuple(logits.shape)} "
            f"dtype {logits.dtype}"
        )
    n, c = logits.shape
    if target.dim() == 1:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise ValueError(f"class-index target must be an integer tensor, got {target.dtype}")
        if target.shape[0] != n:
            raise ValueError(f"target has {target.shape[0]} class indices but logits have {n} rows")
    elif target.dim() == 2:
        if not target.is_floating_point():
            raise ValueError(f"soft target (N, C) must be floating, got {target.dtype}")
        if tuple(target.shape) != (n, c):
            raise ValueError(
                f"soft target shape {tuple(target.shape)} does not match logits shape {(n, c)}"
            )
    else:
        raise ValueError(
            f"target must be class indices (N,) or a distribution (N, C), "
            f"got shape {tuple(target.shape)}"
        )


def _sub_scaled_target(grad: torch.Tensor, target: torch.Tensor, s, ls: float) -> torch.Tensor:
    """In place ``grad -= s * q`` with q the label-smoothed target; returns ``grad``."""
    n, c = grad.shape
    if ls > 0.0:
        grad.sub_(s * (ls / c))
    if target.dim() == 1:
        rows = torch.arange(n, device=grad.device)
        hit = -s.reshape(-1) if ls == 0.0 else -(s.reshape(-1) * (1.0 - ls))
        # Only the target entry of each row changes: no dense one-hot. Indices are unique, and
        # index_put_ with accumulate=True is deterministic on CPU and CUDA.
        return grad.index_put_((rows, target), hit, accumulate=True)
    return grad.addcmul_(target, s, value=-(1.0 - ls))


class _PGTCrossEntropy(torch.autograd.Function):
    """Ordinary cross-entropy forward, PGT backward; both in fp32.

    Saves only the fp32 log-probabilities (what F.cross_entropy's log_softmax saves too): since
    ``alpha * log_softmax(z) = alpha * z - const`` per row, ``softmax(alpha * logp)`` equals
    ``softmax(alpha * z)``, so the logits themselves are not needed in backward.
    """

    @staticmethod
    def forward(ctx, logits, target, alpha, label_smoothing, reduction):
        # dtype= casts inside the kernel: fp16/bf16 logits need no separate fp32 copy.
        logp = torch.log_softmax(logits, dim=1, dtype=torch.float32)
        n, c = logp.shape
        ls = label_smoothing
        # Each branch reproduces F.cross_entropy's own arithmetic so the value matches it.
        if target.dim() == 1:
            loss = F.nll_loss(logp, target, reduction=reduction)
            if ls > 0.0:
                smooth = -logp.sum(dim=1)
                if reduction == "mean":
                    smooth = smooth.mean()
                elif reduction == "sum":
                    smooth = smooth.sum()
                loss = (1.0 - ls) * loss + smooth * (ls / c)
        else:
            q = target * (1.0 - ls) + ls / c if ls > 0.0 else target
            weighted = logp * q
            if reduction == "none":
                loss = -weighted.sum(dim=1)
            elif reduction == "sum":
                loss = -weighted.sum()
            else:
                loss = -weighted.sum() / n
        ctx.save_for_backward(logp, target)
        ctx.alpha = alpha
        ctx.label_smoothing = ls
        ctx.reduction = reduction
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logp, target = ctx.saved_tensors
        n, c = logp.shape
        alpha, ls = ctx.alpha, ctx.label_smoothing
        # s: d(reduced loss)/d(per-sample loss) times the incoming (possibly loss-scaled) grad.
        g = grad_output.float()
        if ctx.reduction == "mean":
            s = g / n
        elif ctx.reduction == "sum":
            s = g
        else:
            s = g.unsqueeze(1)
        if alpha == 1.0:
            # The ordinary gradient through the very kernels F.cross_entropy's backward uses
            # (dL/dlogp = -s q, then log_softmax's backward): bitwise equal to it.
            grad_logp = _sub_scaled_target(torch.zeros_like(logp), target, s, ls)
            grad = torch._log_softmax_backward_data(grad_logp, logp, 1, torch.float32)
            return grad.to(ctx.logits_dtype), None, None, None, None
        # The gradient is built in place in the saved log-prob buffer: no N x C allocation in
        # backward (on CPU a fresh buffer can cost a page fault per 4 KiB page, which for
        # ImageNet-sized logits takes longer than the arithmetic; scripts/bench_pgt.py counts them).
        if alpha == 0.0:
            # The uniform limit, also where a logit is -inf (0 * -inf would give NaN).
            grad = logp.fill_(1.0 / c).mul_(s)
        else:
            # p' = exp(alpha * logp) / Z with Z = sum_j exp(alpha * logp_j) = sum_j p_j**alpha.
            # alpha * logp <= 0 and its row max is >= -alpha*log(C): no overflow, Z >= 1/C, so no
            # max subtraction is needed. exp2 of a pre-scaled argument, because on CPU torch's
            # exp2 kernel is faster than its exp (scripts/bench_pgt.py times the whole loss).
            grad = logp.mul_(alpha * _LOG2_E).exp2_()
            grad.mul_(s / grad.sum(dim=1, keepdim=True))
        grad = _sub_scaled_target(grad, target, s, ls)
        return grad.to(ctx.logits_dtype), None, None, None, None


def pgt_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy whose gradient w.r.t. ``logits`` is the PowerGrad Transform's.

    Args:
        logits: (N, C) floating tensor, any of fp32/fp16/bf16.
        target: class indices (N,) of an integer dtype, or a target distribution (N, C) such as
            mixup/cutmix soft targets. Rows are assumed to sum to 1; if one does not, alpha = 1
            gives F.cross_entropy's ``sum(q) p - q`` and alpha < 1 the paper's ``p' - q``. No
            gradient flows to a soft target. No ignore_index or class weights.
        alpha: PGT exponent in [0, 1]; 1 is the ordinary cross-entropy gradient, 0 the uniform.
        label_smoothing: in [0, 1); ``q = (1 - ls) * target + ls / C`` as in F.cross_entropy,
            for soft targets too.
        reduction: "mean" (over N), "sum" or "none" (per-sample losses, shape (N,)).

    Returns:
        The ordinary cross-entropy, equal to F.cross_entropy(logits.float(), ...) with the same
        smoothing and reduction, in fp32 (as under autocast). Its backward gives
        ``(softmax(alpha * logits) - q) * r * grad_output`` with r = 1/N for "mean", 1 otherwise
        (per sample for "none"), computed in fp32 and returned in the logits' dtype. Exact under
        any outer loss scale and batch size; local per rank under DDP. alpha = 1 reproduces
        F.cross_entropy's gradient bit for bit (same kernels).

    Memory and cost: one fp32 (N, C) buffer of log-probabilities is saved, as F.cross_entropy
    (under autocast) saves; for alpha < 1 the backward builds the gradient in that buffer, one
    exp pass, so autograd refuses a second backward through the same graph
    (``retain_graph=True``) with an in-place-modification RuntimeError. Not twice
    differentiable.

    Raises:
        ValueError: alpha not a finite real in [0, 1], label_smoothing not in [0, 1), an unknown
            reduction, or logits/target shapes or dtypes that do not fit together.
    """
    alpha = check_alpha(alpha)
    label_smoothing = _check_label_smoothing(label_smoothing)
    reduction = _check_reduction(reduction)
    _check_shapes(logits, target)
    if target.dim() == 1:
        target = target.long()
    return _PGTCrossEntropy.apply(logits, target, alpha, label_smoothing, reduction)


class PowerGradCrossEntropy(nn.Module):
    """Loss module for :func:`pgt_cross_entropy`.

    alpha, label_smoothing and reduction are validated once, at construction; ``forward`` then
    trusts its inputs (logits (N, C) floating, target (N,) integer or (N, C) floating) and skips
    the functional form's per-call checks.
    """

    def __init__(self, alpha: float, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Ordinary cross-entropy value; PGT gradient w.r.t. ``logits``."""
        if target.dim() == 1:
            target = target.long()
        return _PGTCrossEntropy.apply(
            logits, target, self.alpha, self.label_smoothing, self.reduction
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, label_smoothing={self.label_smoothing}, "
            f"reduction={self.reduction!r}"
        )


def authors_pgt_hook(
    grad: torch.Tensor, target: torch.Tensor, alpha: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The authors' PGT tensor hook on the logits, operation for operation.

    Copied from their timm fork (``power_grad`` in ``ResNet.forward``, timm/models/resnet.py;
    docs/fork_evidence.md cites the lines). It assumes the incoming gradient is
    ``(p - q) * N`` (N = rows of ``grad``), recovers ``p = grad / N + q``, and returns
    ``(p**alpha / sum(p**alpha) - q) * N``. A mean-reduced loss scaled by S (the AMP loss scale)
    actually delivers ``S * (p - q) / N``, so the recovery is exact only when ``S == N**2`` (the
    fork's setting: 256 images per GPU and GradScaler's initial scale 2**16). At other S the
    result is wrong, and NaN where a recovered entry is negative (a negative base to a
    fractional power), e.g. at S = 2 N**2, which makes GradScaler skip the step and halve S.

    Every operation runs in ``grad``'s dtype (fp16 under the fork's native AMP), in the fork's
    order, so the rounding is theirs too.

    Args:
        grad: (N, C) gradient arriving at the logits.
        target: (N,) integer class indices (the fork had no soft targets).
        alpha: the fork's ``--modify-softmax`` exponent.
        label_smoothing: the fork's ``--smoothing``; ``q = (1 - ls) * one_hot + ls / C``.

    Returns:
        The replacement gradient, shape and dtype of ``grad``.
    """
    n, c = grad.shape
    q = torch.ones(1, dtype=grad.dtype, device=grad.device) * F.one_hot(target, num_classes=c)
    q = (1.0 - label_smoothing) * q + label_smoothing / c
    g = grad / n
    p = g + q
    p = p**alpha
    p /= p.sum(-1, keepdim=True)
    g = p - q
    return g * n


def _fork_label_smoothing_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """The fork's own ``LabelSmoothingCrossEntropy`` (its loss under ``--smoothing``), as written.

    The fork rewrote timm's class (fork timm/loss/cross_entropy.py:6-27): ``q = (1 - d) *
    one_hot + d / C`` and ``loss = sum(-q * log_softmax(x))``, mean over the batch. That is
    F.cross_entropy(..., label_smoothing=d) and upstream timm 0.4.12's (1 - d) * nll + d *
    mean(-logp) in exact arithmetic; kept as the fork wrote it because the hook reads the
    rounding of this loss's backward. The fork fixes C = 1000 (:19, ImageNet only); here C is
    the logits' class count.
    """
    logp = F.log_softmax(logits, dim=-1)
    q = F.one_hot(target, num_classes=logits.shape[-1])
    d = torch.full((1,), smoothing, device=logits.device)  # the fork's fp32 tensor (:18)
    q_new = (1.0 - d) * q + d / logits.shape[-1]
    return (-q_new * logp).sum(dim=-1).mean()


class AuthorsHookCrossEntropy(nn.Module):
    """The authors' PGT as they ran it: ordinary cross-entropy plus their hook on the logits.

    An opt-in for replicating the released numerics; :class:`PowerGradCrossEntropy` is the
    formula itself. ``forward`` registers :func:`authors_pgt_hook` on the logits it is given
    (when ``alpha`` is nonzero and they require grad) and returns the fork's training loss in
    fp32 (``nn.CrossEntropyLoss()``, or the fork's ``LabelSmoothingCrossEntropy`` when
    ``label_smoothing > 0``; mean over the batch), computed from ``logits.float()`` as the
    fork's autocast computed it.

    As in the fork, the logits must be the model's own output: under fp16 autocast they are
    fp16, and the hook then sees fp16(S * (p - q) / N), the fp32 loss gradient rounded to fp16,
    and computes in fp16 (fork timm/models/resnet.py:831-844, registered on ``self.fc``'s
    output in ``ResNet.forward``; the loss is taken under the same autocast, fork
    train.py:483-485). ``on_model_output`` tells the trainer to pass the model's output as is
    instead of its fp32 copy (powergrad.engine.train_one_epoch).

    The gradient is PGT's only when the loss scale S equals N**2, N being the rows of these
    logits (the per-rank batch under DDP): trainer.precision=fp16 with the GradScaler started
    at N**2 (train.py does so for this transform; N = 256 gives torch's default 2**16, the
    fork's NativeScaler). In fp32 or bf16 (S = 1) it is far from PGT and config validation
    refuses it; at S = 2 N**2 it returns NaN, which the scaler skips.

    As in the fork, ``alpha == 0`` registers no hook (their ``if args.modify_softmax:`` treats
    0.0 as "off"), so it is the ordinary cross-entropy, not PGT's uniform limit. Class-index
    targets only; no ``reduction`` choice (the fork's losses are mean-reduced). The hook is a
    tensor hook: call the loss outside any torch.compile region.

    Args:
        alpha: PGT exponent in [0, 1] (the fork's ``--modify-softmax``).
        label_smoothing: in [0, 1) (the fork's ``--smoothing``); smooths both the loss and the
            hook's ``q``, as the fork did.
    """

    on_model_output = True

    def __init__(self, alpha: float, label_smoothing: float = 0.0):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.label_smoothing = _check_label_smoothing(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (fp32) of (N, C) logits against (N,) class indices; hooks the
        logits themselves, in their own dtype."""
        if self.alpha and logits.requires_grad:
            logits.register_hook(
                functools.partial(
                    authors_pgt_hook,
                    target=target,
                    alpha=self.alpha,
                    label_smoothing=self.label_smoothing,
                )
            )
        z = logits.float()
        if self.label_smoothing:
            return _fork_label_smoothing_cross_entropy(z, target, self.label_smoothing)
        return F.cross_entropy(z, target)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, label_smoothing={self.label_smoothing}"


def _fork_incoming_grad(logp: torch.Tensor, target: torch.Tensor, ls: float) -> torch.Tensor:
    """fp16 gradient the fork's hook receives at loss scale N**2, from fp32 log-probabilities.

    The fork's loss backward (dL/dlogp = -s q with s = S / N = N: nn.CrossEntropyLoss's, or
    with smoothing its own LabelSmoothingCrossEntropy's q = (1 - d) one_hot + d / C in fp32),
    then log_softmax's backward, then the rounding to fp16 that autocast's fp32 loss puts
    between the loss and the fp16 logits.
    """
    n, c = logp.shape
    if ls > 0.0:
        d = torch.full((1,), ls, device=logp.device)
        grad_logp = ((1.0 - d) * F.one_hot(target, c) + d / c).mul_(-n)
    else:
        grad_logp = torch.zeros_like(logp)
        grad_logp[torch.arange(n, device=logp.device), target] = -float(n)
    grad = torch._log_softmax_backward_data(grad_logp, logp, 1, torch.float32)
    return grad.to(torch.float16)


def fork_fp16_logit_grad(
    logits: torch.Tensor, target: torch.Tensor, alpha: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """What the authors' hook returns in their fp16 AMP training, computed from any logits.

    Emulates the fork at its steady loss scale S = N**2 (N = rows of ``logits``): the fp32
    cross-entropy gradient ``S (p - q) / N`` rounded to fp16 goes through
    :func:`authors_pgt_hook` in fp16. The result, ``(p'_fp16 - q) * N`` in fp16, is the fork's
    logits gradient at S = N**2 bit for bit when ``logits`` hold the same values as the fork's
    fp16 logits (tests/test_fork_numerics.py); ``out / N + q`` is the p' the fork trained with.

    Args:
        logits: (N, C) floating; used in fp32, as the fork's autocast loss used its logits.
        target: (N,) integer class indices.
        alpha: PGT exponent in [0, 1].
        label_smoothing: in [0, 1); q = (1 - ls) one_hot + ls / C, as in the fork.

    Returns:
        (N, C) fp16 tensor.
    """
    alpha = check_alpha(alpha)
    label_smoothing = _check_label_smoothing(label_smoothing)
    _check_shapes(logits, target)
    target = target.long()
    logp = torch.log_softmax(logits, dim=1, dtype=torch.float32)
    incoming = _fork_incoming_grad(logp, target, label_smoothing)
    return authors_pgt_hook(incoming, target, alpha, label_smoothing)


class _TruncatedPGTCrossEntropy(torch.autograd.Function):
    """Ordinary cross-entropy forward (fp32); backward: the fork's fp16 PGT at S = N**2."""

    @staticmethod
    def forward(ctx, logits, target, alpha, label_smoothing):
        logp = torch.log_softmax(logits, dim=1, dtype=torch.float32)
        loss = F.nll_loss(logp, target)
        if label_smoothing > 0.0:
            loss = (1.0 - label_smoothing) * loss + (-logp.sum(dim=1)).mean() * (
                label_smoothing / logp.shape[1]
            )
        ctx.save_for_backward(logp, target)
        ctx.alpha, ctx.label_smoothing, ctx.logits_dtype = alpha, label_smoothing, logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        logp, target = ctx.saved_tensors
        n = logp.shape[0]
        incoming = _fork_incoming_grad(logp, target, ctx.label_smoothing)
        hooked = authors_pgt_hook(incoming, target, ctx.alpha, ctx.label_smoothing)
        # hooked = (p' - q) * N; the mean loss's gradient is (p' - q) / N times grad_output.
        grad = hooked.float().mul_(grad_output.float() / (n * n))
        return grad.to(ctx.logits_dtype), None, None, None


class TruncatedPGTCrossEntropy(nn.Module):
    """PGT as the authors' fp16 training computed it, usable at any precision (replication only).

    Forward: the ordinary cross-entropy in fp32, as :class:`PowerGradCrossEntropy`. Backward:
    :func:`fork_fp16_logit_grad` divided by N**2 and times the incoming gradient, i.e. the
    fork's logits gradient at its steady loss scale N**2 (N = rows of the logits), whatever
    this run's own precision and loss scale. Every class whose p rounds to 0 in the hook's
    fp16 (p below ~3e-8 for N = 256) gets p' = 0, and every p is rounded to fp16 before the
    power; at the paper's logit norms that changes p' a lot at small alpha
    (results/numerics/README.md). Exact PGT (``method.impl=exact``) is the default for new
    work; this one is ``method.impl=pgt_fp16_truncated``, to replicate the published rows.

    Class-index targets only (the fork had no soft targets); mean reduction. ``alpha = 0``
    gives the uniform p' (unlike the fork's flag, where 0 meant off). Like the fork's hook, it
    gives NaN where fp16 rounding makes a recovered p negative: with label smoothing at some N
    that are not powers of two (12, 24, 48, ...; docs/fork_evidence.md), never at N = 256.

    Args:
        alpha: PGT exponent in [0, 1].
        label_smoothing: in [0, 1); smooths the loss and the hook's q, as the fork did.
    """

    def __init__(self, alpha: float, label_smoothing: float = 0.0):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.label_smoothing = _check_label_smoothing(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of (N, C) logits against (N,) class indices; truncated PGT grad."""
        return _TruncatedPGTCrossEntropy.apply(
            logits, target.long(), self.alpha, self.label_smoothing
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, label_smoothing={self.label_smoothing}"


# Backward transforms by name (``method.impl``): each builds the training loss from the method's
# parameter (``method.alpha``) and label smoothing. Adding a transform is registering one here
# (or from any module imported before the config is validated) plus a method yaml naming it.
TRANSFORMS: dict[str, Callable[[float, float], nn.Module]] = {}
# The method name each transform gives a run (the paper's Method column says "PGT").
TRANSFORM_LABELS: dict[str, str] = {}


def register_transform(name: str, label: str | None = None):
    """Decorator: ``@register_transform("name")`` on an ``(alpha, label_smoothing) -> loss``
    factory makes ``method.impl=name`` train with it; runs are labelled ``label`` (default:
    ``name``)."""

    def add(factory: Callable[[float, float], nn.Module]):
        TRANSFORMS[name] = factory
        TRANSFORM_LABELS[name] = label or name
        return factory

    return add


register_transform("exact", label="pgt")(PowerGradCrossEntropy)
register_transform("authors_hook", label="pgt")(AuthorsHookCrossEntropy)
register_transform("pgt_fp16_truncated", label="pgt")(TruncatedPGTCrossEntropy)


def pgt_probs(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's ``p' = p**alpha / sum(p**alpha) = softmax(alpha * logits)`` over the last dim, fp32."""
    alpha = check_alpha(alpha)
    z = logits.float()
    if alpha == 0.0:
        return torch.full_like(z, 1.0 / z.shape[-1])
    return torch.softmax(z * alpha, dim=-1)


def stationary_threshold(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Lemma 1's threshold ``t = (sum_j p_j**alpha)**(1 / (alpha - 1))`` over the last dim.

    ``p'_i >= p_i`` exactly when ``p_i <= t``. ``p`` is normalised to sum 1 first. At alpha = 1
    the limit ``exp(sum_j p_j log p_j)`` (= exp(-entropy)) is returned. Near alpha = 1 the
    exponent 1 / (alpha - 1) magnifies rounding in ``sum p**alpha`` (which tends to 1), so the
    sum is taken as ``1 + sum_j (p_j**alpha - p_j)`` with each term ``p_j expm1((alpha-1) log
    p_j)`` (all >= 0, no cancellation). Computed in ``p``'s dtype.
    """
    alpha = check_alpha(alpha)
    w = p / p.sum(dim=-1, keepdim=True)
    if alpha == 0.0:
        # Proposition 1: t = 1/C (0**0 == 1 counts every class, as the paper's p > 0 does).
        return w.pow(0.0).sum(dim=-1).reciprocal()
    if alpha == 1.0:
        return torch.exp(torch.xlogy(w, w).sum(dim=-1))
    d = alpha - 1.0
    x = d * torch.log(w)  # >= 0; +inf where w == 0
    # w**alpha - w: the expm1 form where x is small (cancellation), the direct one elsewhere.
    excess = torch.where(x < 1.0, w * torch.expm1(x), w.pow(alpha) - w)
    return torch.exp(torch.log1p(excess.sum(dim=-1)) / d)
