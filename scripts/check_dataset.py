"""Full scan of a dataset: decode every image once and write a manifest of the bad ones.

Complements the cheap check that runs at every start (size, magic bytes, end marker): this one
decodes each file with the torch backend's decoder (torchvision.io, PIL fallback) and flags what
fails or is not a 3-channel image of positive size. The manifest (default ROOT/bad_files.tsv,
lines `relative/path<TAB>reason`) is read by both backends, which then skip those files, so DALI's
reader never sees them. Also runs the layout check (missing split, empty class, class mismatch).
Run it once per dataset copy: DALI decodes a JPEG with corrupt image data to garbage pixels
without an error, so only this scan keeps such files out of a DALI run. A run's
RUN_DIR/bad_files.log (files that failed during training) has the same format: appending it to
the manifest leaves those files out at the next start.

Usage: python scripts/check_dataset.py ROOT [--workers 8] [--out ROOT/bad_files.tsv]
Exit status: 0 when no bad files were found, 1 otherwise (the manifest is written either way),
2 for a layout error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Running as `python scripts/check_dataset.py` from the repo root: make `powergrad` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from powergrad.data.layout import (
    BAD_MANIFEST_NAME,
    DatasetError,
    format_bad,
    write_bad_manifest,
)
from powergrad.data.scan import full_scan


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="dataset root with train/ and val/")
    parser.add_argument("--workers", type=int, default=8, help="decode processes")
    parser.add_argument(
        "--out", type=Path, help=f"manifest path (default ROOT/{BAD_MANIFEST_NAME})"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        bad, scanned = full_scan(args.root, args.workers)
    except DatasetError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    out = args.out or args.root / BAD_MANIFEST_NAME
    write_bad_manifest(out, bad, scanned)
    seconds = time.perf_counter() - start
    print(f"scanned {scanned} files in {seconds:.1f} s: {len(bad)} bad; manifest: {out}")
    if bad:
        print(format_bad(bad, str(args.root), limit=50))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
