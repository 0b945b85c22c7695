"""Files that fail during the run (corrupt past the header, deleted mid-run), both backends:
skip replaces a train sample by the next readable file (fixed shapes, world-size independent),
drops a val sample, counts and logs it; error stops with the path. Plus the file-list digest."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from imagefiles import corrupt_huffman_jpeg, garble_scan_jpeg

from powergrad.data import (
    BAD_FILE_LOG_NAME,
    DataConfig,
    DatasetError,
    LoaderConfig,
    Shard,
    build_loaders,
    file_list_change,
)
from powergrad.data.generate import write_image_folder
from powergrad.data.layout import read_bad_manifest
from powergrad.data.scan import decode_problem

CPU = torch.device("cpu")
BACKENDS = ["torch", "dali"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))


def make_folder(root, *, train=6, val=3):
    """2 classes of small real JPEGs; returns (root, sorted train files of class 0)."""
    root = write_image_folder(
        root, classes=2, train_per_class=train, val_per_class=val, size=(48, 40)
    )
    cls = sorted(os.listdir(root / "train"))[0]
    return root, sorted((root / "train" / cls).iterdir())


def cfg(root, **kw):
    return DataConfig(name="imagenet", root=str(root), image_size=32, crop_scale_min=0.5, **kw)


def build(data, backend, *, batch_size, rank=0, world_size=1, run_dir=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DALI's "no full decode scan" note
        return build_loaders(
            data,
            LoaderConfig(backend=backend, workers=1),
            Shard(batch_size, rank, world_size, CPU, seed=3),
            run_dir=run_dir,
        )


def epoch(loaders, e=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(x.clone(), y.clone()) for x, y in loaders.train.epoch(e)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_skip_replaces_by_next_file_logs_and_counts(tmp_path, backend):
    """A bogus-Huffman JPEG (passes the start-up check) is replaced by the next file of the
    listing: the batches equal, bitwise, those of a folder where it is a copy of that file."""
    root, files = make_folder(tmp_path / "ds")
    ref_root = tmp_path / "ref"
    shutil.copytree(root, ref_root)
    bad = files[2]
    corrupt_huffman_jpeg(bad)
    shutil.copyfile(files[3], ref_root / bad.relative_to(root))
    run_dir = tmp_path / "run"
    loaders = build(cfg(root), backend, batch_size=4, run_dir=run_dir)
    assert loaders.train_images == 12 and loaders.bad_files == {}  # not caught at start
    with pytest.warns(UserWarning, match=f"unreadable file {bad}"):
        got = [(x.clone(), y.clone()) for x, y in loaders.train.epoch(0)]
    want = epoch(build(cfg(ref_root), backend, batch_size=4))
    assert len(got) == len(want) == 3
    for (x, y), (rx, ry) in zip(got, want, strict=True):
        assert x.shape == (4, 3, 32, 32) and torch.equal(y, ry) and torch.equal(x, rx)
    log = loaders.bad_file_log
    assert list(log.bad) == [str(bad)] and log.skipped == 1
    manifest = read_bad_manifest(run_dir / BAD_FILE_LOG_NAME)  # the log is a manifest
    assert list(manifest) == [str(bad.relative_to(root))]
    assert "epoch 0" in manifest[str(bad.relative_to(root))]
    # Next epoch: counted again, warned and logged once.
    epoch(loaders, 1)
    assert log.skipped == 2 and len(read_bad_manifest(run_dir / BAD_FILE_LOG_NAME)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_error_names_the_file(tmp_path, backend):
    root, files = make_folder(tmp_path / "ds")
    corrupt_huffman_jpeg(files[1])
    loaders = build(cfg(root, on_bad_file="error"), backend, batch_size=4)
    with pytest.raises(DatasetError, match=f"cannot read {files[1]}"):
        epoch(loaders)


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_deleted_mid_run(tmp_path, backend):
    root, files = make_folder(tmp_path / "ds")
    skip = build(cfg(root), backend, batch_size=4, run_dir=tmp_path / "run")
    stop = build(cfg(root, on_bad_file="error"), backend, batch_size=4)
    files[4].unlink()
    assert len(epoch(skip)) == 3 and list(skip.bad_file_log.bad) == [str(files[4])]
    assert (tmp_path / "run" / BAD_FILE_LOG_NAME).is_file()
    with pytest.raises(DatasetError, match=str(files[4])):
        epoch(stop)


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_skip_drops_the_file_and_error_names_it(tmp_path, backend):
    root, _ = make_folder(tmp_path / "ds", val=4)
    val_files = sorted((root / "val").rglob("*.JPEG"))
    corrupt_huffman_jpeg(val_files[1])
    loaders = build(cfg(root), backend, batch_size=3)
    for _ in range(2):  # the second pass runs on the updated list
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = torch.cat([y for _, y in loaders.val])
        assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert loaders.bad_file_log.skipped == 2 and list(loaders.bad_file_log.bad) == [
        str(val_files[1])
    ]
    stop = build(cfg(root, on_bad_file="error"), backend, batch_size=3)
    with pytest.raises(DatasetError, match=str(val_files[1])):
        list(stop.val)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_keeps_global_batches_independent_of_world_size(tmp_path, backend):
    """Rank r's batch b is the r-th slice of the 1-rank global batch b, bad file included."""
    root, files = make_folder(tmp_path / "ds", train=8)
    corrupt_huffman_jpeg(files[5])
    single = epoch(build(cfg(root), backend, batch_size=4))
    ranks = [epoch(build(cfg(root), backend, batch_size=2, rank=r, world_size=2)) for r in (0, 1)]
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][b][1] for r in (0, 1)]), y)
        if backend == "torch":  # DALI seeds its augmentation per rank: labels only
            assert torch.equal(torch.cat([ranks[r][b][0] for r in (0, 1)]), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dataset_gone_stops_the_run(tmp_path, backend):
    root, _ = make_folder(tmp_path / "ds", train=20)
    loaders = build(cfg(root), backend, batch_size=4)
    for path in (root / "train").rglob("*.JPEG"):
        path.unlink()
    with pytest.raises(DatasetError, match="consecutive files unreadable"):
        epoch(loaders)


def test_full_scan_catches_what_dali_decodes_to_garbage(tmp_path):
    """Corrupt entropy data: the cheap check passes it, torchvision refuses it (DALI's CPU
    decoder would not: the reason scripts/check_dataset.py exists)."""
    path = garble_scan_jpeg(tmp_path / "garbled.JPEG")
    assert decode_problem(str(path)).startswith("decode failed")


def test_file_list_digest_and_change_message(tmp_path):
    root, files = make_folder(tmp_path / "ds")
    digest = build(cfg(root), "torch", batch_size=4).file_list_digest()
    assert digest.startswith("train=12 val=6 sha256=")
    assert file_list_change(digest, digest) is None and file_list_change(None, digest) is None
    assert build(cfg(root), "torch", batch_size=4).file_list_digest() == digest
    files[0].unlink()
    now = build(cfg(root), "torch", batch_size=4).file_list_digest()
    message = file_list_change(digest, now)
    assert "train 12 -> 11 images" in message and "val 6 -> 6 images" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_image_data_torch_skips_dali_cannot_tell(tmp_path, backend):
    """A JPEG with corrupt entropy data: torchvision refuses it (skipped and logged); DALI's
    decoder returns garbage pixels without an error, which no loader can see (documented in
    powergrad.data.dali_backend; the full scan is the remedy)."""
    root, files = make_folder(tmp_path / "ds")
    garble_scan_jpeg(files[1])
    loaders = build(cfg(root), backend, batch_size=4)
    assert len(epoch(loaders)) == 3
    found = list(loaders.bad_file_log.bad)
    assert found == ([str(files[1])] if backend == "torch" else [])


def test_class_without_a_usable_image_is_refused(tmp_path):
    root, files = make_folder(tmp_path / "ds", train=2)
    for path in files:
        corrupt_huffman_jpeg(path)
    (root / "bad_files.tsv").write_text(
        "".join(f"{p.relative_to(root)}\tdecode failed\n" for p in files)
    )
    with pytest.raises(DatasetError, match="without a usable image") as err:
        build(cfg(root), "torch", batch_size=1)
    assert f"{files[0].parent} (2 file(s), none usable)" in str(err.value)
