"""Preemption on CPU with real signals: SIGTERM mid-run, checkpoint, exit, resume, same result.

A plain ``python train.py`` beside an uninterrupted reference with the same config: it exits
with EXIT_PREEMPTED and leaves preempted.json; running the same command again continues the
run, to the reference's weights and epoch records, bit for bit. Under torchrun a signal to one
rank stops every rank at the same step.

Requeue by submitit (USR2 -> checkpoint -> `scontrol requeue` -> resume, one wandb run over both
starts) runs against a real SLURM cluster in tests/test_slurm.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import history_without_timing

from powergrad.preemption import EXIT_PREEMPTED, MARKER

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 1437 // 128
ARGS = [
    "method=pgt",
    "trainer.epochs=2",
    "trainer.warmup_epochs=0.5",
    "trainer.batch_size=128",
    "trainer.threads=1",
    "trainer.progress=false",
    "loader.workers=0",
]


def _env():
    """powergrad importable in submitit's job interpreter (as after ``pip install -e .``); each
    start gets its own wandb service, as after a real requeue."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path}


@pytest.fixture(autouse=True)
def _no_leftovers():
    """End the runs a failed test left behind (they would load the shared CPU for minutes)."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
    _STARTED.clear()


_STARTED: list[subprocess.Popen] = []


def _start(args, cwd):
    env = _env()
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags before the overrides
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *flags,
        *ARGS,
        *(a for a in args if a not in flags),
    ]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _STARTED.append(proc)
    return proc


def _finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _signal_after_first_epoch(victims, deadline_s=300):
    """SIGTERM each victim once its last.pt holds the end of epoch 1 (the stop lands in epoch
    2); victims are (checkpoint finder, pid finder, process), polled together so a slow start
    of one never makes the signal to another late. Returns the run directories."""
    found: dict[int, Path] = {}
    deadline = time.time() + deadline_s
    while len(found) < len(victims) and time.time() < deadline:
        for i, (lasts_of, pid_of, proc) in enumerate(victims):
            if i in found:
                continue
            if proc.poll() is not None:
                raise AssertionError(f"victim {i} ended early:\n{proc.stdout.read()[-3000:]}")
            lasts = list(lasts_of())
            step = torch.load(lasts[0], weights_only=True)["step"] if lasts else 0
            if step >= STEPS_PER_EPOCH:
                assert step < 2 * STEPS_PER_EPOCH, f"victim {i}: first seen at step {step}"
                pid = pid_of()
                assert pid is not None
                os.kill(pid, signal.SIGTERM)
                found[i] = lasts[0].parent
        time.sleep(0.05)
    assert len(found) == len(victims), "no epoch-1 checkpoint appeared"
    return [found[i] for i in range(len(victims))]


def _assert_same_run(a_dir, b_dir):
    a = torch.load(a_dir / "last.pt", weights_only=True)
    b = torch.load(b_dir / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert history_without_timing(a_dir) == history_without_timing(b_dir)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_the_run_resumes_to_the_same_result(tmp_path):
    ref_dir, plain_dir = tmp_path / "reference", tmp_path / "plain"
    reference = _start([f"hydra.run.dir={ref_dir}", "logger=none"], tmp_path)
    plain = _start([f"hydra.run.dir={plain_dir}", "logger=none"], tmp_path)
    _signal_after_first_epoch(
        [
            (
                lambda: [plain_dir / "last.pt"] * (plain_dir / "last.pt").exists(),
                lambda: plain.pid,
                plain,
            )
        ]
    )
    # Checkpoint after the step in flight, exit 3, marker.
    rc, out = _finish(plain)
    assert rc == EXIT_PREEMPTED, out[-3000:]
    assert "SIGTERM received" in out
    stopped = torch.load(plain_dir / "last.pt", weights_only=True)
    marker = json.loads((plain_dir / MARKER).read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] == stopped["step"]
    assert STEPS_PER_EPOCH <= stopped["step"] < 2 * STEPS_PER_EPOCH
    assert not (plain_dir / "summary.json").exists()

    # The same command again continues the run (the marker says so).
    rc, out = _finish(_start([f"hydra.run.dir={plain_dir}", "logger=none"], tmp_path))
    assert rc == 0, out[-3000:]
    assert "resuming" in out and not (plain_dir / MARKER).exists()
    rc, out = _finish(reference)
    assert rc == 0, out[-3000:]
    _assert_same_run(ref_dir, plain_dir)


def _torchrun_worker(parent, rank):
    """The pid of torchrun worker ``rank`` (a child of ``parent`` with RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    run_dir = tmp_path / "ddp"
    # 3 epochs: a signal late in the last epoch (after its last agreement point) lets the run
    # finish normally; the one sent after epoch 1 always has agreement points ahead of it.
    args = [
        f"hydra.run.dir={run_dir}",
        "logger=none",
        "trainer.preempt_check_every_steps=4",
        "trainer.epochs=3",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, str(ROOT / "train.py"), *ARGS, *args]
    env = {**_env(), "OMP_NUM_THREADS": "1", "SUBMITIT_EXECUTOR": ""}

    def start():
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        _STARTED.append(proc)
        return proc

    proc = start()
    last = run_dir / "last.pt"
    # Only rank 1 is signalled: rank 0 learns it through the all-reduced flag.
    _signal_after_first_epoch(
        [(lambda: [last] * last.exists(), lambda: _torchrun_worker(proc.pid, 1), proc)]
    )
    rc, out = _finish(proc)
    assert rc != 0, out[-3000:]
    assert "rank 1: SIGTERM received" in out and "rank 0: SIGTERM" not in out
    stopped = torch.load(last, weights_only=True)
    marker = json.loads((run_dir / MARKER).read_text())  # written by rank 0
    assert marker["step"] == stopped["step"] <= 2 * STEPS_PER_EPOCH
    # Agreement points: every 4th step, or the end of an epoch (a signal during evaluation).
    assert stopped["step"] % 4 == 0 or stopped["step"] % STEPS_PER_EPOCH == 0
    assert stopped["world_size"] == 2

    rc, out = _finish(start())  # the same command continues the run
    assert rc == 0, out[-3000:]
    final = torch.load(last, weights_only=True)
    assert final["step"] == 3 * STEPS_PER_EPOCH and len(history_without_timing(run_dir)) == 3
    assert not (run_dir / MARKER).exists()
