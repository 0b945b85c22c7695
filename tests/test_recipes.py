"""The two recipes (recipe=paper_text | authors_code): lr per epoch, init, PGT implementation.

The pinned values are derived from the sources in docs/fork_evidence.md: the paper's Section 5.1
for paper_text; the authors' fork (README command, parser defaults, train.py's stepping, timm
0.4's schedulers) for authors_code.
"""

import json
import math

import pytest
import torch
from conftest import compose_train, run_train
from torch import nn

from powergrad.config import validate_train
from powergrad.method import build_loss
from powergrad.models import build_model
from powergrad.optim import build_optimizer, build_scheduler
from powergrad.pgt import AuthorsHookCrossEntropy, PowerGradCrossEntropy

EPOCHS = (0, 1, 5, 30, 60, 89, 99)
ITERS_PER_EPOCH = 7  # any count: both recipes' lr at an epoch's first step does not depend on it
# lr of each epoch's first step, derived from the sources (docs/fork_evidence.md):
# paper_text: warmup 4e-4 -> 0.4 over 5 epochs, then 0.2 * (1 + cos(pi (e - 5) / 95)).
# authors_code: epoch 0 at warmup_lr 0.01, epoch e >= 1 at timm-0.4 cosine(e + 1) with peak 0.1,
# warmup 0.01 over 5 epochs (overlapping the decay), t_initial 90, floor 1e-4.
EXPECTED = {
    "paper_text": (0.0004, 0.08032, 0.4, 0.335456, 0.150903, 0.0130871, 0.000109349),
    "authors_code": (0.01, 0.046, 0.0989085, 0.0735001, 0.0235805, 0.0001, 0.0001),
}


def _paper_recipe(recipe, *extra):
    return compose_train(
        f"recipe={recipe}", "trainer=paper", "trainer.device=cpu", "trainer.precision=fp32", *extra
    )


def _authors_lr(epoch):
    def sched(t):
        if t < 5:
            return 0.01 + t * (0.1 - 0.01) / 5
        if t < 90:
            return 1e-4 + 0.5 * (0.1 - 1e-4) * (1 + math.cos(math.pi * t / 90))
        return 1e-4

    return 0.01 if epoch == 0 else sched(epoch + 1)


def _lr_by_epoch(cfg, epochs=range(100)):
    model = nn.Linear(4, 2)
    o = cfg.optim
    optimizer = build_optimizer(
        model, global_batch=cfg.trainer.batch_size, lr_per_256=o.lr_per_256, peak=o.peak_lr
    )
    scheduler = build_scheduler(
        optimizer,
        cfg.sched,
        epochs=cfg.trainer.epochs,
        warmup_epochs=cfg.trainer.warmup_epochs,
        iters_per_epoch=ITERS_PER_EPOCH,
    )
    out = []
    for epoch in epochs:
        scheduler.step_update(num_updates=epoch * ITERS_PER_EPOCH)
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_lr_at_pinned_epochs(recipe):
    cfg = _paper_recipe(recipe)
    validate_train(cfg, world_size=1)
    lrs = _lr_by_epoch(cfg, EPOCHS)
    print(f"\n{recipe}: " + "  ".join(f"e{e}={lr:.6g}" for e, lr in zip(EPOCHS, lrs, strict=True)))
    assert lrs == pytest.approx(EXPECTED[recipe], rel=1e-5)


def test_authors_code_trains_every_epoch_at_the_forks_lr():
    cfg = _paper_recipe("authors_code")
    assert _lr_by_epoch(cfg) == pytest.approx([_authors_lr(e) for e in range(100)], rel=1e-12)
    # The whole epoch, not just its first step: the fork sets the lr once per epoch.
    scheduler_lrs = _lr_by_epoch(cfg, [e + 1 / ITERS_PER_EPOCH * 3 for e in range(3)])
    assert scheduler_lrs == pytest.approx([_authors_lr(e) for e in range(3)])


def test_authors_step_schedule_decays_one_epoch_early():
    # timm 0.4's StepLRScheduler every 30 epochs, stepped as the fork does: 0-based epochs
    # 29, 59 and 89 are the first at peak / 10, / 100, / 1000.
    cfg = _paper_recipe("authors_code", "sched=step")
    validate_train(cfg, world_size=1)
    lrs = _lr_by_epoch(cfg, (27, 28, 29, 58, 59, 89))
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 1e-4])


def test_authors_peak_lr_does_not_scale_with_batch():
    # The fork passes --lr to the optimizer unscaled: peak 0.1 at any global batch.
    for batch in (256, 512, 1024):
        cfg = _paper_recipe("authors_code", f"trainer.batch_size={batch}")
        assert max(_lr_by_epoch(cfg)) == pytest.approx(0.0992411, rel=1e-5)
        text = _paper_recipe("paper_text", f"trainer.batch_size={batch}")
        assert max(_lr_by_epoch(text)) == pytest.approx(0.1 * batch / 256)


@pytest.mark.parametrize("batch", [256, 512, 1024])
def test_table2_rows_scale_the_released_lr_and_keep_both_readings_one_override_away(batch):
    """Table 2's lr at batch 256 / 512 is stated nowhere. The rows scale the released 0.1 at
    batch 1024 linearly (the project's choice); optim.peak_lr=0.1 is the fork's flag as given,
    recipe=paper_text the text's 0.1 per 256 images (0.4 at 1024)."""
    row = f"experiment=t2_b{batch}_pgt"

    def top(peak):  # the fork's highest lr: epoch 4 trains at sched(5), floor 1e-4 (see above)
        return 1e-4 + 0.5 * (peak - 1e-4) * (1 + math.cos(math.pi * 5 / 90))

    assert max(_lr_by_epoch(compose_train(row))) == pytest.approx(top(0.1 * batch / 1024))
    flag = compose_train(row, "optim.peak_lr=0.1")
    assert max(_lr_by_epoch(flag)) == pytest.approx(top(0.1))
    text = compose_train(row, "recipe=paper_text")
    assert max(_lr_by_epoch(text)) == pytest.approx(0.1 * batch / 256)


@pytest.mark.parametrize("recipe", ["paper_text", "authors_code"])
@pytest.mark.parametrize("model", ["resnet18", "resnet50", "resnet101", "seresnet18", "seresnet50"])
def test_both_recipes_start_every_bn_gamma_at_one_as_the_fork(recipe, model):
    cfg = _paper_recipe(recipe, f"model={model}")
    net = build_model(cfg.model.name, 10, zero_init_last=cfg.model.zero_init_last)
    gammas = [m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert gammas and all(bool((g == 1).all()) for g in gammas)


def test_method_impl_selects_the_exact_formula_or_the_authors_hook():
    exact = build_loss(compose_train("method=pgt").method)
    hook = build_loss(compose_train("method=pgt", "method.impl=authors_hook").method)
    assert isinstance(exact, PowerGradCrossEntropy) and isinstance(hook, AuthorsHookCrossEntropy)
    # The hook recovers p from the incoming gradient: right only at loss scale S = N^2.
    torch.manual_seed(0)
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    grads = {}
    for name, loss_fn, scale in (("exact", exact, 1.0), ("hook", hook, 64.0), ("hook1", hook, 1.0)):
        z = logits.clone().requires_grad_()
        (loss_fn(z, target) * scale).backward()
        grads[name] = z.grad / scale
    torch.testing.assert_close(grads["hook"], grads["exact"], rtol=1e-4, atol=1e-6)
    assert (grads["hook1"] - grads["exact"]).abs().max() > 0.1


def test_the_released_recipe_runs_an_experiment_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            "recipe=authors_code",
            "experiment=t1_resnet18_cosine_pgt",
            "data=synthetic",
            "data.num_classes=10",
            "data.image_size=32",
            "data.synthetic_train_images=32",
            "data.synthetic_val_images=16",
            "trainer.batch_size=16",
            "trainer.epochs=3",
            "trainer.warmup_epochs=1",
            "sched.cooldown_epochs=1",
            "trainer.device=cpu",
            "trainer.precision=fp32",
            "trainer.progress=false",
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # fork_epoch stepping over 3 epochs (1 warmup, 1 cooldown): the lr is constant within an
    # epoch, so each record's lr (after its last step) is the next epoch's: lr(e + 2).
    assert [h["epoch"] for h in history] == [1, 2, 3]
    config = (run_dir / "config.yaml").read_text()
    assert "stepping: fork_epoch" in config and "peak_lr: 0.1" in config
