"""Benchmark the whole main job end to end: train.py vs the plain script vs train.py bare.

Variants of the main job's recipe (ResNet-18, digits, batch 128, the same workers and threads)
run as separate processes, alternating within each round (the order rotates per round, so no
variant always runs first on a shared machine):

  a  train.py as a user runs it: the defaults, logger=none, trainer.epochs=N and a temporary
     hydra.run.dir (checkpoints every epoch, val every epoch).
  b  scripts/plain_train.py: torchvision ImageFolder + PIL, timm resnet18, the same recipe,
     per-epoch val, no checkpoints.
  c  (a) with checkpoints and evaluation off: powergrad.checkpoint.save is replaced by a no-op
     and trainer.eval_every_epochs=10**6 leaves only the last epoch's val.
  d  (a) with loader=dali (DALI's CPU operators here; run it with --variants a,d or a,b,c,d).

--threads / --workers default to `auto`, resolved as train.py resolves them
(powergrad.resources), and (b) gets the same numbers and OMP_WAIT_POLICY=PASSIVE (which
train.py sets for itself), so the plain script runs with the same CPU budget.

(a) and (c) run train.py through a small runner (runpy, the same ``__main__``) that only adds
wall-clock stamps: when each epoch's training starts and when its record is logged, and the time
spent in checkpoint.save (its blocking part: the host copy, and waiting for the previous
background write), evaluate and waiting for the loader. Their per-epoch train images/s
is train.py's own (metrics.jsonl), (b)'s the same quantity (train images / train-loop seconds).
Steady-state values are medians over epochs 2..N (epoch 1 forks the loader workers). Ratios a/b,
a/c and d/a are per round (the two ran back to back), summarized as the geometric mean with a 95%
t-interval over rounds. Peak memory is the summed PSS of the process tree, sampled every 0.25 s
(scripts/bench_train.py --rss's method).

Writes results/bench/bench_job.json and .md (the command, git SHA, load, per-round data).

Usage: python scripts/bench_job.py [--epochs 4] [--rounds 3] [--variants a,b,c]
       [--threads auto] [--workers auto] [--out results/bench] [-- EXTRA train.py overrides]
       python scripts/bench_job.py --main-job --name main_job [-- EXTRA train.py overrides]
           (the README main job once, two runs of 30 epochs, as `train.py -m` runs it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Running as `python scripts/bench_job.py` from the repo root: make `powergrad` importable.
sys.path.insert(0, str(ROOT))

from powergrad import resources  # noqa: E402

DEFAULT_BATCH = 128  # trainer.batch_size's default (configs/trainer/default.yaml)

VARIANTS = {
    "a": "train.py (defaults, logger=none)",
    "b": "plain_train.py (ImageFolder + PIL)",
    "c": "train.py, no checkpoints, no per-epoch eval",
    "d": "train.py loader=dali",
}

# Runs train.py as `python train.py ARGS` would (runpy, __main__), adding wall-clock stamps.
RUNNER = r"""
import json, os, runpy, sys, time
_out = open(os.environ["BENCH_JOB_STAMPS"], "a", buffering=1)
def stamp(ev, **kw):
    _out.write(json.dumps({"ev": ev, "t": time.time(), **kw}) + "\n")
stamp("python_start")
import powergrad.checkpoint, powergrad.engine, powergrad.tracking
from powergrad.data import dali_backend, torch_backend
stamp("imported")
def timed(fn, ev):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            stamp(ev, s=time.perf_counter() - t0)
    return wrapper
_train = powergrad.engine.train_one_epoch
def train_one_epoch(*a, **k):
    stamp("epoch_start")
    return _train(*a, **k)
powergrad.engine.train_one_epoch = train_one_epoch
powergrad.engine.evaluate = timed(powergrad.engine.evaluate, "evaluate")
if os.environ.get("BENCH_JOB_NO_CHECKPOINT"):
    powergrad.checkpoint.save = lambda *a, **k: None
else:
    powergrad.checkpoint.save = timed(powergrad.checkpoint.save, "save")
_log = powergrad.tracking.Tracker.log_epoch
def log_epoch(self, history):
    _log(self, history)
    stamp("epoch_logged")
powergrad.tracking.Tracker.log_epoch = log_epoch
def waited(_epoch):
    def epoch(self, *a, **k):
        it, wait = _epoch(self, *a, **k), 0.0
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                stamp("loader_wait", s=wait)
                return
            wait += time.perf_counter() - t0
            yield batch
    return epoch
for _cls in (torch_backend.TorchTrainLoader, dali_backend.DaliTrainLoader):
    _cls.epoch = waited(_cls.epoch)
sys.argv = [os.path.join(os.getcwd(), "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def git_sha() -> str:
    """HEAD's SHA, with '+dirty' when the working tree differs from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tree_pss_kib(pid: int) -> int:
    """Summed Pss (KiB) of ``pid`` and its descendants (shared pages split among sharers)."""

    def children(p: int) -> list[int]:
        kids: list[int] = []
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
        return kids

    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError):
            pass
        todo += children(p)
    return total


def run_sampled(cmd: list[str], env: dict[str, str], interval_s: float = 0.25) -> dict:
    """Run ``cmd`` in ROOT; returns wall seconds, peak tree PSS (MiB), stdout and start time."""
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killed as a whole when interrupted
    )
    peak = 0
    try:
        # A reader thread would also do; the pipe holds the few KiB the runs print.
        while proc.poll() is None:
            peak = max(peak, tree_pss_kib(proc.pid))
            time.sleep(interval_s)
    finally:
        if proc.poll() is None:  # interrupted: take the run and its loader workers down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "peak_pss_mib": peak / 1024, "stdout": out, "start": start}


def train_cmd(variant: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The train.py overrides of variant a or c (run through RUNNER)."""
    out = [
        "logger=none",
        f"trainer.epochs={args.epochs}",
        f"trainer.threads={args.threads}",
        f"loader.workers={args.workers}",
        f"hydra.run.dir={run_dir}",
    ]
    if args.batch_size != DEFAULT_BATCH:
        out.append(f"trainer.batch_size={args.batch_size}")
    if args.root:
        out.append(f"data.root={args.root}")
    out += args.extra
    if variant == "c":
        out.append("trainer.eval_every_epochs=1000000")
    if variant == "d":
        out.append("loader=dali")
    return out


def steady(values: list[float]) -> float:
    """Median over epochs 2..N (epoch 1 starts the loader workers); epoch 1 when alone."""
    return statistics.median(values[1:] or values)


def run_variant(variant: str, args, tmp: Path, index: int, env: dict | None = None) -> dict:
    """One run of ``variant``; per-epoch train images/s and epoch walls, whole wall, peak PSS.

    env: extra environment variables for the run (e.g. OMP_WAIT_POLICY).
    """
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), **(env or {})}
    if variant == "b":
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py sets it for itself
        threads, workers = resources.resolve(args.threads, args.workers, accelerator=False)
        cmd = [
            sys.executable,
            "scripts/plain_train.py",
            f"--epochs={args.epochs}",
            f"--threads={threads}",
            f"--workers={workers}",
            f"--batch-size={args.batch_size}",
        ]
        if args.root:
            cmd.append(f"--root={args.root}")
        r = run_sampled(cmd, env)
        lines = [json.loads(x) for x in r["stdout"].splitlines() if x.startswith("{")]
        epochs = [x for x in lines if "epoch" in x]
        result = {
            "images_per_s": [x["images_per_s"] for x in epochs],
            "epoch_wall_s": [x["epoch_s"] for x in epochs],
            "val_top1": epochs[-1]["val_top1"],
        }
    else:
        run_dir = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{variant}{index}-"))
        stamps = run_dir.with_suffix(".stamps")
        env["BENCH_JOB_STAMPS"] = str(stamps)
        if variant == "c":
            env["BENCH_JOB_NO_CHECKPOINT"] = "1"
        extra = train_cmd(variant, args, run_dir)
        cmd = [sys.executable, "-c", RUNNER, *extra]
        r = run_sampled(cmd, env)
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        ev = [json.loads(x) for x in stamps.read_text().splitlines()]
        logged = [e["t"] for e in ev if e["ev"] == "epoch_logged"]
        first = next(e["t"] for e in ev if e["ev"] == "epoch_start")
        # Epoch e's wall: from the end of epoch e-1's record (its checkpoint write included)
        # to the end of epoch e's; epoch 1's from the start of its training.
        walls = [b - a for a, b in zip([first, *logged[:-1]], logged, strict=True)]
        result = {
            "images_per_s": [m["images_per_s"] for m in metrics],
            "epoch_wall_s": walls,
            "val_top1": metrics[-1].get("val_top1"),
            "startup_s": first - r["start"],
            # interpreter start + importing torch, torchvision and powergrad's training modules
            "imported_s": next(e["t"] for e in ev if e["ev"] == "imported") - r["start"],
            "save_s": [e["s"] for e in ev if e["ev"] == "save"],
            "evaluate_s": [e["s"] for e in ev if e["ev"] == "evaluate"],
            "loader_wait_s": [e["s"] for e in ev if e["ev"] == "loader_wait"],
            "command": "python train.py " + " ".join(extra),
            "checkpoint_bytes": sum(p.stat().st_size for p in run_dir.glob("*.pt")),
        }
        shutil.rmtree(run_dir)  # 135 MB of checkpoints per run
    result.update(wall_s=r["wall_s"], peak_pss_mib=r["peak_pss_mib"])
    result["train_images_per_s"] = steady(result["images_per_s"])
    result["epoch_s"] = steady(result["epoch_wall_s"])
    return result


def t_quantile(n: int) -> float:
    """Two-sided 95% Student-t quantile with n - 1 degrees of freedom."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1))
    except ImportError:  # scipy comes with scikit-learn (digits); a table for small n otherwise
        return {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36}.get(n, 2.0)


def ratio_ci(num: list[float], den: list[float]) -> dict:
    """Geometric mean of the per-round ratios num/den with a 95% t-interval (log scale)."""
    logs = [math.log(a / b) for a, b in zip(num, den, strict=True)]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return {
            "ratio": math.exp(mean),
            "ci95": [math.nan, math.nan],
            "per_round": [math.exp(mean)],
        }
    half = t_quantile(len(logs)) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {
        "ratio": math.exp(mean),
        "ci95": [math.exp(mean - half), math.exp(mean + half)],
        "per_round": [math.exp(x) for x in logs],
    }


def summarize(runs: dict[str, list[dict]], epochs: int, job_epochs: int = 30) -> dict:
    """Medians per variant over rounds, and the a/b, a/c ratios of the per-round values."""
    out: dict = {"variants": {}, "ratios": {}}
    for v, rs in runs.items():
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in ("train_images_per_s", "epoch_s", "wall_s", "peak_pss_mib")
        }
        med["wall_s_range"] = [min(r["wall_s"] for r in rs), max(r["wall_s"] for r in rs)]
        startup = [r["wall_s"] - sum(r["epoch_wall_s"]) for r in rs]
        med["outside_epochs_s"] = statistics.median(startup)
        # A 30-epoch run: what runs outside the epochs + 30 steady epochs.
        med[f"projected_{job_epochs}_epoch_wall_s"] = med["outside_epochs_s"] + (
            job_epochs * med["epoch_s"]
        )
        for k in ("save_s", "evaluate_s", "loader_wait_s"):
            if rs[0].get(k):
                med[f"{k}_per_epoch"] = statistics.median(steady(r[k]) for r in rs)
        for k in ("startup_s", "imported_s"):
            if k in rs[0]:
                med[k] = statistics.median(r[k] for r in rs)
        out["variants"][v] = med
    for num, den in (("a", "b"), ("a", "c"), ("d", "a")):
        if num in runs and den in runs:
            pair: dict = {}
            for key, higher_better in (
                ("train_images_per_s", True),
                ("epoch_s", False),
                ("wall_s", False),
            ):
                x = [r[key] for r in runs[num]]
                y = [r[key] for r in runs[den]]
                # Speed ratios: > 1 means num is faster (images/s num/den; times den/num).
                pair[key] = ratio_ci(x, y) if higher_better else ratio_ci(y, x)
            out["ratios"][f"{num}/{den}"] = pair
    return out


def table(summary: dict, meta: dict) -> str:
    """The readable table (markdown)."""
    lines = [
        f"# bench_job: {meta['epochs']} epochs x {meta['rounds']} rounds, "
        f"threads={meta['threads']} workers={meta['workers']}",
        "",
        f"`{meta['command']}`  git {meta['git_sha']}  load {meta['loadavg_before']:.2f} -> "
        f"{meta['loadavg_after']:.2f} on {meta['cpus']} CPUs",
        "",
        "| variant | train img/s | epoch wall s | whole wall s | projected 30-ep s | "
        "peak PSS MiB | save s/ep | eval s/ep | loader wait s/ep |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, m in summary["variants"].items():

        def f(k, fmt="{:.2f}", m=m):
            return fmt.format(m[k]) if k in m else "-"

        lines.append(
            f"| {v}: {VARIANTS[v]} | {m['train_images_per_s']:.0f} | {m['epoch_s']:.2f} | "
            f"{m['wall_s']:.1f} | {m['projected_30_epoch_wall_s']:.0f} | "
            f"{m['peak_pss_mib']:.0f} | {f('save_s_per_epoch')} | "
            f"{f('evaluate_s_per_epoch')} | {f('loader_wait_s_per_epoch')} |"
        )
    lines += [
        "",
        "Speed ratios (> 1: the first named is faster), geometric mean over rounds "
        "[95% t-interval]:",
        "",
        "| ratio | train img/s | epoch wall | whole wall |",
        "|---|---|---|---|",
    ]
    for name, pair in summary["ratios"].items():
        cells = [
            f"{pair[k]['ratio']:.3f} [{pair[k]['ci95'][0]:.3f}, {pair[k]['ci95'][1]:.3f}]"
            for k in ("train_images_per_s", "epoch_s", "wall_s")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main_job(args: argparse.Namespace, meta: dict) -> dict:
    """The README's main job once (two runs, 30 epochs): whole wall and peak tree PSS."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="bench_main_job-") as tmp:
        cmd = ["train.py", "-m", "method=baseline,pgt", f"hydra.sweep.dir={tmp}/sweep"]
        cmd += ["trainer.progress=false", *args.extra]
        r = run_sampled([sys.executable, *cmd], env)
        summaries = sorted(Path(tmp).glob("sweep/*/summary.json"))
        runs = [json.loads(x.read_text()) for x in summaries]
    out = {
        # --epochs / --rounds do not apply: the job runs its own 30 epochs once
        "meta": {k: v for k, v in meta.items() if k not in ("epochs", "rounds")}
        | {"loadavg_after": os.getloadavg()[0]},
        "main_job_command": "python " + " ".join(cmd),
        "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY",) if k in os.environ},
        "wall_s": r["wall_s"],
        "peak_pss_mib": r["peak_pss_mib"],
        "runs": [
            {k: x.get(k) for k in ("method", "val_top1", "val_top1_best", "wall_s", "epochs")}
            for x in runs
        ],
    }
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def _auto_or_int(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="a,b,c")
    ap.add_argument("--threads", default="auto", type=_auto_or_int, help="trainer.threads")
    ap.add_argument("--workers", default="auto", type=_auto_or_int, help="loader.workers")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--root", help="dataset folder (default: the digits folder)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"), help="'' to not write")
    ap.add_argument("--name", default="bench_job", help="output file stem")
    ap.add_argument(
        "--main-job",
        action="store_true",
        help="instead: run `train.py -m method=baseline,pgt` (+ extra) once; wall and peak PSS",
    )
    ap.add_argument("extra", nargs="*", help="extra train.py overrides (a and c)")
    args = ap.parse_args(argv)
    # kill / timeout: unwind, so run_sampled's finally takes the running job down with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    variants = args.variants.split(",")
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "MKL_"))]
    meta = {
        "command": " ".join(
            [*env, "python", "scripts/bench_job.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "git_sha": git_sha(),
        "epochs": args.epochs,
        "rounds": args.rounds,
        "threads": args.threads,
        # what auto means here (train.py resolves it the same way)
        "threads_workers_resolved": resources.resolve(
            args.threads, args.workers, accelerator=False
        ),
        "workers": args.workers,
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg()[0],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.main_job:
        return main_job(args, meta)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench_job-") as tmp:
        for r in range(args.rounds):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                res = run_variant(v, args, Path(tmp), r)
                res["round"], res["loadavg"] = r, os.getloadavg()[0]
                runs[v].append(res)
                print(
                    f"round {r} {v}: {res['train_images_per_s']:.0f} img/s, epoch "
                    f"{res['epoch_s']:.2f} s, wall {res['wall_s']:.1f} s, "
                    f"PSS {res['peak_pss_mib']:.0f} MiB, val {res['val_top1']}",
                    flush=True,
                )
    meta["loadavg_after"] = os.getloadavg()[0]
    summary = summarize(runs, args.epochs)
    report = {"meta": meta, "summary": summary, "runs": runs}
    text = table(summary, meta)
    print(text)
    print(json.dumps({"summary": summary}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{args.name}.md").write_text(text)
    return report


if __name__ == "__main__":
    main()
