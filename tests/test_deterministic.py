"""trainer.deterministic=true: no op of a training step lacks a deterministic CUDA kernel, the
cuBLAS workspace variable is set before the first matmul, and a deterministic run trains.

Without a GPU the op check runs on the CPU: torch.profiler records every aten op of one
training step (forward, loss, backward) and none may be one that torch.use_deterministic_
algorithms makes raise on CUDA (its documented list, below). Composite ops decompose the same
way on every device, so the recorded names are the ones CUDA dispatches, except the backend
kernels of convolution and BatchNorm (cuDNN's on CUDA), which the flag makes deterministic.
"""

import os

import pytest
import torch
from conftest import run_train, tiny, train_in_process
from torch.profiler import profile

from powergrad import checkpoint
from powergrad.models import build_model
from powergrad.pgt import AuthorsHookCrossEntropy, PowerGradCrossEntropy

# aten ops that raise under torch.use_deterministic_algorithms(True) on CUDA, from its
# docstring ("The following normally-nondeterministic operations will throw a RuntimeError").
RAISE_ON_CUDA = (
    "aten::avg_pool3d_backward",
    "aten::_adaptive_avg_pool2d_backward",
    "aten::_adaptive_avg_pool3d_backward",
    "aten::adaptive_max_pool2d_backward",
    "aten::fractional_max_pool2d_backward",
    "aten::fractional_max_pool3d_backward",
    "aten::max_unpool",
    "aten::upsample_linear1d_backward",
    "aten::upsample_bilinear2d_backward",
    "aten::upsample_bicubic2d_backward",
    "aten::upsample_trilinear3d_backward",
    "aten::reflection_pad",
    "aten::nll_loss2d",
    "aten::_ctc_loss_backward",
    "aten::_embedding_bag",
    "aten::put_",
    "aten::histc",
    "aten::bincount",
    "aten::median",
    "aten::grid_sampler_2d_backward",
    "aten::scatter_reduce",
)


def step_ops(model: torch.nn.Module, loss_fn: torch.nn.Module) -> set[str]:
    """Names of the aten ops of one training step of ``model`` (batch 2, 32x32 images)."""
    images, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    with profile() as prof:
        loss_fn(model(images), target).backward()
    return {e.name for e in prof.events()}


def forbidden(ops: set[str]) -> list[str]:
    return sorted(op for op in ops if op.startswith(RAISE_ON_CUDA))


# BasicBlock and squeeze-excitation; ResNet-50/101's bottleneck blocks add no other op kind.
@pytest.mark.parametrize("name", ["resnet18", "seresnet18"])
def test_a_training_step_has_no_op_that_raises_in_deterministic_mode(name):
    model = build_model(name, 4)
    ops = step_ops(model, torch.nn.CrossEntropyLoss())
    assert "aten::convolution_backward" in ops  # the profiler saw the backward pass
    assert forbidden(ops) == [], name
    # timm's global average pool (nn.AdaptiveAvgPool2d(1)) runs as a mean over H, W: ATen's
    # adaptive_avg_pool2d is composite-only and takes that path for a 1x1 output on every
    # device, so its CUDA backward is mean's (deterministic), not _adaptive_avg_pool2d's.
    assert isinstance(model.global_pool.pool, torch.nn.AdaptiveAvgPool2d)
    assert "aten::mean" in ops


def test_every_loss_has_only_ops_with_a_deterministic_cuda_kernel():
    head = torch.nn.Linear(8, 4)  # the losses' backward reaches a parameter
    features = torch.randn(6, 8)
    losses = (
        torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        PowerGradCrossEntropy(0.25, label_smoothing=0.1),
        AuthorsHookCrossEntropy(0.25),
    )
    for loss_fn in losses:
        target = torch.tensor([0, 1, 2, 3, 0, 1])
        with profile() as prof:
            loss_fn(head(features), target).backward()
        ops = {e.name for e in prof.events()}
        assert "aten::nll_loss_forward" in ops or "aten::log_softmax" in ops
        assert forbidden(ops) == [], type(loss_fn).__name__


def test_the_check_sees_a_pool_without_a_deterministic_cuda_backward():
    # The same check catches an op that would raise: a 2x2 adaptive pool has no mean shortcut.
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()
    )
    assert forbidden(step_ops(model, torch.nn.CrossEntropyLoss())) == [
        "aten::_adaptive_avg_pool2d_backward"
    ]


@pytest.fixture
def fresh_runtime():
    """No CUBLAS_WORKSPACE_CONFIG during the test; afterwards deterministic mode off and the
    variable as it was (configure_runtime changes process-wide state)."""
    saved = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    yield
    checkpoint.configure_runtime(None, deterministic=False)
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if saved is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved


def test_deterministic_runtime_sets_the_cublas_workspace_unless_set(fresh_runtime):
    checkpoint.configure_runtime(None, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"  # the user's choice stays
    checkpoint.configure_runtime(None, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_deterministic_run_with_batchnorm_trains(tmp_path, fresh_runtime):
    summary = train_in_process(
        tmp_path / "run", *tiny("model=resnet18", "trainer.deterministic=true")
    )
    assert summary["epochs"] == 2 and summary["val_images"] == 16
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.gpu
def test_two_deterministic_cuda_runs_end_with_the_same_weights(tmp_path):
    # Separate processes, as users start them, without CUBLAS_WORKSPACE_CONFIG (the first
    # matmul raises unless train.py sets it; cuBLAS reads it once per process).
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        overrides = tiny("model=resnet18", "trainer.deterministic=true", "trainer.device=cuda")
        proc = run_train([*overrides, f"hydra.run.dir={run}"], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(run / "last.pt", weights_only=True)["model"] for run in runs)
    for key in a:
        assert torch.equal(a[key], b[key]), key
