"""scripts/prepare_imagenet.py killed (a real SIGKILL) while it places the val images, then run
again: the rerun completes the job, every image is whole, and "layout OK" is only printed when
it is true."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import kill_when
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_imagenet.py"
WNIDS = ("n01440764", "n01443537")


def _prepare_module():
    spec = importlib.util.spec_from_file_location("prepare_imagenet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _imagenet(tmp_path: Path, images: int, size: int) -> tuple[Path, Path, Path, bytes]:
    """ROOT/train (2 classes), a flat official-style val folder of ``images`` copies of one
    real JPEG of ``size`` x ``size`` noise (about 1 MB at 900), and a `filename wnid` file."""
    root, flat = tmp_path / "imagenet", tmp_path / "ILSVRC2012_img_val"
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue()
    for wnid in WNIDS:
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_1.JPEG").write_bytes(jpeg)
    flat.mkdir()
    lines = []
    for i in range(1, images + 1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (flat / name).write_bytes(jpeg)
        lines.append(f"{name} {WNIDS[i % 2]}\n")
    labels = tmp_path / "val_labels.txt"
    labels.write_text("".join(lines))
    return root, flat, labels, jpeg


def _argv(root, flat, labels, mode):
    return [
        "--root",
        str(root),
        "--val-dir",
        str(flat),
        "--labels",
        str(labels),
        "--mode",
        mode,
        "--no-count-check",
    ]


def _start(argv):
    return subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.DEVNULL)


def _placed(root: Path) -> list[Path]:
    return sorted((root / "val").glob("*/*"))


def test_a_copy_killed_midway_is_completed_whole_by_the_rerun(tmp_path, capsys):
    root, flat, labels, jpeg = _imagenet(tmp_path, images=40, size=900)
    argv = _argv(root, flat, labels, "copy")

    def copy_in_flight():  # a file under val/ (a temporary one included) shorter than its source
        return any(p.stat().st_size < len(jpeg) for p in (root / "val").glob("*/*") if p.exists())

    kill_when(_start(argv), lambda: (root / "val").exists() and copy_in_flight())
    prepare = _prepare_module()
    assert prepare.main(argv) == 0 and "layout OK" in capsys.readouterr().out
    placed = _placed(root)
    assert len(placed) == 40 and all(p.read_bytes() == jpeg for p in placed)
    assert len(list(flat.iterdir())) == 40  # a copy leaves the source alone

    # A file cut short by an earlier version of the script (no temporary file) is found too.
    placed[3].write_bytes(jpeg[:1000])
    assert prepare.main(argv) == 0
    assert placed[3].read_bytes() == jpeg
    assert f"replaced 1 incomplete file(s) in {root / 'val'}" in capsys.readouterr().out


def test_a_move_killed_midway_is_completed_by_the_rerun(tmp_path, capsys):
    root, flat, labels, jpeg = _imagenet(tmp_path, images=3000, size=16)
    argv = _argv(root, flat, labels, "move")
    kill_when(_start(argv), lambda: 0 < len(list((root / "val").glob("*/*"))) < 3000)
    assert 0 < len(list(flat.iterdir())) < 3000
    prepare = _prepare_module()
    for _ in range(2):  # the rerun completes the move; one more run finds it done
        assert prepare.main(argv) == 0 and "layout OK" in capsys.readouterr().out
        placed = _placed(root)
        assert len(placed) == 3000 and all(p.read_bytes() == jpeg for p in placed)
        assert not list(flat.iterdir())
