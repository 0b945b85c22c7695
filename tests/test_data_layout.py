"""Dataset layout check: errors name paths, bad files are sniffed, cached, skipped or refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from imagefiles import jpeg_bytes, write_odd_files

from powergrad.data.generate import photo_like, write_image_folder
from powergrad.data.layout import (
    DatasetError,
    _read_listing,
    _write_listing,
    check_dataset,
    read_bad_manifest,
    sniff_bytes,
    sniff_file,
    write_bad_manifest,
)
from powergrad.data.scan import full_scan


@pytest.fixture
def tiny(tmp_path):
    """2 classes x (2 train, 1 val) real 40x30 JPEGs."""
    return write_image_folder(
        tmp_path / "ds", classes=2, train_per_class=2, val_per_class=1, size=(40, 30)
    )


def test_good_folder_lists_sorted_classes_and_labels(tiny):
    listing = check_dataset(tiny, cache_dir=None)
    assert listing.classes == sorted(os.listdir(tiny / "train"))
    assert len(listing.train) == 4 and len(listing.val) == 2
    for sample in listing.train + listing.val:
        assert sample.path.split("/")[1] == listing.classes[sample.label]
    assert listing.bad == {}


def test_missing_root_and_split_name_the_path(tmp_path, tiny):
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        check_dataset(tmp_path / "nowhere")
    (tiny / "val").rename(tiny / "validation")
    with pytest.raises(DatasetError, match=f"missing split folder: {tiny / 'val'}"):
        check_dataset(tiny)


def test_empty_class_names_the_folder(tiny):
    (tiny / "val" / "n99999999").mkdir()
    (tiny / "train" / "n99999999").mkdir()
    with pytest.raises(DatasetError, match="empty class") as err:
        check_dataset(tiny)
    assert str(tiny / "val" / "n99999999") in str(err.value)


def test_class_mismatch_names_both_sides(tiny):
    val_classes = sorted(os.listdir(tiny / "val"))
    (tiny / "val" / val_classes[0]).rename(tiny / "val" / "n00000001")
    with pytest.raises(DatasetError, match="class mismatch") as err:
        check_dataset(tiny)
    message = str(err.value)
    assert val_classes[0] in message and "n00000001" in message
    assert str(tiny / "train") in message and str(tiny / "val") in message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "truncated JPEG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"\xff\xd9" + b"\x00" * 300, ""),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "truncated PNG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50 + b"IEND\xaeB`\x82", ""),
        (b"GIF89a" + b"\x00" * 20, "GIF"),
        (b"hello world, not an image", "not an image"),
    ],
)
def test_sniff_bytes(content, reason):
    got = sniff_bytes(content[:16], content[-4096:], len(content))
    assert (got == "") if reason == "" else (reason in got)


def test_odd_files_skipped_with_warning_or_refused(tiny):
    names = write_odd_files(tiny / "train" / sorted(os.listdir(tiny / "train"))[0])
    with pytest.warns(UserWarning, match="2 undecodable") as record:
        listing = check_dataset(tiny, cache_dir=None)
    message = str(record[0].message)
    for name in names["bad"]:
        assert name in message
    kept = {s.path.rsplit("/", 1)[1] for s in listing.train}
    assert set(names["good"]) <= kept and not set(names["bad"]) & kept
    assert len(listing.train) == 4 + len(names["good"])
    with pytest.raises(DatasetError) as err:
        check_dataset(tiny, on_bad_file="error", cache_dir=None)
    for name in names["bad"]:
        assert name in str(err.value)


def test_check_is_cached_by_listing(tiny, tmp_path):
    """A second start reuses the sniff results while (path, size, mtime) are unchanged."""
    cache = tmp_path / "cache"
    target = next((tiny / "train").glob("*/*.JPEG"))
    check_dataset(tiny, cache_dir=cache)
    assert len(list((cache / "checks").glob("*.json"))) == 1
    # Break the file without changing its size or mtime: the cached verdict (good) stands.
    stat = target.stat()
    target.write_bytes(b"\x00" * stat.st_size)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert check_dataset(tiny, cache_dir=cache).bad == {}
    # A new mtime changes the listing key, so the file is sniffed again and found bad.
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="not an image"):
        listing = check_dataset(tiny, cache_dir=cache)
    assert list(listing.bad) == [str(target.relative_to(tiny))]


def test_manifest_files_are_skipped(tiny, tmp_path):
    """Files named by the full-scan manifest are left out even when they sniff fine."""
    rel = str(next((tiny / "train").glob("*/*.JPEG")).relative_to(tiny))
    write_bad_manifest(tiny / "bad_files.tsv", {rel: "decode failed: test"}, scanned=6)
    assert read_bad_manifest(tiny / "bad_files.tsv") == {rel: "decode failed: test"}
    with pytest.warns(UserWarning, match="decode failed: test"):
        listing = check_dataset(tiny, cache_dir=None)
    assert rel not in {s.path for s in listing.train} and len(listing.train) == 3
    # The class's only val image listed too: the class has no usable val image, refused.
    val_rel = str(next((tiny / "val").glob(f"{rel.split('/')[1]}/*.JPEG")).relative_to(tiny))
    write_bad_manifest(tiny / "bad_files.tsv", {val_rel: "decode failed: test"}, scanned=6)
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="without a usable image"):
        check_dataset(tiny, cache_dir=None)
    (tiny / "bad_files.tsv").unlink()
    with pytest.raises(DatasetError, match="manifest not found"):
        check_dataset(tiny, bad_manifest=tmp_path / "missing.tsv", cache_dir=None)


def test_sniff_accepts_real_rgb_gray_cmyk_jpegs(tmp_path):
    import numpy as np

    img = photo_like(np.random.default_rng(0), 20, 10)
    for mode in ("RGB", "L", "CMYK"):
        path = tmp_path / f"{mode}.JPEG"
        path.write_bytes(jpeg_bytes(img.convert(mode)))
        assert sniff_file(path) == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sniff_file(tmp_path / "missing.JPEG").startswith("unreadable")


def test_jpeg_header_walk(tmp_path):
    """Corrupt or zero-width headers are caught cheaply; progressive and big-ICC JPEGs pass."""
    import io

    import numpy as np

    img = photo_like(np.random.default_rng(0), 64, 48)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", progressive=True, icc_profile=b"\x00" * 70_000)
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    assert sniff_file(tmp_path / "ok.jpg") == ""
    data = bytearray(jpeg_bytes(img))
    sof = data.find(b"\xff\xc0")
    zero_width = bytearray(data)
    zero_width[sof + 7 : sof + 9] = b"\x00\x00"
    (tmp_path / "w0.jpg").write_bytes(bytes(zero_width))
    assert "zero image width" in sniff_file(tmp_path / "w0.jpg")
    smashed = bytearray(data)
    smashed[20:40] = b"\x00" * 20  # inside the first segment's successor: no marker where due
    (tmp_path / "hdr.jpg").write_bytes(bytes(smashed))
    assert "corrupt JPEG header" in sniff_file(tmp_path / "hdr.jpg")


def test_flat_val_folder_points_to_prepare_script(tiny):
    for folder in (tiny / "val").iterdir():
        for f in folder.iterdir():
            f.rename(tiny / "val" / f.name)
        folder.rmdir()
    with pytest.raises(DatasetError, match=r"prepare_imagenet\.py") as err:
        check_dataset(tiny)
    assert str(tiny / "val") in str(err.value)


def test_the_listing_a_node_shares_reads_back_equal_and_only_for_its_start(tiny, tmp_path):
    (tiny / "train" / next(p.name for p in (tiny / "train").iterdir()) / "x.JPEG").write_bytes(b"")
    with pytest.warns(UserWarning, match="empty file"):
        listing = check_dataset(tiny)
    path = tmp_path / "listing.json"
    _write_listing(path, "start-1", listing, None)
    assert _read_listing(path, "start-1") == (listing, None)
    assert _read_listing(path, "start-1")[0].digest() == listing.digest()
    assert _read_listing(path, "start-2") is None  # another start's file: check yourself
    _write_listing(path, "start-3", None, "empty class folders:\n  /data/train/n1")
    assert _read_listing(path, "start-3") == (None, "empty class folders:\n  /data/train/n1")


def test_under_ddp_one_rank_per_node_lists_and_sniffs_the_files(tmp_path):
    # scripts/bench_scan.py at toy size: 2 gloo ranks (torchrun) check a generated tree with
    # check_dataset on every rank (before) and check_dataset_per_node (after); an audit hook on
    # each rank counts the folders it listed and the dataset files it opened.
    bench = Path(__file__).resolve().parents[1] / "scripts" / "bench_scan.py"
    args = ["--files=40", "--classes=4", "--ranks=2", "--rounds=1"]
    proc = subprocess.run(
        [sys.executable, str(bench), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["files"] == 40 and out["same_listing_everywhere"]
    folders = 2 + 2 * 4  # train/ and val/, then each class folder of both
    before, after = out["variants"]["before_cold"], out["variants"]["after_cold"]
    assert [(r["dirs_listed"], r["files_opened"]) for r in before["per_rank"]] == [
        (folders, 40)
    ] * 2
    assert [(r["dirs_listed"], r["files_opened"]) for r in after["per_rank"]] == [
        (folders, 40),
        (0, 0),
    ]
    # Warm cache (every later start): the files are listed (stat'ed), not reopened.
    warm = out["variants"]["after_warm"]["per_rank"]
    assert [(r["dirs_listed"], r["files_opened"]) for r in warm] == [(folders, 0), (0, 0)]
    assert set(out["ratios"]) == {"before_over_after_wall_cold", "before_over_after_wall_warm"}


def test_entries_that_are_not_image_files_are_named_never_opened(tiny):
    """A symlink loop, a broken symlink, a FIFO (opening it would block), a folder named like
    an image: each a bad file naming its path, for the start-up check and the full decode scan
    alike. A class folder that is a symlink loop or points nowhere: one error naming it.
    (Before: the loop raised OSError; the others were dropped without a word.)"""
    cls = sorted(os.listdir(tiny / "train"))[0]
    folder = tiny / "train" / cls
    good = next(folder.iterdir())
    os.symlink(good.name, folder / "link.JPEG")  # a symlink to an image: an image
    os.symlink("loop.JPEG", folder / "loop.JPEG")
    os.symlink(tiny / "gone.JPEG", folder / "dangling.JPEG")
    os.mkfifo(folder / "pipe.JPEG")
    (folder / "folder.JPEG").mkdir()
    reasons = {
        "loop.JPEG": "symlink loop",
        "dangling.JPEG": "broken symlink",
        "pipe.JPEG": "not a regular file (FIFO)",
        "folder.JPEG": "a folder inside a class folder",
    }
    with pytest.warns(UserWarning, match="4 undecodable") as record:
        listing = check_dataset(tiny, cache_dir=None)
    assert len(listing.train) == 5 and f"train/{cls}/link.JPEG" in {s.path for s in listing.train}
    for name, why in reasons.items():
        assert f"{folder / name}: {why}" in str(record[0].message)
    with pytest.raises(DatasetError) as err:
        check_dataset(tiny, on_bad_file="error", cache_dir=None)
    assert all(f"{folder / name}: {why}" in str(err.value) for name, why in reasons.items())
    bad, scanned = full_scan(tiny, workers=1)  # scripts/check_dataset.py: the same verdicts
    assert bad.keys() == listing.bad.keys() and scanned == 6 + 1 + len(reasons)
    for target in ("nowhere", "n00000000"):  # a class folder pointing nowhere; a loop
        os.symlink(target, tiny / "val" / "n00000000")
        with pytest.raises(DatasetError, match=f"class folder {tiny / 'val' / 'n00000000'}: "):
            check_dataset(tiny, cache_dir=None)
        (tiny / "val" / "n00000000").unlink()


def test_garbled_manifest_is_named(tiny):
    (tiny / "bad_files.tsv").write_bytes(b"\xff\xfe\x00 not text\n")
    with pytest.raises(DatasetError, match=f"manifest {tiny / 'bad_files.tsv'} is not readable"):
        check_dataset(tiny, cache_dir=None)
