"""Every CPU-capable backend on real files: batch contract, determinism, exact resume, odd files,
exactly-once validation across ranks, and torch vs DALI agreement."""

from __future__ import annotations

import io
import os
import warnings

import pytest
import torch
from imagefiles import write_image_zoo, write_odd_files

from powergrad.data import DataConfig, DatasetError, LoaderConfig, Shard, build_loaders
from powergrad.data.digits import materialize_digits
from powergrad.data.generate import write_image_folder
from powergrad.data.scan import full_scan
from powergrad.data.torch_backend import load_rgb

CPU = torch.device("cpu")
BACKENDS = ["torch", "dali"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits_cfg(tmp_path_factory):
    root = materialize_digits(tmp_path_factory.mktemp("digits"))
    return DataConfig(
        name="digits",
        root=str(root),
        image_size=32,
        val_resize_ratio=1.0,
        crop_scale_min=0.35,
        hflip=True,  # exercises the flip path; the digits config turns it off
        mean=[0.306] * 3,
        std=[0.324] * 3,
    )


def build(data, backend, *, batch_size, rank=0, world_size=1, seed=0, workers=1):
    shard = Shard(batch_size, rank, world_size, CPU, seed)
    return build_loaders(data, LoaderConfig(backend=backend, workers=workers), shard)


def collect(batches):
    xs, ys = zip(*batches, strict=True)
    return list(xs), list(ys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_and_val_contract(digits_cfg, backend):
    loaders = build(digits_cfg, backend, batch_size=64)
    assert len(loaders.train) == 1437 // 64
    xs, ys = collect(loaders.train.epoch(0))
    assert len(xs) == len(loaders.train)
    for x, y in zip(xs, ys, strict=True):
        assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and x.device == CPU
        assert y.shape == (64,) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < 10
    images = torch.cat(xs)
    # Normalized with the digits statistics: roughly zero mean, unit spread.
    assert abs(float(images.mean())) < 0.5 and 0.5 < float(images.std()) < 2.0
    vx, vy = collect(loaders.val)
    assert len(vx) == len(loaders.val) == 6
    assert sum(len(y) for y in vy) == 360
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x in vx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_epochs_and_resume_from_start_batch(digits_cfg, backend):
    a = build(digits_cfg, backend, batch_size=96)
    full1 = collect(a.train.epoch(1))
    # A fresh loader that never ran epoch 0 gives the same epoch 1, bitwise.
    b = build(digits_cfg, backend, batch_size=96)
    again = collect(b.train.epoch(1))
    assert all(torch.equal(p, q) for p, q in zip(full1[0], again[0], strict=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tail = collect(b.train.epoch(1, start_batch=9))
    # DALI without a checkpoint replays the first 9 batches, and says so.
    assert any("replaying" in str(w.message) for w in caught) == (backend == "dali")
    assert len(tail[0]) == len(a.train) - 9
    for p, q in zip(full1[0][9:] + full1[1][9:], tail[0] + tail[1], strict=True):
        assert torch.equal(p, q)
    # Another epoch or another seed is another order / other crops.
    assert not torch.equal(collect(a.train.epoch(2))[1][0], full1[1][0])
    other = build(digits_cfg, backend, batch_size=96, seed=1)
    assert not torch.equal(next(iter(other.train.epoch(1)))[1], full1[1][0])


def test_dali_pipeline_built_ahead_gives_the_fresh_epoch(digits_cfg):
    """Epoch 1's pipeline is built on a thread while epoch 0 ends; its batches are those of a
    pipeline built for epoch 1 alone, bitwise; a resume mid-epoch does not use it."""
    a = build(digits_cfg, "dali", batch_size=96)
    collect(a.train.epoch(0))
    assert a.train._ahead is not None and a.train._ahead[0] == 1
    ahead = collect(a.train.epoch(1))
    fresh = collect(build(digits_cfg, "dali", batch_size=96).train.epoch(1))
    assert len(ahead[0]) == len(fresh[0]) == len(a.train)
    for p, q in zip(ahead[0] + ahead[1], fresh[0] + fresh[1], strict=True):
        assert torch.equal(p, q)
    assert a.train._ahead[0] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # replaying batches 0..3
        tail = collect(a.train.epoch(2, start_batch=4))
    full = collect(build(digits_cfg, "dali", batch_size=96).train.epoch(2))
    assert all(torch.equal(p, q) for p, q in zip(full[0][4:], tail[0], strict=True))


def test_dali_checkpoint_resume_through_torch_save(digits_cfg):
    """state_dict after batch k survives torch.save / load(weights_only=True) and restores the
    DALI pipeline so that epoch(e, k + 1) continues bitwise."""
    loaders = build(digits_cfg, "dali", batch_size=96)
    assert loaders.train.state_dict() == {}
    seen, saved = [], None
    for k, (x, _) in enumerate(loaders.train.epoch(3)):
        seen.append(x)
        if k == 4:
            buf = io.BytesIO()
            torch.save({"data": loaders.train.state_dict()}, buf)
            saved = buf.getvalue()
    # Taking the checkpoint did not disturb the running epoch.
    fresh = [x for x, _ in build(digits_cfg, "dali", batch_size=96).train.epoch(3)]
    assert all(torch.equal(p, q) for p, q in zip(seen, fresh, strict=True))
    state = torch.load(io.BytesIO(saved), weights_only=True)["data"]
    assert state["epoch"] == 3 and state["next_batch"] == 5
    assert isinstance(state["dali_checkpoint"], str)
    resumed = build(digits_cfg, "dali", batch_size=96)
    resumed.train.load_state_dict(state)
    with warnings.catch_warnings():
        # Restored from the checkpoint, not replayed: no replay warning.
        warnings.simplefilter("error")
        rest = [x for x, _ in resumed.train.epoch(3, start_batch=5)]
    assert len(rest) == len(seen) - 5
    assert all(torch.equal(p, q) for p, q in zip(seen[5:], rest, strict=True))


def test_torch_augmentation_independent_of_workers(digits_cfg):
    """Per-sample seeding: 0 or 2 worker processes give the same batches."""
    one = collect(build(digits_cfg, "torch", batch_size=128, workers=0).train.epoch(0))
    two = collect(build(digits_cfg, "torch", batch_size=128, workers=2).train.epoch(0))
    for p, q in zip(one[0] + one[1], two[0] + two[1], strict=True):
        assert torch.equal(p, q)


def test_torch_close_stops_its_worker_processes(digits_cfg):
    """close() stops the persistent train and val workers now, twice in a row too; the next
    epoch starts new ones and reads the same batches."""
    import multiprocessing

    loaders = build(digits_cfg, "torch", batch_size=128, workers=1)
    first = collect(loaders.train.epoch(0))
    collect(loaders.val)
    assert len(multiprocessing.active_children()) == 2
    loaders.close()
    loaders.close()
    assert multiprocessing.active_children() == []
    again = collect(loaders.train.epoch(0))
    assert all(torch.equal(p, q) for p, q in zip(first[0], again[0], strict=True))
    loaders.close()
    assert multiprocessing.active_children() == []


def test_backends_share_the_sample_order(digits_cfg):
    """Both backends read the same per-epoch permutation, so the label sequences are equal."""
    labels = {
        backend: torch.cat(collect(build(digits_cfg, backend, batch_size=128).train.epoch(4))[1])
        for backend in BACKENDS
    }
    assert torch.equal(labels["torch"], labels["dali"])


@pytest.fixture
def photo_folder(tmp_path):
    """2 classes of real 500x375 JPEGs (q90) plus ImageNet's odd files in train and val."""
    root = write_image_folder(
        tmp_path / "photos", classes=2, train_per_class=3, val_per_class=2, size=(500, 375)
    )
    wnid = sorted(os.listdir(root / "train"))[0]
    odd = write_odd_files(root / "train" / wnid)
    write_odd_files(root / "val" / wnid)
    return root, odd


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_files_through_every_backend(photo_folder, backend):
    root, odd = photo_folder
    data = DataConfig(name="imagenet", root=str(root), image_size=64)
    with pytest.warns(UserWarning, match="4 undecodable") as record:
        loaders = build(data, backend, batch_size=3)
    message = str(record[0].message)
    for split in ("train", "val"):
        for name in odd["bad"]:
            assert name in message and f"/{split}/" in message
    assert loaders.train_images == 6 + 3 and loaders.val_images == 4 + 3
    assert sorted(p.rsplit("/", 1)[1] for p in loaders.bad_files) == sorted(odd["bad"] * 2)
    for epoch in range(2):
        for x, y in loaders.train.epoch(epoch):
            assert x.shape == (3, 3, 64, 64) and torch.isfinite(x).all() and y.shape == (3,)
    vx, _ = collect(loaders.val)
    images = torch.cat(vx)
    assert images.shape == (7, 3, 64, 64)
    # Listing order is sorted by class then name: find the grayscale JPEG; as RGB its three
    # channels are equal once the (channel-equal) normalization is undone.
    names = sorted(os.listdir(root / "val" / sorted(os.listdir(root / "val"))[0]))
    good = [n for n in names if n not in odd["bad"]]
    gray = images[good.index("odd_gray.JPEG")]
    mean = torch.tensor(data.mean).view(3, 1, 1)
    std = torch.tensor(data.std).view(3, 1, 1)
    pixels = gray * std + mean
    assert torch.allclose(pixels[0], pixels[1], atol=1e-4)
    assert torch.allclose(pixels[1], pixels[2], atol=1e-4)
    with pytest.raises(DatasetError) as err:
        build(
            DataConfig(name="imagenet", root=str(root), on_bad_file="error"), backend, batch_size=3
        )
    for name in odd["bad"]:
        assert os.path.join(str(root), "val", sorted(os.listdir(root / "val"))[0], name) in str(
            err.value
        )


def test_decodable_odd_files_decode_to_rgb(tmp_path):
    odd = write_odd_files(tmp_path)
    for name in odd["good"]:
        image = load_rgb(str(tmp_path / name))
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)


def test_every_kind_of_valid_image_reaches_both_loaders_as_the_same_8bit_rgb(tmp_path):
    """16-bit PNG / TIFF, gray (+ alpha), palette, 1-bit, CMYK / progressive / EXIF-rotated
    JPEG, 1 x 1, 150:1, BMP, WebP: check_dataset's decode scan calls every one good, and both
    loaders train on all of them and score all in val with the same pixels. (Before: the torch
    loader handed 16-bit PNGs on as uint16 and crashed in epoch 1's collate while the scan
    called them good; DALI applied the EXIF orientation, torchvision did not.)"""
    root = tmp_path / "zoo"
    for split in ("train", "val"):
        for seed, cls in enumerate(("a", "b")):
            names = write_image_zoo(root / split / cls, seed=seed)
    bad, scanned = full_scan(root, workers=1)
    assert bad == {} and scanned == 4 * len(names)
    for name in names:
        image = load_rgb(str(root / "val" / "a" / name))
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, name
    data = DataConfig(name="imagenet", root=str(root), image_size=30, val_resize_ratio=1.0)
    val = {}
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DALI's "no full decode scan" note
            loaders = build(data, backend, batch_size=4)
            xs, _ = collect(loaders.train.epoch(0))
            val[backend] = torch.cat(collect(loaders.val)[0])
        assert loaders.bad_files == {} and not loaders.bad_file_log.bad
        assert len(xs) == len(loaders.train) == 2 * len(names) // 4
        assert all(torch.isfinite(x).all() for x in xs)
        assert val[backend].shape == (2 * len(names), 3, 30, 30)
    # The same decoded pixels: at 30 pixels the 40 x 30 images are only cropped, so they agree
    # to float rounding; the resized 300 x 2 ones within one 0-255 level (~0.017 normalized).
    diff = (val["torch"] - val["dali"]).abs().flatten(1).amax(1)
    assert float(diff.max()) < 0.02, dict(zip(names * 2, diff.tolist(), strict=True))


def test_torch_and_dali_val_tensors_agree(photo_folder):
    """Same val image, same normalization, resize (shorter side 256 / ratio) and center crop."""
    root, _ = photo_folder
    data = DataConfig(name="imagenet", root=str(root), image_size=56, val_resize_ratio=0.875)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {b: collect(build(data, b, batch_size=4).val) for b in BACKENDS}
    torch_x, dali_x = torch.cat(out["torch"][0]), torch.cat(out["dali"][0])
    assert torch.equal(torch.cat(out["torch"][1]), torch.cat(out["dali"][1]))
    diff = (torch_x - dali_x).abs()
    # One 0-255 level is 1 / (255 * 0.225) ~ 0.017 after normalization: resampling differs by
    # at most a few levels, the mean well under one.
    assert float(diff.max()) < 0.15
    assert float(diff.mean()) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_exactly_once_across_two_ranks(tmp_path, backend):
    """7 val images over 2 ranks with batch 2: the ranks' batches together are the 1-rank pass."""
    root = write_image_folder(
        tmp_path / "odd7", classes=3, train_per_class=4, val_per_class=0, val_total=7, size=(48, 40)
    )
    data = DataConfig(name="imagenet", root=str(root), image_size=32)
    single = collect(build(data, backend, batch_size=2).val)
    per_rank = [build(data, backend, batch_size=2, rank=r, world_size=2) for r in range(2)]
    xs, ys, counts = [], [], []
    for loaders in per_rank:
        rx, ry = collect(loaders.val)
        assert len(rx) == len(loaders.val)
        xs += rx
        ys += ry
        counts.append(sum(len(y) for y in ry))
    assert sum(counts) == 7 and sorted(counts) == [3, 4]
    assert torch.equal(torch.cat(ys), torch.cat(single[1]))
    assert torch.allclose(torch.cat(xs), torch.cat(single[0]), atol=1e-6)
    # Training: both ranks run the same number of full steps on disjoint halves.
    assert len(per_rank[0].train) == len(per_rank[1].train) == 12 // 2 // 2


def test_synthetic_contract():
    data = DataConfig(
        name="synthetic",
        num_classes=10,
        image_size=16,
        synthetic_train_images=100,
        synthetic_val_images=15,
    )
    loaders = build(data, "dali", batch_size=8, rank=1, world_size=2)
    assert (loaders.num_classes, loaders.train_images, loaders.val_images) == (10, 100, 15)
    batches = list(loaders.train.epoch(0, start_batch=2))
    assert len(loaders.train) == 6 and len(batches) == 4
    x, y = batches[0]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y.max()) < 10
    assert sum(len(y) for _, y in loaders.val) == 8 and len(loaders.val) == 1


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"data\.name"):
        DataConfig(name="cifar")
    with pytest.raises(ValueError, match="num_classes"):
        DataConfig(name="synthetic")
    with pytest.raises(ValueError, match=r"loader\.backend"):
        LoaderConfig(backend="ffcv")
    for bad in ({"batch_size": 0}, {"batch_size": 4, "rank": 2, "world_size": 2}):
        with pytest.raises(ValueError, match="batch_size="):
            Shard(**bad)
    assert Shard(4, device="cpu").device == CPU


@pytest.mark.gpu
def test_dali_mixed_contract_resume_and_val(digits_cfg, photo_folder):
    """Mixed (nvJPEG) decode + GPU operators: batches on the GPU, exact resume, val close to
    the CPU reference (nvJPEG's IDCT / chroma upsampling differ from libjpeg-turbo slightly)."""
    cuda = torch.device("cuda")
    shard = Shard(96, device=cuda)
    gpu_loader = LoaderConfig(backend="dali", workers=2)
    loaders = build_loaders(digits_cfg, gpu_loader, shard)
    full, saved = [], None
    for k, (x, y) in enumerate(loaders.train.epoch(1)):
        assert x.device.type == "cuda" and y.device.type == "cuda" and y.dtype == torch.int64
        assert x.shape == (96, 3, 32, 32) and x.dtype == torch.float32
        full.append(x)
        if k == 3:
            saved = loaders.train.state_dict()
    with pytest.warns(UserWarning, match="replaying"):
        tail = [x for x, _ in loaders.train.epoch(1, start_batch=4)]
    assert all(torch.equal(p, q) for p, q in zip(full[4:], tail, strict=True))
    resumed = build_loaders(digits_cfg, gpu_loader, shard)
    resumed.train.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = [x for x, _ in resumed.train.epoch(1, start_batch=4)]
    assert all(torch.equal(p, q) for p, q in zip(full[4:], again, strict=True))

    root, _ = photo_folder
    data = DataConfig(name="imagenet", root=str(root), image_size=56)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpu_val = collect(build_loaders(data, gpu_loader, Shard(4, device=cuda)).val)
        cpu_val = collect(build(data, "torch", batch_size=4).val)
    assert torch.equal(torch.cat(gpu_val[1]).cpu(), torch.cat(cpu_val[1]))
    diff = (torch.cat(gpu_val[0]).cpu() - torch.cat(cpu_val[0])).abs()
    assert float(diff.mean()) < 0.03


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_interpolation_size_and_filters(photo_folder, backend):
    """Both filters give image_size crops; bicubic and bilinear differ; the backends agree."""
    root, _ = photo_folder
    out = {}
    for interp in ("bilinear", "bicubic"):
        data = DataConfig(name="imagenet", root=str(root), image_size=56, val_interpolation=interp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[interp] = {
                b: torch.cat(collect(build(data, b, batch_size=4).val)[0]) for b in BACKENDS
            }
        assert out[interp][backend].shape == (7, 3, 56, 56)
    diff = (out["bilinear"][backend] - out["bicubic"][backend]).abs()
    assert float(diff.mean()) > 1e-3
    # The two backends resample alike within a few 0-255 levels for each filter.
    for interp in ("bilinear", "bicubic"):
        assert float((out[interp]["torch"] - out[interp]["dali"]).abs().mean()) < 0.02
    with pytest.raises(ValueError, match="val_interpolation"):
        DataConfig(val_interpolation="nearest")


@pytest.mark.parametrize("hflip", [True, False])
def test_train_transform_is_bitwise_the_v2_compose_it_replaces(hflip):
    """TrainTransform calls the v2 image kernels directly: the same images and the same random
    draws (the generator is left where v2's Compose leaves it) as the v2 classes."""
    from torchvision.transforms import v2

    from powergrad.data.torch_backend import TrainTransform

    for size, scale in ((32, 0.35), (224, 0.08)):
        data = DataConfig(name="imagenet", image_size=size, crop_scale_min=scale, hflip=hflip)
        steps = [v2.RandomResizedCrop(size, scale=(scale, 1.0), ratio=(3 / 4, 4 / 3))]
        reference = v2.Compose(steps + ([v2.RandomHorizontalFlip()] if hflip else []))
        ours = TrainTransform(data)
        for shape in ((3, 32, 32), (3, 375, 500), (3, 40, 7)):  # (40, 7): the fallback crop
            image = torch.randint(0, 256, shape, dtype=torch.uint8)
            for seed in range(40):
                torch.manual_seed(seed)
                want, want_next = reference(image), torch.rand(1)
                torch.manual_seed(seed)
                got, got_next = ours(image), torch.rand(1)
                assert torch.equal(got, want) and torch.equal(got_next, want_next)
