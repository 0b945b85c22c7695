"""Benchmark: the start-up dataset check under DDP, every rank (before) vs once per node (after).

Before: every rank runs powergrad.data.layout.check_dataset (lists every folder, stats every
file, and on a first start sniffs every file). After: check_dataset_per_node, where the node's
local rank 0 checks and the node's other ranks read its listing from the cache after a barrier.

Generates a tree of --files tiny JPEGs (one real 8x8 JPEG's bytes copied; ImageNet's layout,
ImageNet-like names) in a temp folder, then starts one torchrun with --ranks gloo ranks on the
CPU, all on this node, which times both variants side by side, alternating their order by round,
each from a cold cache (a first start: no cached sniff results) and a warm one (every later
start). One call's wall time is the longest over the ranks, from a barrier to the listing in
hand (a reader's wait for local rank 0 included). Every rank also counts, with a Python audit
hook, the folders it listed (os.scandir; each listed file costs one stat) and the dataset files
it opened (the sniff). Reported: medians per variant, the totals over ranks, and the
before / after wall-time ratio (geometric mean of the per-round ratios, 95% t-interval).

Usage: python scripts/bench_scan.py [--files 100000] [--classes 100] [--ranks 4] [--rounds 3]
                                    [--root DIR (reuse/keep the generated tree)]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Running as `python scripts/bench_scan.py` from the repo root: make `powergrad` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_job import git_sha, ratio_ci  # scripts/ is on sys.path when run as a script

VARIANTS = ("before", "after")
CACHES = ("cold", "warm")


def tiny_jpeg() -> bytes:
    """One real 8x8 RGB JPEG (passes the start-up sniff: markers, frame header, EOI)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 120, 40)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_tree(root: Path, files: int, classes: int) -> None:
    """ROOT/{train,val}/nXXXXXXXX/*.JPEG: files / classes per class, a tenth of them in val."""
    data, per_class = tiny_jpeg(), max(2, files // classes)
    val = max(1, per_class // 10)
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, count in (("train", per_class - val), ("val", val)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{wnid}_{i}.JPEG").write_bytes(data)


class AuditCounts:
    """Folders listed and dataset files opened by this process (all threads) while on."""

    def __init__(self, root: Path) -> None:
        self.root, self.on, self.lock = str(root), False, threading.Lock()
        self.dirs = self.opened = 0
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.on or event not in ("os.scandir", "open"):
            return
        path = args[0]
        if isinstance(path, str | os.PathLike) and os.fspath(path).startswith(self.root):
            with self.lock:
                if event == "os.scandir":
                    self.dirs += 1
                else:
                    self.opened += 1

    def start(self) -> None:
        self.dirs = self.opened = 0
        self.on = True

    def stop(self) -> dict[str, int]:
        self.on = False
        return {"dirs_listed": self.dirs, "files_opened": self.opened}


def worker(root: Path, cache: Path, rounds: int, out: Path) -> None:
    """One rank under torchrun: time both variants, cold and warm, for ``rounds`` rounds."""
    from powergrad import distributed as pgdist
    from powergrad.data.layout import check_dataset, check_dataset_per_node

    dist = pgdist.setup("cpu")
    counts = AuditCounts(root)
    calls, rows = [], []  # rows: this rank's measurement of each call
    for r in range(rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            for state in CACHES:
                pgdist.barrier()  # every rank is done with the previous call (and its cache)
                if state == "cold" and dist.rank == 0:
                    shutil.rmtree(cache, ignore_errors=True)
                pgdist.barrier()
                counts.start()
                start = time.perf_counter()
                if variant == "before":
                    listing = check_dataset(root, cache_dir=cache)
                else:
                    listing = check_dataset_per_node(
                        root, local_rank=dist.local_rank, cache_dir=cache
                    )
                wall = time.perf_counter() - start
                rows.append({"rank": dist.rank, "wall_s": wall, **counts.stop()})
                rows[-1]["digest"] = listing.digest()
                calls.append({"round": r, "variant": variant, "cache": state})
    per_rank = pgdist.gather_objects(rows)
    if dist.is_main:
        for i, call in enumerate(calls):
            call["ranks"] = [mine[i] for mine in per_rank]
        out.write_text(json.dumps(calls))
    pgdist.cleanup()


def summarize(calls: list[dict]) -> dict:
    """Medians per (variant, cache) over rounds, totals over ranks, before / after ratios."""
    out: dict = {"variants": {}, "ratios": {}}
    walls: dict[tuple[str, str], list[float]] = {}
    for variant in VARIANTS:
        for state in CACHES:
            mine = [c for c in calls if c["variant"] == variant and c["cache"] == state]
            walls[variant, state] = [max(r["wall_s"] for r in c["ranks"]) for c in mine]
            last = mine[-1]["ranks"]
            out["variants"][f"{variant}_{state}"] = {
                "wall_s_median": statistics.median(walls[variant, state]),
                "dirs_listed_total": sum(r["dirs_listed"] for r in last),
                "files_opened_total": sum(r["files_opened"] for r in last),
                "per_rank": [
                    {k: r[k] for k in ("rank", "wall_s", "dirs_listed", "files_opened")}
                    for r in last
                ],
            }
    for state in CACHES:
        out["ratios"][f"before_over_after_wall_{state}"] = ratio_ci(
            walls["before", state], walls["after", state]
        )
    digests = {r["digest"] for c in calls for r in c["ranks"]}
    out["same_listing_everywhere"] = len(digests) == 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, help="tree to reuse (made there if missing)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.root, args.cache, args.rounds, args.out)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_scan_") as tmp:
        root = args.root or Path(tmp) / "tree"
        if not (root / "train").is_dir():
            start = time.perf_counter()
            write_tree(root, args.files, args.classes)
            print(
                f"wrote {args.files} files in {time.perf_counter() - start:.1f} s", file=sys.stderr
            )
        out = Path(tmp) / "calls.json"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        subprocess.run(
            [
                *torchrun,
                f"--nproc_per_node={args.ranks}",
                __file__,
                "--worker",
                f"--root={root.resolve()}",
                f"--cache={Path(tmp) / 'cache'}",
                f"--rounds={args.rounds}",
                f"--out={out}",
            ],
            env={**env, "OMP_NUM_THREADS": "1", "SUBMITIT_EXECUTOR": ""},
            check=True,
        )
        calls = json.loads(out.read_text())
        files = sum(1 for _ in root.glob("*/*/*"))
    summary = {
        "command": " ".join(["python", "scripts/bench_scan.py", *(argv or sys.argv[1:])]),
        "git_sha": git_sha(),
        "files": files,
        "ranks": args.ranks,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        **summarize(calls),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
