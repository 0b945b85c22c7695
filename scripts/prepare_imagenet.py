"""Put the ImageNet-1K validation images into ROOT/val/<wnid>/ and check the dataset layout.

The official validation images come as one flat folder (ILSVRC2012_val_00000001.JPEG ...
ILSVRC2012_val_00050000.JPEG). Their labels come in one of these formats (--labels):

  kaggle   LOC_val_solution.csv from the Kaggle "ImageNet Object Localization Challenge":
           header `ImageId,PredictionString`, rows `ILSVRC2012_val_00008726,n02119789 255 142 ...`
           (the first token of PredictionString is the wnid).
  devkit   ILSVRC2012_validation_ground_truth.txt from ILSVRC2012_devkit_t12: one ILSVRC2012_ID
           (1..1000) per line, line i for ILSVRC2012_val_<i>.JPEG. Needs --meta: the devkit's
           data/meta.mat (read with scipy, which scikit-learn already installs), or a text file of
           `ILSVRC2012_ID wnid` lines. NB: ILSVRC2012_IDs are not in sorted-wnid order, so
           LOC_synset_mapping.txt (sorted wnids) must not be used as this mapping.
  pairs    a text file of `filename wnid` lines.

The format is detected from the file (a csv header `ImageId,...`; one integer per line; two
columns). The train split is the official per-class tars extracted to ROOT/train/<wnid>/, e.g.
  mkdir -p ROOT/train && tar -xf ILSVRC2012_img_train.tar -C ROOT/train &&
  cd ROOT/train && for t in n*.tar; do mkdir ${t%.tar} && tar -xf $t -C ${t%.tar} && rm $t; done

Placing is restartable: a copy is written to a hidden temporary file and renamed into place, a
move is a rename (across filesystems: a copy renamed into place, then the source removed), so a
kill at any moment leaves each image either whole at its place or still at its source. Run the
same command again after a kill: it removes the temporary files, completes the job (a move
finds the images already moved), and replaces any placed file that does not match its source
(size, link target), such as one cut short by an older version of this script.

The check (always run, also alone without --val-dir) counts images and classes and compares
train and val class folders: by default 1,281,167 train and 50,000 val images in 1,000 classes,
the same sorted wnids in both splits (--expect-* to change, --no-count-check to skip counts).
After placing, it also holds every placed image against its source.

Usage:
  python scripts/prepare_imagenet.py --root ROOT --val-dir FLAT_VAL --labels LOC_val_solution.csv
  python scripts/prepare_imagenet.py --root ROOT --val-dir FLAT_VAL \
      --labels ILSVRC2012_validation_ground_truth.txt --meta ILSVRC2012_devkit_t12/data/meta.mat
  python scripts/prepare_imagenet.py --root ROOT          # check only
"""

from __future__ import annotations

import argparse
import csv
import errno
import os
import shutil
import sys
from pathlib import Path

# Running as `python scripts/prepare_imagenet.py` from the repo root: make `powergrad` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powergrad.data.layout import DatasetError, list_split

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VAL_IMAGES = 50_000
IMAGENET_CLASSES = 1_000


def _read_meta(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat or an `ID wnid` text file."""
    if path.suffix == ".mat":
        from scipy.io import loadmat

        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        # meta.mat also lists the 860 non-leaf synsets; ids 1..1000 are the classes.
        return {
            int(s["ILSVRC2012_ID"]): str(s["WNID"])
            for s in synsets
            if 1 <= int(s["ILSVRC2012_ID"]) <= IMAGENET_CLASSES
        }
    mapping = {}
    for line in path.read_text().split("\n"):
        if line.strip():
            ident, wnid = line.split()[:2]
            mapping[int(ident)] = wnid
    return mapping


def read_val_labels(labels: Path, meta: Path | None) -> dict[str, str]:
    """Validation file stem (e.g. ILSVRC2012_val_00000001) -> wnid, from any supported format."""
    text = labels.read_text()
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and lines[0].startswith("ImageId"):
        rows = csv.DictReader(lines)
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    if lines and all(line.strip().isdigit() for line in lines):
        if meta is None:
            raise SystemExit(f"{labels} is a devkit ground-truth file: pass --meta (meta.mat)")
        ids = _read_meta(meta)
        return {f"ILSVRC2012_val_{i:08d}": ids[int(line)] for i, line in enumerate(lines, 1)}
    pairs = {}
    for line in lines:
        name, wnid = line.split()[:2]
        pairs[Path(name).stem] = wnid
    return pairs


# Hidden (the layout check skips dot files), and named so that a rerun knows them as its own.
_TEMP_PREFIX = ".prepare-"
_TEMP_SUFFIX = ".tmp"


def _temp_for(dst: Path) -> Path:
    return dst.with_name(f"{_TEMP_PREFIX}{dst.name}{_TEMP_SUFFIX}")


def _place(src: Path, dst: Path, mode: str) -> None:
    """Put ``src`` at ``dst`` in one rename: ``dst`` is never seen incomplete."""
    if mode == "move":
        try:
            os.replace(src, dst)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
        # Another filesystem: copy into place, then remove the source (a rerun finds the copy).
        _place(src, dst, "copy")
        src.unlink()
        return
    tmp = _temp_for(dst)
    tmp.unlink(missing_ok=True)
    if mode == "copy":
        shutil.copy2(src, tmp)
    elif mode == "hardlink":
        os.link(src, tmp)
    else:
        tmp.symlink_to(src.resolve())
    os.replace(tmp, dst)


def _matches(src: Path, dst: Path, mode: str) -> bool:
    """Whether the placed ``dst`` is ``src`` as ``mode`` puts it (a whole copy by size)."""
    try:
        if mode == "hardlink":
            return os.path.samefile(src, dst)
        if mode == "symlink":
            return dst.is_symlink() and dst.resolve() == src.resolve()
        return dst.stat().st_size == src.stat().st_size
    except OSError:
        return False


def organize_val(val_dir: Path, out: Path, wnids: dict[str, str], mode: str) -> int:
    """Place every labelled image of the flat `val_dir` into out/<wnid>/; returns the count.

    Fails (before touching anything) if an image has no label or a label has no image; an
    image already at its place (a rerun, e.g. after a kill) counts as there.
    """
    images = {p.stem: p for p in sorted(val_dir.iterdir()) if p.is_file()}
    placed = {}
    if out.is_dir():
        for folder in out.iterdir():
            if folder.is_dir():
                for tmp in folder.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
                    tmp.unlink()  # a copy that a kill interrupted
                placed.update({p.stem: p for p in folder.iterdir() if not p.name.startswith(".")})
    unlabelled = sorted(set(images) - set(wnids))
    missing = sorted(set(wnids) - set(images) - set(placed))
    if unlabelled or missing:
        raise SystemExit(
            f"labels and images of {val_dir} disagree: {len(unlabelled)} image(s) without a label "
            f"(e.g. {unlabelled[:3]}), {len(missing)} label(s) without an image (e.g. {missing[:3]})"
        )
    replaced = 0
    for stem, src in images.items():
        folder = out / wnids[stem]
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / src.name
        if dst.exists() or dst.is_symlink():
            if _matches(src, dst, mode):
                if mode == "move":
                    src.unlink()  # a move across filesystems stopped before removing its source
                continue
            replaced += 1
        _place(src, dst, mode)
    if replaced:
        print(f"replaced {replaced} incomplete file(s) in {out}")
    return len(wnids)


def check_placed(val_dir: Path, out: Path, wnids: dict[str, str], mode: str) -> list[str]:
    """Problems of the placed val images: missing, or (with the source still there, as after a
    copy or a link) not matching it."""
    sources = {p.stem: p for p in val_dir.iterdir() if p.is_file()}
    placed = {}
    for wnid in set(wnids.values()):
        if (out / wnid).is_dir():
            placed.update({(wnid, p.stem): p for p in (out / wnid).iterdir()})
    problems = []
    for stem, wnid in sorted(wnids.items()):
        dst, src = placed.get((wnid, stem)), sources.get(stem)
        if dst is None:
            problems.append(f"{out / wnid}: no {stem}.*")
        elif src is not None and not _matches(src, dst, mode):
            problems.append(f"{dst} does not match {src}")
    return problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])


def check_layout(
    root: Path, expect_train: int | None, expect_val: int | None, expect_classes: int | None
) -> list[str]:
    """Problems found in ROOT's layout and counts (empty list: all good); prints the counts."""
    try:
        splits = {split: list_split(root, split) for split in ("train", "val")}
    except DatasetError as e:
        return [str(e)]
    problems = []
    counts = {split: sum(len(f) for f in classes.values()) for split, classes in splits.items()}
    train_cls, val_cls = list(splits["train"]), list(splits["val"])
    print(f"{root}: {counts['train']} train, {counts['val']} val images, {len(train_cls)} classes")
    if train_cls != val_cls:
        problems.append(
            f"class folders differ: only in train {sorted(set(train_cls) - set(val_cls))[:5]}, "
            f"only in val {sorted(set(val_cls) - set(train_cls))[:5]}"
        )
    empty = [f"{root / s / c}" for s, cl in splits.items() for c, f in cl.items() if not f]
    if empty:
        problems.append(f"empty class folders: {empty[:5]}")
    for what, got, want in (
        ("train images", counts["train"], expect_train),
        ("val images", counts["val"], expect_val),
        ("classes", len(train_cls), expect_classes),
    ):
        if want is not None and got != want:
            problems.append(f"expected {want} {what}, found {got}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0: layout checked and fine)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root", type=Path, required=True, help="dataset root (ROOT/train, ROOT/val)"
    )
    parser.add_argument("--val-dir", type=Path, help="flat folder of the official val images")
    parser.add_argument("--labels", type=Path, help="val labels: kaggle csv, devkit txt or pairs")
    parser.add_argument("--meta", type=Path, help="devkit meta.mat or `ILSVRC2012_ID wnid` text")
    parser.add_argument(
        "--mode",
        choices=("copy", "hardlink", "symlink", "move"),
        default="copy",
        help="how val images get into ROOT/val/<wnid>/ (default copy)",
    )
    parser.add_argument("--expect-train", type=int, default=IMAGENET_TRAIN_IMAGES)
    parser.add_argument("--expect-val", type=int, default=IMAGENET_VAL_IMAGES)
    parser.add_argument("--expect-classes", type=int, default=IMAGENET_CLASSES)
    parser.add_argument("--no-count-check", action="store_true", help="check layout, not counts")
    args = parser.parse_args(argv)

    placed_problems = []
    if args.val_dir is not None:
        if args.labels is None:
            parser.error("--val-dir needs --labels")
        wnids = read_val_labels(args.labels, args.meta)
        placed = organize_val(args.val_dir, args.root / "val", wnids, args.mode)
        print(f"placed {placed} val images into {args.root / 'val'} ({args.mode})")
        placed_problems = check_placed(args.val_dir, args.root / "val", wnids, args.mode)
    counts = (
        (None, None, None)
        if args.no_count_check
        else (
            args.expect_train,
            args.expect_val,
            args.expect_classes,
        )
    )
    problems = placed_problems + check_layout(args.root, *counts)
    for problem in problems:
        print(f"ERROR: {problem}", file=sys.stderr)
    if not problems:
        print("layout OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
