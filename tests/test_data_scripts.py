"""scripts/prepare_imagenet.py, scripts/check_dataset.py and scripts/bench_data.py on tiny real
folders (real JPEG files written by the tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from imagefiles import corrupt_huffman_jpeg, jpeg_bytes, write_odd_files

from powergrad.data import DataConfig, DatasetError, LoaderConfig, Shard, build_loaders
from powergrad.data.generate import photo_like, write_image_folder
from powergrad.data.layout import read_bad_manifest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake_imagenet(tmp_path):
    """ROOT/train with 3 wnids x 2 JPEGs, a flat official-style val folder of 5 JPEGs, and the
    wnid of each val image."""
    root = write_image_folder(
        tmp_path / "imagenet", classes=3, train_per_class=2, val_per_class=1, size=(40, 30)
    )
    shutil.rmtree(root / "val")
    wnids = sorted(os.listdir(root / "train"))
    flat = tmp_path / "ILSVRC2012_img_val"
    flat.mkdir()
    rng = np.random.default_rng(3)
    truth = {}
    for i in range(1, 6):
        stem = f"ILSVRC2012_val_{i:08d}"
        (flat / f"{stem}.JPEG").write_bytes(jpeg_bytes(photo_like(rng, 40, 30)))
        truth[stem] = wnids[i % 3]
    return root, flat, truth


def val_contents(root: Path) -> dict[str, str]:
    return {
        Path(name).stem: wnid
        for wnid in os.listdir(root / "val")
        for name in os.listdir(root / "val" / wnid)
    }


def test_prepare_kaggle_csv_hardlink(fake_imagenet, tmp_path, capsys):
    root, flat, truth = fake_imagenet
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"{stem},{wnid} 1 2 30 40 {wnid} 3 4 20 20" for stem, wnid in truth.items()]
    csv.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    prepare = load_script("prepare_imagenet")
    argv = ["--root", str(root), "--val-dir", str(flat), "--labels", str(csv), "--mode", "hardlink"]
    expect = ["--expect-train", "6", "--expect-val", "5", "--expect-classes", "3"]
    assert prepare.main(argv + expect) == 0
    assert "layout OK" in capsys.readouterr().out
    assert val_contents(root) == truth
    placed = next((root / "val").glob("*/*.JPEG"))
    assert placed.stat().st_nlink == 2  # a hard link, not a copy
    # The official counts are the default: this tiny folder fails them, naming what is off.
    assert prepare.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "expected 1281167 train images, found 6" in err
    assert "expected 50000 val images, found 5" in err
    assert prepare.main(["--root", str(root), "--no-count-check"]) == 0


@pytest.mark.parametrize("meta_format", ["mat", "txt"])
def test_prepare_devkit_ground_truth(fake_imagenet, tmp_path, meta_format):
    """Devkit ground truth holds ILSVRC2012_IDs, mapped to wnids through meta (not sorted)."""
    from scipy.io import savemat

    root, flat, truth = fake_imagenet
    wnids = sorted(os.listdir(root / "train"))
    ids = {wnid: 1000 - k for k, wnid in enumerate(wnids)}  # deliberately not sorted order
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{ids[truth[stem]]}\n" for stem in sorted(truth)))
    if meta_format == "mat":
        meta = tmp_path / "meta.mat"
        synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        for k, wnid in enumerate(wnids):
            synsets[k] = (ids[wnid], wnid)
        synsets[3] = (1001, "n99999999")  # a non-leaf synset: ignored
        savemat(str(meta), {"synsets": synsets})
    else:
        meta = tmp_path / "synsets.txt"
        meta.write_text("".join(f"{ids[w]} {w}\n" for w in wnids))
    prepare = load_script("prepare_imagenet")
    argv = ["--root", str(root), "--val-dir", str(flat), "--labels", str(gt), "--meta", str(meta)]
    assert prepare.main([*argv, "--no-count-check"]) == 0
    assert val_contents(root) == truth
    assert len(list(flat.iterdir())) == 5  # copied, the source is untouched


def test_prepare_refuses_labels_that_do_not_match_images(fake_imagenet, tmp_path):
    root, flat, truth = fake_imagenet
    pairs = tmp_path / "pairs.txt"
    stems = sorted(truth)
    pairs.write_text("".join(f"{s}.JPEG {truth[s]}\n" for s in stems[:-1]))
    prepare = load_script("prepare_imagenet")
    with pytest.raises(SystemExit, match="1 image"):
        prepare.main(["--root", str(root), "--val-dir", str(flat), "--labels", str(pairs)])
    assert not (root / "val").exists()


def test_check_dataset_manifest_makes_both_backends_skip(tmp_path, capsys):
    """A JPEG that passes the cheap check but cannot be decoded is found by the full scan; the
    manifest then keeps it away from torch and DALI (which would otherwise fail on it)."""
    root = write_image_folder(
        tmp_path / "ds", classes=2, train_per_class=4, val_per_class=1, size=(40, 30)
    )
    wnid = sorted(os.listdir(root / "train"))[0]
    odd = write_odd_files(root / "val" / wnid)
    bogus = corrupt_huffman_jpeg(root / "train" / wnid / "bogus_huffman.JPEG")
    data = DataConfig(name="imagenet", root=str(root), image_size=24)
    loader = LoaderConfig(backend="torch", workers=0)
    shard = Shard(3)
    # Without the manifest the header check passes it; batch 3 x 3 steps reads all 9 train
    # files, so decoding reaches it: skipped at run time, named in a warning (with
    # on_bad_file=error it stops the run: tests/test_data_badfiles.py).
    with pytest.warns(UserWarning):
        unscanned = build_loaders(data, loader, shard)
    with pytest.warns(UserWarning, match=r"unreadable file .*bogus_huffman\.JPEG"):
        assert len(list(unscanned.train.epoch(0))) == 3

    check = load_script("check_dataset")
    assert check.main([str(root), "--workers", "2"]) == 1
    assert "3 bad" in capsys.readouterr().out
    bad = read_bad_manifest(root / "bad_files.tsv")
    assert set(bad) == {f"train/{wnid}/{bogus.name}"} | {f"val/{wnid}/{n}" for n in odd["bad"]}
    assert "decode failed" in bad[f"train/{wnid}/{bogus.name}"]

    for backend in ("torch", "dali"):
        with pytest.warns(UserWarning, match=r"bogus_huffman\.JPEG"):
            loaders = build_loaders(data, LoaderConfig(backend=backend, workers=1), shard)
        assert loaders.train_images == 8 and loaders.val_images == 2 + len(odd["good"])
        batches = list(loaders.train.epoch(0))
        assert len(batches) == 8 // 3 and all(x.shape == (3, 3, 24, 24) for x, _ in batches)
        assert sum(len(y) for _, y in loaders.val) == loaders.val_images
    with pytest.raises(DatasetError, match=r"bogus_huffman\.JPEG"):
        build_loaders(
            DataConfig(name="imagenet", root=str(root), on_bad_file="error"), loader, shard
        )


def test_bench_data_prints_ratio(tmp_path):
    env = {**os.environ, "POWERGRAD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench_data.py",
            "--images",
            "32",
            "--batch",
            "8",
            "--epochs",
            "2",
            "--rounds",
            "2",
            "--stages",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dali_cpu_images_per_s"] > 0 and summary["torch_images_per_s"] > 0
    assert summary["ratio_dali_cpu_over_torch"] > 0 and summary["threads"] == 2
    low, high = summary["ratio_dali_cpu_over_torch_ci95"]
    assert 0 < low <= summary["ratio_dali_cpu_over_torch"] <= high
    assert summary["images_per_epoch"] == 32 and summary["rounds"] == 2
    stages = summary["dali_cpu_stage_images_per_s"]
    assert list(stages) == [
        "read",
        "decode_full",
        "decode_crop",
        "resize",
        "resize_no_antialias",
        "normalize",
    ]
    assert all(rate > 0 for rate in stages.values())
