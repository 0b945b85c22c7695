"""The plain PyTorch script a user would write for the main job's recipe (issue 14, item 1).

torchvision ImageFolder + PIL + RandomResizedCrop (digits: area 0.35..1, aspect 3/4..4/3, no flip,
configs/data/digits.yaml), a DataLoader with persistent workers, timm resnet18 (every BN gamma
starting at 1: model.zero_init_last=false in the default recipe), SGD Nesterov
(momentum 0.9, wd 5e-4 on >= 2-D weights only), timm cosine per iteration with a 1-epoch warmup
from 4e-4 to 0.1 * batch / 256, per-epoch val top-1, no checkpoints. The yardstick for
train.py's speed (scripts/bench_job.py). One JSON line per epoch, then one summary line.

Usage: python scripts/plain_train.py [--root DIR] [--epochs 30] [--batch-size 128]
       [--workers 2] [--threads 1]
"""

import argparse
import json
import time

import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

MEAN, STD = [0.306] * 3, [0.324] * 3  # digits train split (configs/data/digits.yaml)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", help="ImageNet-layout folder (default: the digits folder)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if args.root is None:
        from powergrad.data.digits import materialize_digits

        args.root = str(materialize_digits())
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    crop = transforms.RandomResizedCrop(32, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3))
    train_set = datasets.ImageFolder(f"{args.root}/train", transforms.Compose([crop, *norm]))
    val_tf = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), *norm])
    val_set = datasets.ImageFolder(f"{args.root}/val", val_tf)
    kw = {"num_workers": args.workers, "persistent_workers": args.workers > 0}
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True, **kw)
    val_loader = DataLoader(val_set, args.batch_size, **kw)

    # Every BN gamma at 1, as train.py's default recipe (configs/recipe/paper_text.yaml).
    model = timm.create_model("resnet18", num_classes=len(train_set.classes), zero_init_last=False)
    groups = param_groups_weight_decay(model, 5e-4)
    lr = 0.1 * args.batch_size / 256
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    iters = len(train_loader)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=(args.epochs - 1) * iters,
        lr_min=0.0,
        warmup_t=iters,
        warmup_lr_init=4e-4,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    step, top1 = 0, 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        for images, target in train_loader:
            loss = F.cross_entropy(model(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
        train_s = time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, target in val_loader:
                correct += (model(images).argmax(1) == target).sum().item()
        top1 = 100.0 * correct / len(val_set)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss.item(),
            "val_top1": top1,
            "images_per_s": iters * args.batch_size / train_s,
            "train_s": train_s,
            "epoch_s": time.perf_counter() - t0,
        }
        print(json.dumps(record), flush=True)
    print(json.dumps({"val_top1": top1, "wall_s": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
