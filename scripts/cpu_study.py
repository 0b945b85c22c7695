"""CPU-scale study of the paper's claims on the embedded digits dataset (real train.py runs).

Every point runs with ``--seeds`` seeds (default 6), each a real ``train.py`` process on digits
(32x32, 1,437 train / 360 val images) with the dataset's ImageNet-style augmentation
(RandomResizedCrop; no horizontal flip, which turns a digit into another symbol):

(a) ResNet-18 (BN), batch 128, 10 epochs (110 optimizer steps): baseline vs PGT alpha 0.25
    (Table 1 / Fig. 3a-b); and both again with the schedule compressed to 60% of the epochs,
    warmup included (6 epochs, 0.6 warmup epochs): Fig. 3c compares the 60%-length PGT run's
    final val with the full-length baseline's (the compressed baseline is the control).
(b) ResNet-18 without normalization, 20 epochs, at a large and a small batch that keep the
    paper's 4x ratio (its 1024 vs 256): batch 256 (5 steps per epoch, 100 steps, lr 0.1) stands
    for the paper's 1024 and runs the paper's 1024 rows (baseline, PGT 0.92) plus PGT 0.25;
    batch 64 (22 steps per epoch, 440 steps, lr 0.025) stands for its 256 and runs all six of
    its 256 rows (baseline, GC, AGC, PGT, GC + PGT, AGC + PGT; alpha 0.25). Zeroed-out filters
    (Figs. 4-6) from per-filter norms recorded about 25 times per run.
(c) ResNet-18 (BN), final loss and logit norm against alpha (Section 5.3 / Fig. 7); alpha = 1 is
    the baseline of (a), alpha 0.25 the PGT of (a).

Runtime: 16 points x 6 seeds = 96 runs, 42 minutes (2,514 s) on a quiet 2-core machine at 2
runs at a time for the committed study; the rendered README's "Rerunning" gives the time the
study took.

Run directories go to ``outputs/cpu_study/<point>_e<epochs>/seed<k>`` (ignored by git). A
finished run (summary.json or a DIVERGED marker) is reused only when it was trained at the current
commit; an unfinished one, or one from another commit, is deleted and run again, so the script
resumes after an interruption and every run of a study comes from one commit. It refuses to start
on a tree with uncommitted changes (``--allow-dirty`` for trials): the commit must say what ran.
What is committed is what it writes under ``results/cpu/``: ``runs.json`` (per-run summaries,
epoch histories, filter-norm digests, process wall times) and ``provenance.json`` (command, git
SHA, clean or not, package versions, wall time, host); :func:`powergrad.study.render_cpu_study`
then renders the README, with Holm-corrected verdicts, and the plots (``python scripts/report.py
--cpu-only`` re-renders them)::

    python scripts/cpu_study.py --fresh         # the whole study from scratch
    python scripts/cpu_study.py                 # resume an interrupted one
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from powergrad.study import render_cpu_study
from powergrad.tracking import git_sha

ROOT = Path(__file__).resolve().parents[1]
RUNS_ROOT = ROOT / "outputs" / "cpu_study"
OUT = ROOT / "results" / "cpu"

# Paper layers (1-based, forward order, see powergrad.models.conv_layers_paper_order) whose
# per-filter norm trajectories are kept in runs.json for the Figs. 4-6 plots: the stem, a layer
# of each stage, and the paper's layer 11 (layer3.0.conv1, 256 filters).
TRAJECTORY_LAYERS = (1, 6, 11, 16, 20)

# A filter counts as "collapsed" when its norm ends below this fraction of its first recorded
# norm: a looser, scale-free companion to the paper's zeroed-out filters (norm < 1e-6).
COLLAPSE_RATIO = 0.1

# At most this many filters (evenly spaced) of each chosen layer keep their trajectory in
# runs.json: enough to show the spread in a plot, small enough to commit.
TRAJECTORY_FILTERS = 64

# Settings shared by every run (Hydra overrides). One intra-op thread per process and one loader
# worker, because two processes run side by side on a 2-core machine.
COMMON = [
    "data=digits",
    # The paper text's recipe shape (lr 0.1 per 256 images, linear warmup, cosine to 0, stepped
    # every iteration), pinned so that the study does not change with train.yaml's default.
    "recipe=paper_text",
    "logger=none",
    "trainer.progress=false",
    "trainer.threads=1",
    "loader.workers=1",
    # fp32 has no GradScaler to skip a step whose loss overflowed (the paper's fp16 runs did):
    # skip such steps and count them, so a transient overflow does not end the run.
    "trainer.skip_nonfinite_steps=true",
]

# Warmup of a full-length run, epochs (the paper: 5 of 100; here 1 of 10 or 20).
WARMUP_EPOCHS = 1.0

# Fig. 3c: the paper's PGT run takes 60 of the baseline's 100 epochs, its schedule compressed.
FIG3C_FRACTION = 0.6

# Table 2's batches on digits. The paper compares 1024 with 256 (4x) over the same 100 epochs
# (125,000 vs 500,000 steps); 256 and 64 keep the 4x ratio, and 20 epochs give the large batch
# 100 optimizer steps (5 per epoch) and the small one 440 (22 per epoch). The learning rate
# follows the recipe's 0.1 per 256 images: 0.1 and 0.025.
LARGE_BATCH, SMALL_BATCH = 256, 64
PAPER_BATCH = {LARGE_BATCH: 1024, SMALL_BATCH: 256}


@dataclass(frozen=True)
class Point:
    """One configuration of the study; run once per seed."""

    name: str
    part: str
    model: str
    method: str
    alpha: float | None
    batch: int
    epochs: int
    warmup: float = WARMUP_EPOCHS
    filter_every: int = 0  # optimizer steps between per-filter norm snapshots (0: off)
    paper_row: str | None = None  # results/paper.yaml row this point stands for, if any

    def run_dir(self, seed: int, root: Path = RUNS_ROOT) -> Path:
        """Where this point's run for ``seed`` lives; the budget is part of the name, so a
        shorter trial run is never reused by the full study."""
        return root / f"{self.name}_e{self.epochs}" / f"seed{seed}"

    def overrides(self, seed: int) -> list[str]:
        """train.py overrides for this point and seed."""
        out = [
            *COMMON,
            f"model={self.model}",
            f"method={self.method}",
            f"trainer.batch_size={self.batch}",
            f"trainer.epochs={self.epochs}",
            f"trainer.warmup_epochs={self.warmup:g}",
            f"trainer.filter_norms_every_steps={self.filter_every}",
            f"seed={seed}",
            f"experiment_name=cpu_{self.name}",
        ]
        if self.alpha is not None:
            out.append(f"method.alpha={self.alpha}")
        return out


# digits has 1,437 train images of 10 classes; the loader drops the last partial batch.
TRAIN_IMAGES = 1437
NUM_CLASSES = 10


def _filter_every(batch: int, epochs: int, snapshots: int = 25) -> int:
    steps = (TRAIN_IMAGES // batch) * epochs
    return max(1, steps // snapshots)


def study_points(epochs_a: int = 10, epochs_b: int = 20) -> list[Point]:
    """Every point of parts (a), (b) and (c)."""
    short = max(1, round(FIG3C_FRACTION * epochs_a))
    warm = FIG3C_FRACTION * WARMUP_EPOCHS
    points = [
        Point(
            "a_baseline",
            "a",
            "resnet18",
            "baseline",
            None,
            128,
            epochs_a,
            paper_row="t1_resnet18_cosine_baseline",
        ),
        Point(
            "a_pgt_0.25",
            "a",
            "resnet18",
            "pgt",
            0.25,
            128,
            epochs_a,
            paper_row="t1_resnet18_cosine_pgt",
        ),
        Point("a60_baseline", "a60", "resnet18", "baseline", None, 128, short, warm),
        Point("a60_pgt_0.25", "a60", "resnet18", "pgt", 0.25, 128, short, warm),
    ]
    for alpha in (0.05, 0.1, 0.5):
        points.append(Point(f"c_pgt_{alpha:g}", "c", "resnet18", "pgt", alpha, 128, epochs_a))
    rows = {
        # The paper's batch-1024 rows, and PGT at its usual 0.25 (Table 2's caption: PGT
        # improves the baseline "at any batch size"; no paper row at this batch).
        LARGE_BATCH: [
            ("baseline", None, "t2_b1024_baseline"),
            ("pgt", 0.92, "t2_b1024_pgt"),
            ("pgt", 0.25, None),
        ],
        SMALL_BATCH: [
            (m, a, f"t2_b256_{m}")
            for m, a in (
                ("baseline", None),
                ("gc", None),
                ("agc", None),
                ("pgt", 0.25),
                ("gc_pgt", 0.25),
                ("agc_pgt", 0.25),
            )
        ],
    }
    for batch, methods in rows.items():
        every = _filter_every(batch, epochs_b)
        for method, alpha, row in methods:
            name = f"b_b{batch}_{method}" + (f"_{alpha:g}" if alpha is not None else "")
            points.append(
                Point(
                    name,
                    "b",
                    "resnet18_nonorm",
                    method,
                    alpha,
                    batch,
                    epochs_b,
                    filter_every=every,
                    paper_row=row,
                )
            )
    return points


# Written into a run directory whose training stopped on a non-finite loss: a result (the
# configuration diverges), not a failure to retry.
DIVERGED = "DIVERGED"

# Written into a run directory after its train.py process ended: the process's wall and CPU
# seconds (start-up included), which the report sums into the study's runtime.
PROCESS = "study_process.json"


def _finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() or (run_dir / DIVERGED).is_file()


def _trained_at(run_dir: Path) -> str | None:
    """The commit a finished run was trained at: its summary's git_sha, or the first line
    (``git_sha <sha>``) of its DIVERGED marker; None when not recorded."""
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text()).get("git_sha")
    first = (run_dir / DIVERGED).read_text().partition("\n")[0]
    return first.removeprefix("git_sha ") if first.startswith("git_sha ") else None


def run_one(
    point: Point, seed: int, log, root: Path = RUNS_ROOT, sha: str | None = None
) -> tuple[Point, int, float, int]:
    """Run (or reuse) one training run; returns (point, seed, wall seconds, exit code).

    A finished run is reused when it was trained at commit ``sha`` (any commit when None).
    """
    run_dir = point.run_dir(seed, root)
    if _finished(run_dir) and sha in (None, _trained_at(run_dir)):
        return point, seed, 0.0, 0
    if run_dir.exists():
        shutil.rmtree(run_dir)  # interrupted, or trained at another commit: run it again
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "train.py", *point.overrides(seed), f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    log_path = run_dir.parent / f"seed{seed}.log"
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE, text=True
        )
        stderr = proc.stderr.read()
        # os.wait4, not proc.wait: it also gives the CPU seconds of the run (its loader worker
        # included), a measure of its cost that a loaded machine's wall clock is not.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stderr.close()
        out.write(stderr)
    wall = time.perf_counter() - start
    process = {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
    if proc.returncode == 2 and "non-finite" in stderr:  # train.py's NonFiniteError
        run_dir.mkdir(exist_ok=True)  # a run that diverged before its first checkpoint left none
        (run_dir / PROCESS).write_text(json.dumps(process) + "\n")
        (run_dir / DIVERGED).write_text(f"git_sha {sha}\n" + stderr[-2000:])
        log(f"{point.name} seed{seed}: diverged (non-finite loss)")
        return point, seed, wall, 0
    if proc.returncode == 0:
        (run_dir / PROCESS).write_text(json.dumps(process) + "\n")
    log(f"{point.name} seed{seed}: rc={proc.returncode} {wall:.0f} s")
    return point, seed, wall, proc.returncode


def _digest_filter_norms(path: Path) -> dict:
    """Per-layer zeroed/collapsed counts over time, plus full trajectories of chosen layers."""
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not records:
        return {}
    first = {lay["layer"]: lay["norms"] for lay in records[0]["layers"]}
    steps, zeroed, collapsed = [], [], []
    trajectories: dict[int, list[list[float]]] = {k: [] for k in TRAJECTORY_LAYERS}
    kept: dict[int, list[int]] = {}
    for lay in records[0]["layers"]:
        n = len(lay["norms"])
        kept[lay["layer"]] = sorted(
            {i * n // TRAJECTORY_FILTERS for i in range(TRAJECTORY_FILTERS)}
        )
    for rec in records:
        steps.append(rec["step"])
        zeroed.append([lay["zeroed"] for lay in rec["layers"]])
        collapsed.append(
            [
                sum(
                    n < COLLAPSE_RATIO * n0
                    for n, n0 in zip(lay["norms"], first[lay["layer"]], strict=True)
                )
                for lay in rec["layers"]
            ]
        )
        for lay in rec["layers"]:
            if lay["layer"] in trajectories:
                norms = lay["norms"]
                trajectories[lay["layer"]].append([round(norms[i], 4) for i in kept[lay["layer"]]])
    last = records[-1]["layers"]
    return {
        "steps": steps,
        "layer_names": [lay["name"] for lay in last],
        "layer_filters": [len(lay["norms"]) for lay in last],
        "zeroed": zeroed,  # [snapshot][layer]: filters with norm < 1e-6
        "collapsed": collapsed,  # [snapshot][layer]: filters below COLLAPSE_RATIO x first norm
        "min_norm": [round(min(lay["norms"]), 6) for lay in last],
        "trajectories": {str(k): v for k, v in trajectories.items()},
    }


# Epoch-record fields kept in runs.json (for the accuracy-vs-epoch plots).
HISTORY_KEYS = ("epoch", "train_top1", "val_top1", "train_loss", "val_loss", "val_logit_norm")


def collect(points: list[Point], seeds: list[int], root: Path = RUNS_ROOT) -> list[dict]:
    """Summaries, epoch histories and filter-norm digests of every finished run."""
    runs = []
    for point in points:
        for seed in seeds:
            run_dir = point.run_dir(seed, root)
            entry = {"point": point.name, "part": point.part, "seed": seed, "model": point.model}
            entry.update(method=point.method, alpha=point.alpha, batch=point.batch)
            entry.update(epochs=point.epochs, warmup=point.warmup, paper_row=point.paper_row)
            entry["paper_batch"] = PAPER_BATCH.get(point.batch) if point.part == "b" else None
            process = run_dir / PROCESS
            if process.is_file():
                times = json.loads(process.read_text())
                entry.update(process_wall_s=times["wall_s"], process_cpu_s=times["cpu_s"])
            history = []
            if (run_dir / "metrics.jsonl").is_file():
                lines = (run_dir / "metrics.jsonl").read_text().splitlines()
                history = [{k: r.get(k) for k in HISTORY_KEYS} for r in map(json.loads, lines)]
            if (run_dir / DIVERGED).is_file():
                runs.append({**entry, "status": "diverged", "history": history})
                continue
            if not _finished(run_dir):
                log_file = run_dir.parent / f"seed{seed}.log"
                tail = log_file.read_text()[-2000:] if log_file.is_file() else ""
                runs.append({**entry, "status": "failed", "log_tail": tail})
                continue
            summary = json.loads((run_dir / "summary.json").read_text())
            entry.update(
                status="ok",
                summary={
                    k: summary.get(k)
                    for k in (
                        "train_top1",
                        "val_top1",
                        "val_top1_final",
                        "val_top1_best",
                        "best_val_top1",
                        "best_epoch",
                        "train_loss",
                        "val_loss",
                        "logit_norm",
                        "train_logit_norm",
                        "steps",
                        "wall_s",
                        "git_sha",
                    )
                },
                history=history,
            )
            norms = run_dir / "filter_norms.jsonl"
            if norms.is_file():
                digest = _digest_filter_norms(norms)
                if seed != seeds[0]:
                    digest.pop("trajectories", None)  # one seed's trajectories suffice to plot
                entry["filter_norms"] = digest
            runs.append(entry)
    return runs


def _versions() -> dict[str, str]:
    """Versions of what the numbers depend on (recorded in provenance.json)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "numpy", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the study (resuming finished runs), write results/cpu/, render the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=6, help="seeds per point (>= 5 for the study)")
    parser.add_argument("--jobs", type=int, default=2, help="train.py processes at a time")
    parser.add_argument("--epochs-a", type=int, default=10, help="epochs for parts (a) and (c)")
    parser.add_argument("--epochs-b", type=int, default=20, help="epochs for part (b)")
    parser.add_argument("--only", default=None, help="comma-separated point names to run")
    parser.add_argument(
        "--fresh", action="store_true", help="delete earlier run directories and provenance"
    )
    parser.add_argument("--no-report", action="store_true", help="skip rendering README.md")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="run on a tree with uncommitted changes (trials only: the commit no longer says "
        "what ran)",
    )
    parser.add_argument("--runs-root", default=str(RUNS_ROOT), help="where run directories go")
    parser.add_argument("--out", default=str(OUT), help="where runs.json etc. are written")
    args = parser.parse_args(argv)
    runs_root, out = Path(args.runs_root), Path(args.out)
    sha = git_sha(ROOT)
    if sha.endswith("-dirty") and not args.allow_dirty:
        print(
            f"error: the tree has uncommitted changes ({sha}); commit them, or pass "
            "--allow-dirty for a trial whose results no commit reproduces",
            file=sys.stderr,
        )
        return 2

    points = study_points(args.epochs_a, args.epochs_b)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = sorted(wanted - {p.name for p in points})
        if unknown:
            names = ", ".join(p.name for p in points)
            print(f"error: --only: unknown point(s) {', '.join(unknown)}; the points: {names}",
                  file=sys.stderr)  # fmt: skip
            return 2
        points = [p for p in points if p.name in wanted]
    seeds = list(range(args.seeds))
    if args.fresh:
        # Only the run directories: deleting results/cpu (tracked files) would make the tree
        # dirty, and every run would then record a -dirty commit. Its files are overwritten at
        # the end, and a fresh study's provenance starts over (below).
        shutil.rmtree(runs_root, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    start = time.perf_counter()
    # Seed-major order: every point gets seed 0 before any gets seed 1, so a cut-short study
    # still covers every point.
    jobs = [(p, s) for s in seeds for p in points]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(*job, log, runs_root, sha), jobs))
    wall = time.perf_counter() - start
    failed = [f"{p.name}/seed{s}" for p, s, _, rc in results if rc != 0]

    runs = collect(points, seeds, runs_root)
    data = {"num_classes": NUM_CLASSES, "runs": runs}
    (out / "runs.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")
    previous = out / "provenance.json"
    old = json.loads(previous.read_text()) if previous.is_file() and not args.fresh else {}
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    # A resumed study reuses earlier invocations' runs, so every invocation is kept and the
    # study's wall time is their sum.
    invocations = [
        *old.get("invocations", []),
        {
            "command": command,
            "git_sha": sha,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - wall)),
            "wall_s": round(wall, 1),
            "ran": len([r for r in results if r[2] > 0]),
        },
    ]
    provenance = {
        "command": command,
        "git_sha": sha,
        "clean": not sha.endswith("-dirty"),
        "versions": _versions(),
        "wall_s_total": round(sum(i["wall_s"] for i in invocations), 1),
        "invocations": invocations,
        "jobs": args.jobs,
        "seeds": args.seeds,
        "epochs_a": args.epochs_a,
        "epochs_b": args.epochs_b,
        "common_overrides": COMMON,
        "points": [asdict(p) for p in points],
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "failed": failed,
    }
    previous.write_text(json.dumps(provenance, indent=2) + "\n")
    log(f"study done in {wall:.0f} s; failed: {failed or 'none'}")
    if not args.no_report:
        render_cpu_study(out)
        log(f"wrote {out / 'README.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
