"""The prepared GPU check: step throughput, step overheads, host syncs, compile, memory, a short
train.py run and the torch loader on one GPU, written to results/gpu/<date>-<gpu>.json as it goes.

How a session that is lent a GPU runs it (one H200, 15 minutes of device time in all, the
machine's start included; the check stops starting measures after --budget-s = 400 s, so it
ends within 7 minutes and leaves time to rerun a part):

1. Here, with a package registry, in the checkout the device tool sends:
       bash scripts/gpu_check.sh --prepare
   fills the git-ignored .whl/ with the pure-Python wheels the GPU image lacks (hydra-core,
   omegaconf, antlr4-python3-runtime built from its sdist, and timm for version parity, all at
   constraints.txt's versions), records the commit in .whl/SOURCE.json (the device gets no .git)
   and checks that the tree plus .whl/ stay under the 64 MiB that travel.
2. Here, the same command as a dry run:
       bash scripts/gpu_check.sh --device cpu --tiny --out-dir /tmp/gpu-dry
3. The device tool's run call, exactly:
       command:   set -o pipefail; bash scripts/gpu_check.sh --out-dir $OUT 2>&1 | tee $OUT/gpu_check.log
       carry:     [".whl"]
       timeout_s: 480
   gpu_check.sh installs the wheels offline (pip --no-index --target) and runs this script.
4. Here: copy the returned <date>-<gpu>.json into results/gpu/ (as written, never edited), run
   ``python scripts/gpu_check.py --render`` (fills results/gpu/README.md's table from every JSON
   there) and commit both. To rerun a part at once, while the machine is warm, e.g. compile
   with a longer cap: ``bash scripts/gpu_check.sh --out-dir $OUT --only compile --cap
   compile=240`` (its own JSON file, its own column in the table).

Measures (scripts/gpu_measures.py), in this order. Each runs in a child process with its own
cap (seconds, CAPS); the
parent writes the JSON after every event, so a measure killed by its cap (or the whole command
killed) leaves the earlier results on disk, and the next measures go on in a fresh child:

  environment       versions (Python, torch, CUDA, cuDNN, timm, Hydra), the GPU, the commit
  r50_bf16_eager    ResNet-50, bf16 autocast, channels_last, batch 256, eager: images/s of the
                    minimal loop and of the trainer's step with CE and with PGT, interleaved,
                    with paired ratios and peak memory (scripts/bench_train.py's bench_model)
  r50_fp16_eager    the same at fp16 (GradScaler)
  no_host_sync      host syncs in 6 trainer steps at bf16, no log step among them: CUDA's sync
                    debug mode (warnings counted) and the profiler's synchronizing runtime calls,
                    beside an empty region and a one-.item() control that must be seen
  compile           the trainer's step under torch.compile (inductor), bf16: images/s, the
                    first (compiling) chunk's seconds, graph breaks
  batch1024_memory  the trainer's step at batch 1024 (the paper's global batch on one GPU), bf16:
                    peak memory, images/s
  train_py          python train.py on synthetic data, 4 epochs, logger=none: epoch records, GPU
                    memory and host RSS per epoch (sampled), which modules it imported
  torch_loader      loader=torch on generated 500x375 JPEGs (256 files, hard-linked 48 times):
                    images/s with loader.workers=auto; loader=dali is skipped (no DALI there)

``--device cpu --tiny --out-dir DIR`` runs every measure's code at toy sizes (ResNet-18, 32 px,
batch 4, 2 steps; fp16 runs at fp32, fp16 needing CUDA; compile with dynamo's eager backend, as
inductor takes minutes on a CPU) to check the script anywhere; tests/test_gpu_check.py does that
with only the GPU image's packages plus the carried ones importable.

Goals (issue 21): trainer step / minimal loop >= 0.97; PGT / CE >= 0.99; zero host syncs between
log steps at bf16; ResNet-50 bf16 channels_last >= 3,000 images/s eager on one H200.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# Standard library only at import: the parent process never imports torch (no CUDA context).
from gpu_measures import DALI_SKIPPED, MEASURES, PROTOCOL, SOURCE_FILE, WHEELS  # noqa: E402

from powergrad.fileio import atomic_write  # noqa: E402

SCHEMA = "powergrad-gpu-check/1"
RESULTS = ROOT / "results" / "gpu"
README = RESULTS / "README.md"

# Cap per measure, seconds of wall time on one H200, in the order they run. Expected there
# (estimates: nothing has run on a GPU yet): environment ~10 (imports), each eager measure ~35
# (195 steps of ~85 ms, three model builds, cuDNN autotuning), no_host_sync ~10, compile 60-120
# (inductor on 16 cores), batch1024_memory ~15, train_py ~30, torch_loader ~15: ~4 minutes.
CAPS: dict[str, float] = {
    "environment": 60,
    "r50_bf16_eager": 90,
    "r50_fp16_eager": 90,
    "no_host_sync": 60,
    "compile": 150,
    "batch1024_memory": 60,
    "train_py": 90,
    "torch_loader": 60,
}
assert list(CAPS) == list(MEASURES)
# No measure starts after this many seconds, and a running one is stopped there: the check
# ends within 7 minutes (420 s) on the GPU, whatever the caps add up to.
BUDGET_S = 400
MIN_START_S = 5  # a measure with less budget left than this is skipped, not started

# Pure-Python wheels carried to the GPU image (gpu_check.sh --prepare), at constraints.txt's
# versions: Hydra and its dependencies are not on the image; timm is, at an unknown version.
CARRIED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "timm")
SDIST_ONLY = ("antlr4-python3-runtime",)  # 4.9.3 is published as a source archive only
TRAVEL_LIMIT_BYTES = 64 * 2**20  # the working tree plus carried paths that go to the device

# The Python packages of the lent GPU image ('cuda', one H200; Python 3.12, torch 2.11,
# torchvision 0.26) by pip name, as last read there on 2026-11-17. No wandb, Hydra, OmegaConf,
# submitit or DALI among them. (A word list: one quoted string per name would take 190 lines.)
IMAGE_PACKAGES = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
    onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
    packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
    sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split()  # noqa: SIM905
)

# --------------------------------------------------------------------------------------------
# The parent: children, caps, the JSON file


def query_gpu() -> dict[str, Any] | None:
    """Name, driver and memory of GPU 0 from nvidia-smi (no CUDA context); None without one."""
    query = "--query-gpu=name,driver_version,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    name, driver, memory = (x.strip() for x in out.splitlines()[0].split(","))
    return {"name": name, "driver": driver, "memory_mib": float(memory)}


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200' (the file name's GPU part)."""
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def result_path(out_dir: Path, date: str, slug: str) -> Path:
    """out_dir/<date>-<slug>.json, or -2, -3 ... when taken: a check never overwrites another."""
    path, n = out_dir / f"{date}-{slug}.json", 2
    while path.exists():
        path, n = out_dir / f"{date}-{slug}-{n}.json", n + 1
    return path


class Child:
    """One child process running measures; its stdout protocol lines arrive on a queue, its
    stderr passes through (the last lines are kept for the record)."""

    def __init__(self, names: list[str], args: argparse.Namespace) -> None:
        cmd = [sys.executable, str(ROOT / "scripts" / "gpu_measures.py"), ",".join(names)]
        cmd += ["--device", args.device] + (["--tiny"] if args.tiny else [])
        # Its own process group: a kill takes its train.py run and loader workers with it.
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[dict | None] = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=40)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                self.lines.put(json.loads(line[len(PROTOCOL) :]))
            else:
                print(line, end="", flush=True)
        self.lines.put(None)  # end of output: the child exited

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail.append(line)
            print(line, end="", file=sys.stderr, flush=True)

    def next(self, timeout: float) -> dict | None:
        """The next protocol line; None at the child's exit; raises queue.Empty on timeout."""
        return self.lines.get(timeout=max(timeout, 0.0))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self) -> str:
        return "".join(self.stderr_tail)[-3000:]


def run_check(args: argparse.Namespace) -> int:
    """Run the measures in children, writing the JSON after every event; 0 when all ran."""
    started = time.time()
    t_start = time.perf_counter()
    gpu = query_gpu() if args.device == "cuda" else None
    if args.device == "cuda" and gpu is None:
        print("error: no GPU (nvidia-smi failed); use --device cpu --tiny for a dry run")
        return 2
    date = datetime.datetime.fromtimestamp(started, datetime.UTC).strftime("%Y-%m-%d")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(args.out_dir, date, gpu_slug(gpu["name"]) if gpu else "cpu")
    caps = {**CAPS, **args.cap}
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "command": " ".join(["python", "scripts/gpu_check.py", *args.argv]),
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "device": args.device,
        "tiny": args.tiny,
        "gpu": gpu,
        "budget_s": args.budget_s,
        "measures": {},
        "finished": False,
    }

    def save() -> None:
        record["wall_s"] = time.perf_counter() - t_start
        atomic_write(path, json.dumps(record, indent=1, default=str) + "\n")

    def mark(name: str, status: str, **fields: Any) -> None:
        record["measures"][name] = {"status": status, "cap_s": caps[name], **fields}
        save()

    print(f"gpu_check: writing {path}", flush=True)
    pending = list(args.only or CAPS)
    proc: Child | None = None

    def stop(signum: int, frame: Any) -> None:
        """Killed from outside (a time limit): the measure in flight goes with it, the JSON
        keeps what finished."""
        if proc is not None:
            proc.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    while pending:
        if t_start + args.budget_s - time.perf_counter() < MIN_START_S:
            break
        proc = Child(pending, args)
        while pending:
            name = pending[0]
            try:
                msg = proc.next(timeout=30)  # the start line comes at once
            except queue.Empty:
                msg = None
            if msg is None or msg.get("kind") != "start":
                proc.kill()
                mark(name, "crashed", error=f"exit {proc.proc.returncode}", stderr=proc.tail())
                pending.pop(0)
                break
            left = t_start + args.budget_s - time.perf_counter()
            if left < MIN_START_S:
                proc.kill()
                break
            cap = min(caps[name], left)
            t0 = time.perf_counter()
            mark(name, "running")
            try:
                msg = proc.next(timeout=cap)
            except queue.Empty:
                proc.kill()
                why = "its cap" if cap == caps[name] else "the check's budget"
                mark(
                    name,
                    "timeout",
                    wall_s=time.perf_counter() - t0,
                    error=f"stopped by {why}",
                    stderr=proc.tail(),  # what it was doing
                )
                pending.pop(0)
                break
            if msg is None:  # died without a result (a crash, the OOM killer)
                proc.kill()
                mark(
                    name,
                    "crashed",
                    wall_s=time.perf_counter() - t0,
                    error=f"exit {proc.proc.returncode}",
                    stderr=proc.tail(),
                )
                pending.pop(0)
                break
            fields = {k: msg[k] for k in ("wall_s", "result", "error") if msg.get(k) is not None}
            mark(name, msg["status"], **fields)
            pending.pop(0)
        else:
            proc.proc.wait()
    for name in pending:
        mark(name, "skipped", error="the check's budget was spent")
    record["finished"] = True
    save()
    print(render_table([(path.stem, record)]))
    print(f"gpu_check: wrote {path}", flush=True)
    return 0 if all(m["status"] == "ok" for m in record["measures"].values()) else 1


# --------------------------------------------------------------------------------------------
# The table (results/gpu/README.md), from the JSON files only


TABLE_START = "<!-- gpu-table: generated by scripts/gpu_check.py --render, do not edit by hand -->"
TABLE_END = "<!-- /gpu-table -->"
NOT_RUN = "not run"


def _num(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _ips(variant: str) -> Callable[[dict], float]:
    return lambda r: r["images_per_s"][variant]


def _ratio(key: str) -> Callable[[dict], dict]:
    return lambda r: r[key]


def _show(value: Any) -> str:
    """A cell's text: images/s with thousands separators, paired ratios with their interval."""
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']:.3f} [{value['ci95_lo']:.3f}, {value['ci95_hi']:.3f}]"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _peak(r: dict) -> str:
    if r["peak_gpu_mem_gib"] is None:
        return "n/a (CPU)"
    total = f" of {r['gpu_memory_gib']:.0f}" if "gpu_memory_gib" in r else ""
    return f"{r['peak_gpu_mem_gib']['ours_ce']:.1f}{total}"


def _syncs(r: dict) -> str:
    if r["host_syncs"] is None:
        return "n/a (CPU)"
    steps, control = r["trainer_steps"], "seen" if r["control_seen"] else "NOT seen"
    return (
        f"{r['host_syncs']} in {r['steps']} steps (sync-debug warnings "
        f"{steps['sync_debug_warnings']}; profiler sync calls {steps['profiler_sync_total']}, "
        f"empty region {r['empty_region']['profiler_sync_total']}); one-.item() control {control}"
    )


def _compile_vs_eager(record: dict) -> str:
    compiled = record["measures"]["compile"]["result"]["images_per_s"]["ours_ce"]
    eager = record["measures"]["r50_bf16_eager"]["result"]["images_per_s"]["ours_ce"]
    return f"{compiled / eager:.3f}"


def _per_epoch(values: list[float | None]) -> str:
    return ", ".join("-" if v is None else _num(v) for v in values)


def _memory_flat(r: dict) -> bool | None:
    """GPU memory after the first epoch (cuDNN autotuning, the first evaluation) stays within
    64 MiB (allocator granularity) or 2 %; None without GPU samples."""
    spread = r["gpu_memory_spread_after_epoch1_mib"]
    if spread is None:
        return None
    top = max(v for v in r["gpu_memory_mib_per_epoch"] if v is not None)
    return spread <= max(64.0, 0.02 * top)


def _imports(r: dict) -> str:
    found = {k: v for k, v in r["imported_by"].items() if v}
    return ", ".join(f"{k} (by {v})" for k, v in found.items()) or "none of wandb, DALI, submitit"


def _loader(r: dict) -> str:
    return (
        f"{_num(r['images_per_s_after_first_batch'])} ({_num(r['images_per_s'])} over the whole "
        f"epoch), {r['workers']} workers, {r['cpu_count']} CPUs"
    )


@dataclass(frozen=True)
class Row:
    """One line of the table: a measure's value, its goal, the anchors, likely causes."""

    label: str
    measure: str | None  # the value is read from this measure's result (None: the whole record)
    value: Callable[[dict], Any]
    goal: str = ""
    meets: Callable[[Any], bool | None] | None = None  # judged on GPU runs only
    anchor: str = ""
    gap: str = ""


ANCHOR = "A100, AMP + DALI (NVIDIA's RN50): 2,470; H100 (MLPerf): ~7,050"
GAP_SPEED = (
    "MLPerf fuses BN+ReLU, runs CUDA graphs and tuned NHWC kernels; NVIDIA's A100 figure "
    "includes its DALI loader, ours has synthetic data (no loader)"
)
ROWS = (
    Row("commit", "environment", lambda r: f"{r['commit']['sha'][:12]} ({r['commit']['from']})"),
    Row(
        "GPU / driver",
        None,
        lambda rec: "{name} / {driver}".format(**rec["gpu"]) if rec["gpu"] else "none (CPU)",
    ),
    Row(
        "torch / CUDA / cuDNN",
        "environment",
        lambda r: f"{r['torch']} / {r['torch_cuda']} / {r['cudnn']}",
    ),
    Row(
        "model, image size, batch (eager measures)",
        "r50_bf16_eager",
        lambda r: f"{r['model']}, {r['image_size']} px, {r['batch']}",
        "resnet50, 224 px, 256",
    ),
    Row(
        "bf16, channels_last, eager: trainer step, CE (images/s)",
        "r50_bf16_eager",
        _ips("ours_ce"),
        ">= 3,000",
        lambda v: v >= 3000,
        ANCHOR,
        GAP_SPEED,
    ),
    Row("bf16: minimal loop (images/s)", "r50_bf16_eager", _ips("minimal"), anchor=ANCHOR),
    Row("bf16: trainer step, PGT (images/s)", "r50_bf16_eager", _ips("ours_pgt")),
    Row(
        "bf16: trainer / minimal (paired median [95%])",
        "r50_bf16_eager",
        _ratio("ratio_ours_ce_vs_minimal"),
        ">= 0.97",
        lambda v: v["median"] >= 0.97,
        gap="per step: meter, lr schedule, clipper; the trainer's SGD is fused (faster) at bf16",
    ),
    Row(
        "bf16: PGT / CE (paired median [95%])",
        "r50_bf16_eager",
        _ratio("ratio_ours_pgt_vs_ours_ce"),
        ">= 0.99",
        lambda v: v["median"] >= 0.99,
        gap="PGT's backward: one more softmax over the batch x 1000 logits",
    ),
    Row("bf16: peak memory of the trainer (GiB)", "r50_bf16_eager", _peak),
    Row(
        "fp16, channels_last, eager: trainer step, CE (images/s)",
        "r50_fp16_eager",
        _ips("ours_ce"),
        anchor=ANCHOR,
        gap=GAP_SPEED,
    ),
    Row("fp16: minimal loop (images/s)", "r50_fp16_eager", _ips("minimal")),
    Row(
        "fp16: trainer / minimal",
        "r50_fp16_eager",
        _ratio("ratio_ours_ce_vs_minimal"),
        ">= 0.97",
        lambda v: v["median"] >= 0.97,
        gap="GradScaler: unscale + inf check each step; unfused SGD (fused mishandles skips)",
    ),
    Row(
        "fp16: PGT / CE",
        "r50_fp16_eager",
        _ratio("ratio_ours_pgt_vs_ours_ce"),
        ">= 0.99",
        lambda v: v["median"] >= 0.99,
    ),
    Row(
        "host syncs between log steps, bf16",
        "no_host_sync",
        _syncs,
        "0",
        lambda v: v.startswith("0 ") and v.endswith("control seen"),  # a zero that can fail
        gap="a .item(), a blocking copy or a stream sync in the step stalls the CPU's kernel queue",
    ),
    Row(
        "torch.compile, bf16: trainer step (images/s)",
        "compile",
        _ips("ours_ce"),
        "> eager",
        anchor=ANCHOR,
        gap="graph breaks (the JSON lists them), the optimizer step left uncompiled",
    ),
    Row("compile / eager, bf16 (unpaired)", None, _compile_vs_eager, "> 1", lambda v: float(v) > 1),
    Row("compile: first chunk (s)", "compile", lambda r: r["first_chunk_s"]["ours_ce"]),
    Row(
        "batch 1024, bf16: peak memory of the trainer (GiB)",
        "batch1024_memory",
        _peak,
        anchor="paper: 4 x V100 32 GB, 256 per GPU",
    ),
    Row("batch 1024, bf16: trainer step (images/s)", "batch1024_memory", _ips("ours_ce")),
    Row(
        "train.py, synthetic, bf16: images/s per epoch",
        "train_py",
        lambda r: _per_epoch([e["images_per_s"] for e in r["epochs"]]),
    ),
    Row(
        "train.py: GPU memory per epoch (MiB)",
        "train_py",
        lambda r: _per_epoch(r["gpu_memory_mib_per_epoch"]),
    ),
    Row(
        "train.py: memory flat after epoch 1",
        "train_py",
        lambda r: {True: "yes", False: "no", None: "n/a (no GPU)"}[_memory_flat(r)],
        "yes",
        lambda v: v == "yes",
        gap="growth: tensors kept across steps (a leak) or allocator fragmentation",
    ),
    Row("train.py, logger=none: imported", "train_py", _imports, "none"),
    Row(
        "loader=torch, 500x375 JPEGs -> 224 (images/s)",
        "torch_loader",
        _loader,
        ">= the step's images/s",
        anchor="NVIDIA and MLPerf decode on the GPU (DALI, nvJPEG)",
        gap="JPEG decode + resize on the CPU scale with cores; below the step, the GPU waits",
    ),
    Row("loader=dali (mixed, nvJPEG)", None, lambda rec: DALI_SKIPPED),
    Row("check wall time (s)", None, lambda rec: rec["wall_s"]),
)


def _cell(row: Row, record: dict | None) -> str:
    """One result file's cell: the value (with its verdict on a GPU run) or why there is none."""
    if record is None:
        return NOT_RUN
    m = record["measures"].get(row.measure) if row.measure else {"status": "ok"}
    if m is None:
        return NOT_RUN
    if m["status"] == "timeout":
        return f"timeout (cap {m['cap_s']:.0f} s)"
    if m["status"] != "ok":
        return m["status"]
    try:
        value = row.value(m["result"] if row.measure else record)
    except (KeyError, TypeError, ValueError):  # a measure it reads did not run or had no value
        return NOT_RUN if row.measure is None else "n/a (see the JSON)"
    text = _show(value)
    verdict = row.meets(value) if row.meets and not record["tiny"] else None
    return text + {True: " (meets goal)", False: " (misses goal)", None: ""}[verdict]


def render_table(files: list[tuple[str, dict]]) -> str:
    """The markdown table: one column per result file (or one "not run" column)."""
    columns = files or [("result", None)]
    head = ["measure", "goal", "anchor"]
    head += [f"{n} (dry run, CPU)" if r and r["tiny"] else n for n, r in columns]
    head.append("what would explain a gap")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        cells = [row.label, row.goal, row.anchor, *(_cell(row, r) for _, r in columns), row.gap]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def render(results: Path, readme: Path, check: bool) -> int:
    """Fill (or with ``check``, compare) the README's table from results/*.json."""
    files = [(p.stem, json.loads(p.read_text())) for p in sorted(results.glob("*.json"))]
    files = [(n, r) for n, r in files if r.get("schema") == SCHEMA]
    text = readme.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        print(f"error: {readme}: no {TABLE_START} ... {TABLE_END} block")
        return 2
    listing = ", ".join(f"`{n}.json`" for n, _ in files) or "none yet"
    block = f"Result files: {listing}.\n\n{render_table(files)}\n"
    new = text[: start + len(TABLE_START)] + "\n" + block + text[end:]
    if check:
        if new != text:
            print(f"error: {readme} is out of date: run python scripts/gpu_check.py --render")
            return 1
        return 0
    if new != text:
        readme.write_text(new)
    print(f"rendered {len(files)} result file(s) into {readme}")
    return 0


# --------------------------------------------------------------------------------------------
# What travels to the device


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> dict[str, str]:
    """constraints.txt's exact versions, by normalized name."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[_norm(name)] = version.split(";")[0].strip()
    return pins


def carried_versions() -> dict[str, str]:
    """The carried packages at constraints.txt's versions."""
    pins = pinned_versions()
    return {name: pins[name] for name in CARRIED}


def travel_bytes() -> dict[str, int]:
    """Bytes that go to the device: tracked and untracked-not-ignored files, shared/, .whl/."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum(
        (ROOT / os.fsdecode(p)).stat().st_size for p in listed if (ROOT / os.fsdecode(p)).is_file()
    )
    shared = sum(p.stat().st_size for p in (ROOT / "shared").rglob("*") if p.is_file())
    wheels = sum(p.stat().st_size for p in WHEELS.rglob("*") if p.is_file())
    return {"tree": tree, "shared": shared, "wheels": wheels, "total": tree + shared + wheels}


def prepare() -> int:
    """Fill .whl/ with the carried wheels (a package registry needed), record the commit, and
    check the size of what travels."""
    from powergrad.tracking import git_sha

    versions = carried_versions()
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):  # one version of each: two stop the offline install
        if _norm(old.name.split("-")[0]) in versions:
            old.unlink()
    pip = [sys.executable, "-m", "pip"]
    wanted = [f"{n}=={v}" for n, v in versions.items() if n not in SDIST_ONLY]
    subprocess.run(
        [
            *pip,
            "download",
            "--no-deps",
            "--only-binary=:all:",
            *("--python-version", "3.12", "--implementation", "cp"),
            *("--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"),
            *("-d", str(WHEELS), *wanted),
        ],
        check=True,
    )
    for name in SDIST_ONLY:
        subprocess.run(
            [*pip, "wheel", "--no-deps", "-w", str(WHEELS), f"{name}=={versions[name]}"],
            check=True,
        )
    wheels = sorted(WHEELS.glob("*.whl"))
    carried = [p for p in wheels if _norm(p.name.split("-")[0]) in versions]
    impure = [p.name for p in carried if not p.name.endswith("-none-any.whl")]
    if impure:
        print(f"error: {WHEELS}: not pure-Python wheels (they may not run there): {impure}")
        return 2
    source = {
        "git_sha": git_sha(ROOT),
        "prepared_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wheels": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in wheels},
    }
    atomic_write(SOURCE_FILE, json.dumps(source, indent=1) + "\n")
    size = travel_bytes()
    mib = {k: round(v / 2**20, 2) for k, v in size.items()}
    print(f"travels to the device (MiB): {mib}")
    if size["total"] >= TRAVEL_LIMIT_BYTES:
        print(f"error: {mib['total']} MiB would travel; the device takes at most 64 MiB")
        return 2
    return 0


# --------------------------------------------------------------------------------------------


def _caps(text: str) -> dict[str, float]:
    caps = {}
    for item in filter(None, text.split(",")):
        name, _, seconds = item.partition("=")
        if name not in CAPS or not seconds:
            raise argparse.ArgumentTypeError(
                f"--cap {item!r}: NAME=SECONDS, NAME one of {list(CAPS)}"
            )
        caps[name] = float(seconds)
    return caps


def _names(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in CAPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown measures {unknown}; choose from {list(CAPS)}")
    return [n for n in CAPS if n in names]  # always in the check's order


def main(argv: list[str] | None = None) -> int:
    """Command line: the check (default), --render, --prepare or --list-packages."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a dry run on any machine")
    ap.add_argument("--out-dir", type=Path, help="where the JSON goes (default results/gpu)")
    ap.add_argument("--only", type=_names, help="comma-separated measures, e.g. compile")
    ap.add_argument("--cap", type=_caps, default={}, help="NAME=SECONDS,... overrides CAPS")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="no measure after this")
    ap.add_argument("--render", action="store_true", help="fill results/gpu/README.md's table")
    ap.add_argument("--check", action="store_true", help="with --render: fail if out of date")
    ap.add_argument("--results", type=Path, default=RESULTS, help="with --render: JSON folder")
    ap.add_argument("--readme", type=Path, default=README, help="with --render: the README")
    ap.add_argument("--prepare", action="store_true", help="fetch the carried wheels into .whl/")
    ap.add_argument("--list-packages", action="store_true", help="image + carried, as JSON")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args.results, args.readme, args.check)
    if args.prepare:
        return prepare()
    if args.list_packages:
        print(json.dumps({"image": sorted(IMAGE_PACKAGES), "carried": carried_versions()}))
        return 0
    if args.out_dir is None:
        if args.tiny:
            print("error: --tiny needs --out-dir (dry runs stay out of results/gpu)")
            return 2
        args.out_dir = RESULTS
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
