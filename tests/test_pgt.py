"""Tests for the exact PGT loss: closed form, F.cross_entropy agreement, the paper's properties,
and the authors' hook (reproduced bit for bit; exact only at loss scale N**2)."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fork_code import ForkLabelSmoothingCrossEntropy, fork_power_grad
from hypothesis import given, settings
from hypothesis import strategies as st

from powergrad.pgt import (
    AuthorsHookCrossEntropy,
    PowerGradCrossEntropy,
    authors_pgt_hook,
    pgt_cross_entropy,
    pgt_probs,
    stationary_threshold,
)

ALPHAS = [0.0, 0.05, 0.25, 0.3, 0.92, 1.0]
REDUCTIONS = ["mean", "sum", "none"]


def _load_bench():
    """Import scripts/bench_pgt.py (a script, not a package module)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_pgt.py"
    spec = importlib.util.spec_from_file_location("bench_pgt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(n=16, c=10, seed=0, soft=False, scale=3.0, dtype=torch.float32):
    """Random logits (N, C) and a hard (N,) or soft (N, C) target."""
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, c, generator=gen)).to(dtype)
    if soft:
        # A mixup-like target: two one-hots mixed with a random weight per row.
        lam = torch.rand(n, 1, generator=gen)
        a = F.one_hot(torch.randint(0, c, (n,), generator=gen), c).float()
        b = F.one_hot(torch.randint(0, c, (n,), generator=gen), c).float()
        target = lam * a + (1.0 - lam) * b
    else:
        target = torch.randint(0, c, (n,), generator=gen)
    return logits, target


def _closed_form(logits, target, alpha, ls, reduction, upstream):
    """(softmax(alpha z) - q) * r * upstream, in float64, computed independently of the library."""
    z = logits.double()
    n, c = z.shape
    p_alpha = torch.softmax(alpha * z, dim=1) if alpha > 0 else torch.full_like(z, 1.0 / c)
    q = F.one_hot(target, c).double() if target.dim() == 1 else target.double()
    q = (1.0 - ls) * q + ls / c
    upstream = upstream.double()
    if reduction == "mean":
        factor = upstream / n
    elif reduction == "sum":
        factor = upstream
    else:
        factor = upstream.unsqueeze(1)
    return (p_alpha - q) * factor


def _pgt_grad(logits, target, alpha, ls=0.0, reduction="mean", upstream=None):
    x = logits.detach().clone().requires_grad_()
    loss = pgt_cross_entropy(x, target, alpha, label_smoothing=ls, reduction=reduction)
    if upstream is None:
        upstream = torch.ones_like(loss)
    loss.backward(upstream)
    return loss, x.grad


def _ce_grad(logits, target, ls=0.0, reduction="mean", upstream=None):
    x = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(x, target, label_smoothing=ls, reduction=reduction)
    if upstream is None:
        upstream = torch.ones_like(loss)
    loss.backward(upstream)
    return loss, x.grad


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_is_closed_form(alpha, soft, ls, reduction):
    logits, target = _batch(soft=soft, seed=3)
    # A non-trivial upstream gradient: per-sample weights for "none", a scalar otherwise.
    upstream = torch.rand(16) + 0.5 if reduction == "none" else torch.tensor(1.7)
    loss, grad = _pgt_grad(logits, target, alpha, ls, reduction, upstream)
    expected = _closed_form(logits, target, alpha, ls, reduction, upstream)
    assert grad.dtype == torch.float32
    assert loss.shape == ((16,) if reduction == "none" else ())
    # fp32 arithmetic on O(1) quantities: a few eps of the largest entry.
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_equals_cross_entropy(soft, ls, reduction):
    logits, target = _batch(n=37, c=11, soft=soft, seed=1)
    ours = pgt_cross_entropy(logits, target, 0.25, label_smoothing=ls, reduction=reduction)
    ref = F.cross_entropy(logits, target, label_smoothing=ls, reduction=reduction)
    # The forward reproduces F.cross_entropy's own arithmetic: bit for bit.
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_alpha_one_is_bitwise_cross_entropy_gradient(soft, reduction):
    logits, target = _batch(n=64, c=100, soft=soft, seed=2)
    upstream = torch.rand(64) + 0.5 if reduction == "none" else torch.tensor(3.0)
    _, ours = _pgt_grad(logits, target, 1.0, 0.0, reduction, upstream)
    _, ref = _ce_grad(logits, target, 0.0, reduction, upstream)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_alpha_one_with_label_smoothing_matches_cross_entropy(soft):
    logits, target = _batch(n=64, c=100, soft=soft, seed=2)
    _, ours = _pgt_grad(logits, target, 1.0, 0.1)
    _, ref = _ce_grad(logits, target, 0.1)
    # Autograd accumulates the smoothing term separately: equal up to fp32 rounding.
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.92, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_outer_loss_scale_is_exact(alpha, reduction):
    """AMP-style loss scaling: grad(S * loss) == S * grad(loss), for S in {1, N^2, 2N^2, 2^16}."""
    n = 8
    logits, target = _batch(n=n, c=10, seed=4)
    x = logits.clone().requires_grad_()
    base = pgt_cross_entropy(x, target, alpha, reduction=reduction).sum()
    base.backward()
    unscaled = x.grad.clone()
    for scale in [1.0, n * n, 2.0 * n * n, 65536.0]:
        x.grad = None
        (pgt_cross_entropy(x, target, alpha, reduction=reduction).sum() * scale).backward()
        # Power-of-two scales (N = 8): every rounding step scales exactly, so bitwise equal.
        assert torch.equal(x.grad, unscaled * scale)


def test_loss_scale_exact_for_non_power_of_two_batch():
    n, alpha = 12, 0.25
    logits, target = _batch(n=n, c=10, seed=5)
    for scale in [1.0, n * n, 2.0 * n * n, 65536.0]:
        x = logits.clone().requires_grad_()
        (pgt_cross_entropy(x, target, alpha) * scale).backward()
        expected = _closed_form(logits, target, alpha, 0.0, "mean", torch.tensor(scale))
        torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6 * scale / n)


def test_batch_shards_average_to_full_batch():
    """Per-rank locality (DDP): mean-loss grads of two half-batch shards, averaged as DDP does,
    equal the full-batch grad."""
    logits, target = _batch(n=16, c=10, seed=6)
    _, full = _pgt_grad(logits, target, 0.3)
    _, top = _pgt_grad(logits[:8], target[:8], 0.3)
    _, bottom = _pgt_grad(logits[8:], target[8:], 0.3)
    # Not bitwise: the vectorized exp2 kernel treats the tail of a buffer in scalar code, so an
    # element's last bit can depend on where it sits. One ulp at most.
    torch.testing.assert_close(full, torch.cat([top, bottom]) / 2, rtol=2.5e-7, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.25, 1.0])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_half_precision_logits(dtype, alpha, soft):
    logits, target = _batch(n=32, c=50, soft=soft, seed=7, dtype=dtype)
    loss, grad = _pgt_grad(logits, target, alpha)
    assert grad.dtype == dtype
    assert loss.dtype == torch.float32
    # The value is F.cross_entropy on the upcast logits (what autocast computes).
    assert torch.equal(loss, F.cross_entropy(logits.float(), target))
    expected = _closed_form(logits, target, alpha, 0.0, "mean", torch.tensor(1.0))
    # Computed in fp32, then rounded once to the logits' dtype: within half an ulp of it.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.double(), expected, rtol=eps, atol=eps / 32)


def test_module_matches_functional():
    logits, target = _batch(seed=8)
    module = PowerGradCrossEntropy(alpha=0.3, label_smoothing=0.1)
    assert "alpha=0.3" in repr(module)
    assert not list(module.parameters())
    x = logits.clone().requires_grad_()
    loss = module(x, target)
    loss.backward()
    ref_loss, ref_grad = _pgt_grad(logits, target, 0.3, 0.1)
    assert torch.equal(loss, ref_loss)
    assert torch.equal(x.grad, ref_grad)


@pytest.mark.parametrize(
    "alpha",
    [-0.1, 1.0 + 1e-9, 2, math.nan, math.inf, -math.inf, "0.5", None, True, 0.5j],
    ids=repr,
)
def test_invalid_alpha_raises_at_build_time(alpha):
    with pytest.raises(ValueError, match="alpha"):
        PowerGradCrossEntropy(alpha)
    logits, target = _batch()
    with pytest.raises(ValueError, match="alpha"):
        pgt_cross_entropy(logits, target, alpha)
    with pytest.raises(ValueError, match="alpha"):
        pgt_probs(logits, alpha)


@pytest.mark.parametrize("alpha", [0, 1, np.float32(0.25), np.float64(0.92)], ids=repr)
def test_valid_alpha_types(alpha):
    assert PowerGradCrossEntropy(alpha).alpha == float(alpha)


@pytest.mark.parametrize("ls", [-0.1, 1.0, 1.5, math.nan, "0.1"], ids=repr)
def test_invalid_label_smoothing_raises(ls):
    with pytest.raises(ValueError, match="label_smoothing"):
        PowerGradCrossEntropy(0.25, label_smoothing=ls)


@pytest.mark.parametrize("reduction", ["avg", None, "MEAN"], ids=repr)
def test_invalid_reduction_raises(reduction):
    logits, target = _batch()
    with pytest.raises(ValueError, match="reduction"):
        pgt_cross_entropy(logits, target, 0.25, reduction=reduction)


@pytest.mark.parametrize(
    ("logits_shape", "target", "message"),
    [
        ((16, 10), torch.zeros(15, dtype=torch.long), "16 rows"),
        ((16, 10), torch.zeros(16, 9), "does not match"),
        ((16, 10), torch.zeros(16), "integer"),
        ((16, 10), torch.zeros(16, 10, dtype=torch.long), "floating"),
        ((16, 10), torch.zeros(16, 10, 1), "class indices"),
        ((10,), torch.zeros(1, dtype=torch.long), r"\(N, C\)"),
        ((4, 10, 3), torch.zeros(4, dtype=torch.long), r"\(N, C\)"),
    ],
)
def test_shape_mismatch_is_a_clear_error(logits_shape, target, message):
    with pytest.raises(ValueError, match=message):
        pgt_cross_entropy(torch.zeros(logits_shape), target, 0.25)


def test_minus_inf_logit():
    """A masked class (logit -inf) gets p' = 0 for alpha > 0 and 1/C at alpha = 0; no NaN."""
    logits, target = _batch(n=4, c=6, seed=9)
    logits[:, 5] = -math.inf
    target[:] = 0
    for alpha in [0.0, 0.25]:
        _, grad = _pgt_grad(logits, target, alpha)
        assert torch.isfinite(grad).all()
        expected_masked = 0.0 if alpha > 0 else 1.0 / 6 / 4
        torch.testing.assert_close(grad[:, 5], torch.full((4,), expected_masked))


def test_second_backward_through_same_graph_is_refused():
    """The backward reuses the saved log-prob buffer, so autograd refuses a second pass loudly
    instead of computing a wrong gradient."""
    logits, target = _batch()
    x = logits.clone().requires_grad_()
    loss = pgt_cross_entropy(x, target, 0.25)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_soft_target_gets_no_gradient():
    logits, target = _batch(soft=True)
    target.requires_grad_()
    x = logits.clone().requires_grad_()
    pgt_cross_entropy(x, target, 0.25).backward()
    assert target.grad is None
    assert x.grad is not None


# --- The paper's properties (PAPER.md), as property-based tests, in float64 ----------------

_logit_rows = st.integers(min_value=2, max_value=12).flatmap(
    lambda c: st.lists(
        st.floats(min_value=-20.0, max_value=20.0, allow_nan=False), min_size=c, max_size=c
    )
)
_alpha_lt1 = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def _p_and_p_alpha(row, alpha):
    z = torch.tensor(row, dtype=torch.float64)
    p = torch.softmax(z, dim=0)
    p_alpha = p.pow(alpha) / p.pow(alpha).sum()
    return z, p, p_alpha


@settings(max_examples=60, deadline=None)
@given(row=_logit_rows, alpha=_alpha_lt1)
def test_lemma1_stationary_threshold(row, alpha):
    z, p, p_alpha = _p_and_p_alpha(row, alpha)
    # The identity the implementation rests on: p**a / sum p**a == softmax(a z) (fp32 there).
    torch.testing.assert_close(pgt_probs(z, alpha).double(), p_alpha, rtol=1e-5, atol=1e-6)
    t = stationary_threshold(p, alpha)
    # Entries within rounding of the threshold can fall either way: skip them.
    clear = (p - t).abs() > 1e-9 * torch.maximum(p, t)
    below, above = clear & (p < t), clear & (p > t)
    # Up to float64 rounding of p' (alpha near 1 moves p by less than an ulp).
    assert (p_alpha[below] >= p[below] * (1 - 1e-12)).all()
    assert (p_alpha[above] <= p[above] * (1 + 1e-12)).all()
    # Strictly smaller above the threshold wherever the move is resolvable.
    if alpha < 0.99:
        assert (p_alpha[above] < p[above]).all()


@settings(max_examples=30, deadline=None)
@given(row=_logit_rows)
def test_proposition1_alpha_zero_is_uniform(row):
    z, p, _ = _p_and_p_alpha(row, 0.0)
    c = len(row)
    torch.testing.assert_close(stationary_threshold(p, 0.0), torch.tensor(1.0 / c).double())
    assert torch.equal(pgt_probs(z, 0.0), torch.full((c,), 1.0 / c))


def test_stationary_threshold_is_stable_near_alpha_one():
    """Found by hypothesis: at alpha = 1 - 1e-16 the naive formula returned 0.135 (< t(0)=1/3)."""
    p = torch.softmax(torch.tensor([0.0, 0.0, 1.0575286052184687], dtype=torch.float64), 0)
    near_one = stationary_threshold(p, 0.9999999999999999).item()
    assert near_one == pytest.approx(stationary_threshold(p, 1.0).item(), rel=1e-12)
    assert stationary_threshold(p, 0.0).item() == pytest.approx(1 / 3, rel=1e-15)
    # Direct formula where it is well conditioned.
    assert stationary_threshold(p, 0.25).item() == pytest.approx(
        (p**0.25).sum().item() ** (1 / (0.25 - 1)), rel=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    row=_logit_rows,
    alphas=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=2, max_size=5),
)
def test_theorem1_threshold_monotone_order_preserved_smoothing(row, alphas):
    alphas = sorted(alphas)
    z = torch.tensor(row, dtype=torch.float64)
    p = torch.softmax(z, dim=0)
    thresholds = [stationary_threshold(p, a).item() for a in alphas]
    for lo, hi in itertools.pairwise(thresholds):
        assert lo <= hi * (1 + 1e-9)
    entropies = []
    for a in alphas:
        p_alpha = torch.softmax(a * z, dim=0)
        # Order preserving: p_i < p_j implies p'_i <= p'_j.
        smaller = p.unsqueeze(1) < p.unsqueeze(0)
        assert (p_alpha.unsqueeze(1) <= p_alpha.unsqueeze(0) * (1 + 1e-12))[smaller].all()
        entropies.append(-torch.xlogy(p_alpha, p_alpha).sum().item())
    # Smoothing: p' approaches uniform (max entropy log C) as alpha falls.
    for lo_alpha_h, hi_alpha_h in itertools.pairwise(entropies):
        assert lo_alpha_h >= hi_alpha_h - 1e-9


# --- The authors' hook: exact only when the loss scale S equals N^2 ---------------------------


def _authors_grad(logits, target, alpha, ls=0.0, scale=1.0):
    x = logits.detach().clone().requires_grad_()
    loss = AuthorsHookCrossEntropy(alpha, label_smoothing=ls)(x, target)
    (loss * scale).backward()
    return loss, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("scale", [64.0, 65536.0, 1.0])
def test_authors_hook_is_the_forks_code_bit_for_bit(dtype, ls, scale):
    """Same loss and same gradient bits as the fork's loss (nn.CrossEntropyLoss, or its own
    LabelSmoothingCrossEntropy under --smoothing) with its hook on the logits, in the logits'
    dtype; the loss in fp32, as the fork's autocast computed it from fp16 logits."""
    n, c, alpha = 8, 10, 0.25
    logits, target = _batch(n=n, c=c, seed=3, dtype=dtype)
    loss, grad = _authors_grad(logits, target, alpha, ls, scale)
    x = logits.detach().clone().requires_grad_()
    args = SimpleNamespace(num_classes=c, smoothing=ls, modify_softmax=alpha)
    x.register_hook(fork_power_grad(target, args))
    if ls:
        fork_loss_fn = ForkLabelSmoothingCrossEntropy(ls, num_classes=c)
    else:
        fork_loss_fn = torch.nn.CrossEntropyLoss()
    ref_loss = fork_loss_fn(x.float(), target)
    (ref_loss * scale).backward()
    assert torch.equal(loss, ref_loss)
    assert grad.dtype == dtype
    assert torch.equal(grad.nan_to_num(7.0), x.grad.nan_to_num(7.0))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_authors_hook_is_exact_only_at_loss_scale_n_squared(ls):
    """PAPER.md's measurement: N=8, alpha=0.25, max |hook/S - (p'-q)/N| is ~2e-6 at S=N^2, NaN at
    2N^2, ~9e-2 at N^2/2, ~4.7 at S=1; the exact loss is right at every S."""
    n, c, alpha = 8, 10, 0.25
    logits, target = _batch(n=n, c=c, seed=0)
    formula = _closed_form(logits, target, alpha, ls, "mean", torch.tensor(1.0))
    hook_err, ours_err = {}, {}
    for scale in [n * n, 2 * n * n, n * n / 2, 1]:
        # Compare the gradient the optimizer sees after the AMP scaler unscales it.
        _, grad = _authors_grad(logits, target, alpha, ls, scale)
        hook_err[scale] = (grad.double() / scale - formula).abs().max().item()
        _, exact = _pgt_grad(logits, target, alpha, ls, upstream=torch.tensor(float(scale)))
        ours_err[scale] = (exact.double() / scale - formula).abs().max().item()
    assert hook_err[n * n] < 1e-5
    assert math.isnan(hook_err[2 * n * n])
    assert 3e-2 < hook_err[n * n / 2] < 0.3
    assert 1.0 < hook_err[1] < 20.0
    assert all(err < 1e-7 for err in ours_err.values()), ours_err


def test_authors_hook_at_n_squared_matches_the_exact_loss():
    """At S = N^2 the hook and PowerGradCrossEntropy agree to fp32 rounding (N=256, C=1000:
    the fork's per-GPU batch and GradScaler's initial scale 2**16)."""
    n, c, alpha = 256, 1000, 0.25
    logits, target = _batch(n=n, c=c, seed=4)
    scale = float(n * n)
    loss, hook = _authors_grad(logits, target, alpha, 0.1, scale)
    exact_loss, exact = _pgt_grad(logits, target, alpha, 0.1, upstream=torch.tensor(scale))
    torch.testing.assert_close(loss, exact_loss)
    # In units of p' - q (the gradient times N / S): fp32 recovery of p = grad/N + q rounds at
    # ~1e-7 absolute, which p**alpha magnifies for tiny p; the exact loss has no such step.
    err = ((hook - exact) * (n / scale)).abs().max().item()
    assert err < 1e-3, err


def test_authors_hook_alpha_zero_is_off_as_in_the_fork():
    """The fork's ``if args.modify_softmax:`` treats 0.0 as off: plain cross-entropy."""
    logits, target = _batch(seed=5)
    _, grad = _authors_grad(logits, target, 0.0, scale=3.0)
    _, ce = _ce_grad(logits, target, upstream=torch.tensor(3.0))
    assert torch.equal(grad, ce)


def test_authors_hook_module_without_grad_and_validation():
    module = AuthorsHookCrossEntropy(0.3, label_smoothing=0.1)
    assert "alpha=0.3" in repr(module) and not list(module.parameters())
    logits, target = _batch(seed=6)
    with torch.no_grad():
        value = module(logits, target)
    torch.testing.assert_close(value, F.cross_entropy(logits, target, label_smoothing=0.1))
    with pytest.raises(ValueError, match="alpha"):
        AuthorsHookCrossEntropy(1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        AuthorsHookCrossEntropy(0.3, label_smoothing=1.0)


def test_authors_pgt_hook_keeps_dtype_and_shape():
    grad = torch.full((4, 5), 0.0, dtype=torch.float16)
    out = authors_pgt_hook(grad, torch.tensor([0, 1, 2, 3]), 0.5)
    assert out.dtype == torch.float16 and out.shape == (4, 5)


# --- CUDA ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_cuda(dtype, alpha):
    logits, target = _batch(n=256, c=1000, seed=10, dtype=dtype)
    logits, target = logits.cuda(), target.cuda()
    loss, grad = _pgt_grad(logits, target, alpha)
    assert grad.dtype == dtype and grad.is_cuda
    expected = _closed_form(logits.cpu(), target.cpu(), alpha, 0.0, "mean", torch.tensor(1.0))
    # fp32: the closed-form tolerance used on CPU; fp16/bf16: one rounding to the dtype.
    tol = max(torch.finfo(dtype).eps, 1e-5)
    torch.testing.assert_close(grad.cpu().double(), expected, rtol=tol, atol=tol / 256)
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target))
    if alpha == 1.0 and dtype == torch.float32:
        assert torch.equal(grad, _ce_grad(logits, target)[1])
    # Under autocast and deterministic algorithms: runs, and repeats bit for bit.
    torch.use_deterministic_algorithms(True)
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            first = _pgt_grad(logits, target, alpha)[1]
            second = _pgt_grad(logits, target, alpha)[1]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)


@pytest.mark.gpu
def test_cuda_authors_hook_under_fp16_grad_scaler():
    """The fork's setting: fp16 autocast, GradScaler at its initial 2**16 = N**2 with N = 256.
    The hook then gives PGT's gradient to fp16 rounding; at 2**17 it gives NaN."""
    n, c, alpha = 256, 1000, 0.25
    logits, target = _batch(n=n, c=c, seed=11)
    logits, target = logits.cuda(), target.cuda()
    expected = _closed_form(logits.cpu(), target.cpu(), alpha, 0.1, "mean", torch.tensor(1.0))
    loss_fn = AuthorsHookCrossEntropy(alpha, label_smoothing=0.1)
    for init_scale, finite in [(2.0**16, True), (2.0**17, False)]:
        x = logits.half().requires_grad_()
        scaler = torch.amp.GradScaler("cuda", init_scale=init_scale)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(x, target)
        scaler.scale(loss).backward()
        assert x.grad.dtype == torch.float16
        assert bool(torch.isfinite(x.grad).all()) is finite
        if finite:
            # In units of p' - q: fp16 recovery of p rounds at ~1e-3 of the largest entry.
            err = (x.grad.double().cpu() / init_scale - expected).abs().max().item() * n
            assert err < 2e-2, err


def test_bench_runs_every_variant_in_blocks_and_interleaved():
    bench = _load_bench().bench
    for block in (5, 1):
        res = bench(n=8, c=10, repeats=8, warmup=1, alpha=0.25, device="cpu", block=block)
        assert set(res["median_ms"]) == {"ce", "pgt", "pgt_a1", "authors_hook"}
        assert res["repeats"] >= 8
        assert res["ratio_vs_ce_paired"]["ce"] == 1.0
        assert all(ms > 0 for ms in res["median_ms"].values())
