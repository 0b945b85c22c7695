"""SLURM for real (issue 20): a one-node cluster started by the test session, jobs through
Hydra's submitit launcher (``hydra/launcher=slurm``) and through plain ``srun``, on CPU (gloo).

The cluster (tests/slurm_cluster.py) is munged + slurmctld + slurmd from Debian's packages in a
temp dir with their own ports and state, shared by every test here and stopped at the end of
the session. The tests are skipped, saying why, only where those programs are absent; .ci/run
installs them (``apt-get install slurm-wlm munge``).

Each test's docstring says what it shows. The time-limit test waits for slurmctld's time-limit
checks (every 30 s); its sweep starts with the module, so that waiting overlaps the other tests.

The cluster has no accounting database, so ``sacct`` fails and submitit's launcher learns that
a job ended from the job's result file alone: a job that finished or raised writes one (a
requeued job when it finally ends); a job ended by ``scancel`` writes none, so the scancel test
stops the waiting launcher itself, and :meth:`Sweep.finish` fails early when SLURM has ended
every job of a sweep but its launcher still waits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import history_without_timing, tiny, train_in_process
from slurm_cluster import missing_binaries, start_cluster
from test_distributed import ARGS as DDP_ARGS
from test_distributed import _small_odd_digits
from wandb_offline import read_offline_run

from powergrad.preemption import MARKER

ROOT = Path(__file__).resolve().parents[1]
MISSING = missing_binaries()
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"SLURM is not installed (no {', '.join(MISSING)}): apt-get install slurm-wlm munge",
)

# Hydra's submitit launcher on the test cluster: one rank and one CPU per job, partition debug.
SLURM = [
    "-m",
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
]
# SLURM job states after the end (a requeued job is PENDING again).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
# Preemption runs: 40 steps an epoch (a signal after epoch 1's checkpoint lands mid-epoch 2).
STEPS = 40
PREEMPT = tiny("data.synthetic_train_images=640", "method=pgt")  # 640 / 16 = STEPS
# The time-limit run never ends by itself (100000 steps): every stop is SLURM's doing.
ENDLESS = tiny("data.synthetic_train_images=1600000", "trainer.epochs=1")


@pytest.fixture(scope="session")
def cluster():
    """The running cluster, stopped (daemons by PID, jobs cancelled) when the session ends."""
    c = start_cluster()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def job_env(cluster):
    """The cluster's client environment for a launcher or srun: powergrad importable in the
    jobs' fresh interpreters (as after ``pip install -e .``), one OpenMP thread, no wandb
    service inherited from this process."""
    env = {k: v for k, v in cluster.env.items() if k != "WANDB_SERVICE"}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


_STARTED: list[Sweep] = []


@pytest.fixture(autouse=True)
def _no_leftovers():
    """A failed test's launcher and jobs are stopped (they would load the CPU for minutes)."""
    yield
    for sweep in _STARTED:
        sweep.stop()
    _STARTED.clear()


class Sweep:
    """``python train.py -m hydra/launcher=slurm OVERRIDES`` running in ``cwd``; stopped after
    the test that started it, unless ``per_test=False`` (then its fixture stops it)."""

    def __init__(self, cluster, cwd: Path, overrides: list[str], per_test: bool = True) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.cluster, self.cwd = cluster, cwd
        self.log = cwd / "launcher.log"  # a file: the launcher's sacct warnings fill a pipe
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *SLURM, *overrides],
                cwd=cwd,
                env=job_env(cluster),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if per_test:
            _STARTED.append(self)

    def finish(self, timeout: float = 400) -> tuple[int, str]:
        """Wait for the launcher; (exit status, its output). Fails early when SLURM has ended
        every job of the sweep for 30 s but the launcher still waits (it would wait for sacct,
        which this cluster lacks, forever)."""
        deadline, ended_since = time.monotonic() + timeout, None
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"launcher still running:\n{self.job_logs()}"
            jobs = [self.cluster.job(j).get("JobState") for j in self.job_ids()]
            if jobs and all(state in ENDED for state in jobs):
                ended_since = ended_since or time.monotonic()
                assert time.monotonic() - ended_since < 30, (
                    f"SLURM ended the jobs ({jobs}), the launcher still waits:\n"
                    f"{self.job_logs()[-3000:]}"
                )
            else:
                ended_since = None
            time.sleep(1)
        return self.proc.returncode, self.log.read_text()

    @property
    def dir(self) -> Path:
        """The sweep directory (one per launcher)."""
        (sweep,) = self.cwd.glob("multirun/*/*")
        return sweep

    def job_ids(self) -> list[str]:
        """SLURM ids of the sweep's jobs (``N``, or ``N_I`` for the tasks of a job array)."""
        ids = {p.name for p in self.cwd.glob("multirun/*/*/.submitit/*") if p.is_dir()}
        # A job array's folder N holds only the submitted pickles; its tasks are N_0, N_1, ...
        return sorted(i for i in ids if not any(j.startswith(f"{i}_") for j in ids))

    def job_logs(self, stream: str = "*") -> str:
        """The submitit logs of the sweep (every task, every start): ``stream`` "out", "err"
        or both."""
        logs = sorted(self.cwd.glob(f"multirun/*/*/.submitit/*/*_log.{stream}"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def submitit_events(self, text: str) -> int:
        """How many of submitit's own log lines contain ``text`` (each is written once to the
        task's stdout log with this prefix, and again by Hydra's logging)."""
        lines = self.job_logs("out").splitlines()
        return sum(ln.startswith("submitit ") and text in ln for ln in lines)

    def checkpoint_at(self, step: int, timeout_s: float = 300) -> tuple[str, Path]:
        """Wait until the sweep's single run has a last.pt at ``step`` or later; returns (job
        id, run directory)."""
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"launcher ended:\n{self.log.read_text()[-3000:]}"
            lasts = list(self.cwd.glob("multirun/*/*/0_*/last.pt"))
            if lasts and lasts[0].stat().st_mtime_ns != seen:
                seen = lasts[0].stat().st_mtime_ns
                if torch.load(lasts[0], weights_only=True)["step"] >= step:
                    (job,) = self.job_ids()
                    return job, lasts[0].parent
            time.sleep(0.02)
        raise AssertionError(f"no checkpoint at step {step}:\n{self.job_logs()[-3000:]}")

    def stop(self) -> None:
        """Stop the launcher and cancel its jobs (a no-op for what already ended)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.job_ids():
            self.cluster.cancel(self.job_ids())


class References:
    """Uninterrupted single-process runs, trained in this process on first use (while a test's
    SLURM job runs) and shared by the tests that compare against them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[str, Path] = {}
        self._digits: Path | None = None

    def digits(self) -> Path:
        """test_distributed's small digits set: 320 train images (5 steps of 64), 359 val."""
        if self._digits is None:
            self._digits = _small_odd_digits(self.root)
        return self._digits

    def ddp_args(self) -> list[str]:
        """The DDP-equivalence run of test_distributed (non-BN ResNet-18, PGT, global batch
        64, one epoch) on the small digits set."""
        return [*DDP_ARGS, f"data.root={self.digits()}"]

    def run(self, name: str, overrides: list[str]) -> Path:
        """The run directory of ``train.py OVERRIDES``, trained once."""
        if name not in self._done:
            train_in_process(self.root / name, *overrides)
            self._done[name] = self.root / name
        return self._done[name]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return References(tmp_path_factory.mktemp("references"))


def assert_same_run(a_dir: Path, b_dir: Path, exact: bool = True) -> None:
    """Same final weights and epoch records (timing aside); allclose across world sizes."""
    a = torch.load(a_dir / "last.pt", weights_only=True)
    b = torch.load(b_dir / "last.pt", weights_only=True)
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        if exact:
            assert torch.equal(value, b["model"][key]), key
        else:
            torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    if exact:
        assert history_without_timing(a_dir) == history_without_timing(b_dir)


def stop_steps(logs: str) -> list[int]:
    """The steps after which the jobs stopped on a signal, in order (rank 0's log lines)."""
    return [int(s) for s in re.findall(r"received: stopped after step (\d+)", logs)]


# --- the time-limit sweep, started with the module ------------------------------------------

TIME_LIMIT_TEST = "test_time_limit_signal_checkpoints_and_requeues_up_to_max_num_timeout"


@pytest.fixture(scope="module", autouse=True)
def time_limit_sweep(request, tmp_path_factory):
    """The time-limit test's sweep, started when the module starts if that test is selected."""
    if MISSING or not any(item.name == TIME_LIMIT_TEST for item in request.session.items):
        yield None
        return
    cluster = request.getfixturevalue("cluster")
    sweep = Sweep(
        cluster,
        tmp_path_factory.mktemp("time_limit"),
        [
            *ENDLESS,
            # SLURM's shortest limit, signal 2 s before it. slurmctld checks limits every 30 s
            # and signals up to 30 s early, so USR2 comes 28-58 s into each start, at a check
            # before the one that ends the job. (A larger delay signals at the first check,
            # 0-30 s in, possibly before submitit's handler is set up, which kills the job.)
            "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=2",
            "hydra.launcher.max_num_timeout=1",
        ],
        per_test=False,
    )
    yield sweep
    sweep.stop()


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_point_sweep_runs_as_two_slurm_jobs_and_compares_them(cluster, tmp_path):
    """Issue 20 test 1. Shows: `-m hydra/launcher=slurm hydra.launcher.gpus_per_node=0
    method=baseline,pgt` submits one SLURM job array of two one-task jobs (the preset asked for
    0 tasks per node before), both complete on the cluster, each point gets one run directory,
    compare.md holds both, and the sweep exits 0."""
    sweep = Sweep(cluster, tmp_path, tiny("method=baseline,pgt"))
    rc, out = sweep.finish()
    assert rc == 0, out[-3000:]
    names = sorted(p.name for p in sweep.dir.iterdir() if not p.name.startswith("."))
    assert names == [
        "0_baseline",
        "1_pgt",
        "compare.csv",
        "compare.json",
        "compare.md",
        "compare.png",
        "multirun.yaml",
    ]
    jobs = sweep.job_ids()
    assert len(jobs) == 2 and {j.split("_")[0] for j in jobs} == {jobs[0].split("_")[0]}
    for job in jobs:
        record = cluster.job(job)
        assert record["JobState"] == "COMPLETED" and record["Partition"] == "debug", record
    for run, method in (("0_baseline", "baseline"), ("1_pgt", "pgt")):
        summary = json.loads((sweep.dir / run / "summary.json").read_text())
        assert summary["method"] == method and summary["world_size"] == 1
        assert summary["epochs"] == 2
    table = (sweep.dir / "compare.md").read_text()
    assert "| baseline |" in table and "| pgt |" in table


@pytest.mark.slow
def test_two_task_job_matches_one_process_with_the_same_global_batch(cluster, tmp_path, references):
    """Issue 20 test 2. Shows: with tasks_per_node=2 the job runs two tasks whose ranks come
    from SLURM's environment through submitit (gloo rendezvous on the node named in
    SLURM_JOB_NODELIST), and their run equals one process with the same global batch
    (test_distributed's equivalence under torchrun): same weights (allclose), same losses,
    359 val images counted once."""
    sweep = Sweep(cluster, tmp_path, [*references.ddp_args(), "hydra.launcher.tasks_per_node=2"])
    single_dir = references.run("ddp_single", references.ddp_args())
    rc, out = sweep.finish()
    assert rc == 0, out[-3000:]
    (job,) = sweep.job_ids()
    assert cluster.job(job)["NumTasks"] == "2"
    assert list(sweep.dir.glob(f".submitit/{job}/{job}_1_log.out"))  # rank 1: its own task
    (ddp_dir,) = [p.parent for p in sweep.dir.glob("*/summary.json")]
    assert_same_run(single_dir, ddp_dir, exact=False)
    sa = json.loads((single_dir / "summary.json").read_text())
    sb = json.loads((ddp_dir / "summary.json").read_text())
    assert sb["world_size"] == 2 and sa["val_images"] == sb["val_images"] == 359
    assert sa["train_loss"] == pytest.approx(sb["train_loss"], rel=1e-4)
    assert sa["val_loss"] == pytest.approx(sb["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_usr2_mid_epoch_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path, references):
    """Issue 20 test 3 (preemption). Shows: `scancel --signal=USR2 JOB` in epoch 2 makes the
    trainer finish its step and checkpoint, submitit requeue the job (`scontrol requeue`;
    SLURM counts a restart), and the requeued job resume in the same run directory; the
    finished run equals an uninterrupted one (weights and metrics.jsonl, timing aside) and is
    one wandb run over both starts. (Replaces the submitit local-executor half of
    test_preemption.)"""
    sweep = Sweep(cluster, tmp_path / "sweep", [*PREEMPT, "logger=wandb", "logger.mode=offline"])
    reference = references.run("uninterrupted", PREEMPT)
    job, run_dir = sweep.checkpoint_at(STEPS)
    cluster.run("scancel", "--signal=USR2", job)
    rc, out = sweep.finish()
    assert rc == 0, out[-3000:]
    logs = sweep.job_logs()
    assert "USR2 received" in logs and "this job is preempted" in logs, logs[-3000:]
    assert "Requeued job" in logs and "resuming" in logs
    (stopped,) = stop_steps(logs)
    assert STEPS < stopped < 2 * STEPS  # mid-epoch 2
    assert cluster.job(job)["Restarts"] == "1"
    assert_same_run(reference, run_dir)
    assert not (run_dir / MARKER).exists()
    run = read_offline_run(run_dir)
    assert len(run["files"]) == 2 and run["exit_code"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run["id"] == summary["wandb_id"]
    assert run["summary"]["val/top1"]["last"] == summary["val_top1"]


@pytest.mark.slow
def test_usr2_before_the_first_checkpoint_requeues_a_job_that_then_runs_to_the_end(
    cluster, tmp_path, references
):
    """Preemption before any checkpoint exists: USR2 as soon as Hydra has made the job's run
    directory (the trainer is starting: claim, data, model). Shows: submitit requeues it, and
    the requeued job starts the run in the same directory (nothing of the first start is left
    to refuse it) and finishes it, equal to an uninterrupted run. (A USR2 earlier still, while
    submitit loads the job and before it installs its handler, kills the job: submitit's
    window, not the trainer's.)"""
    sweep = Sweep(cluster, tmp_path / "sweep", PREEMPT)
    reference = references.run("uninterrupted", PREEMPT)
    deadline = time.monotonic() + 120
    while not list(sweep.cwd.glob("multirun/*/*/0_*")):
        assert time.monotonic() < deadline, sweep.log.read_text()[-3000:]
        time.sleep(0.01)
    (job,) = sweep.job_ids()
    assert not list(sweep.cwd.glob("multirun/*/*/0_*/last.pt"))
    cluster.run("scancel", "--signal=USR2", job)
    rc, out = sweep.finish()
    assert rc == 0, out[-3000:] + sweep.job_logs()[-3000:]
    assert cluster.job(job)["Restarts"] == "1" and "Requeued job" in sweep.job_logs()
    (run_dir,) = sweep.dir.glob("0_*")
    assert_same_run(reference, run_dir)


@pytest.mark.slow
def test_scancel_ends_the_job_and_trainer_resume_continues_it_exactly(
    cluster, tmp_path, references
):
    """Issue 20 test 4. Shows: a plain `scancel JOB` (SIGTERM) in epoch 2 checkpoints and ends
    the job for good: SLURM reports it CANCELLED with no restart (before, the trainer asked
    submitit to requeue on SIGTERM and `scontrol requeue` brought the cancelled job back);
    last.pt is intact, and `python train.py trainer.resume=RUN_DIR` continues it to the
    uninterrupted run's weights and metrics."""
    sweep = Sweep(cluster, tmp_path / "sweep", PREEMPT)
    reference = references.run("uninterrupted", PREEMPT)
    job, run_dir = sweep.checkpoint_at(STEPS)
    cluster.run("scancel", job)
    deadline = time.monotonic() + 120
    while cluster.job(job).get("JobState") != "CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.5)
    # A requeue would be visible by now: the job asks for it before it exits, and the state
    # turns CANCELLED only once its processes are gone.
    record = cluster.job(job)
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", record
    assert job not in cluster.job_ids()
    logs = sweep.job_logs()
    assert "SIGTERM received" in logs and "Requeued job" not in logs, logs[-3000:]
    # The launcher learns of a cancelled job from sacct, absent on this cluster: stop it.
    assert sweep.proc.poll() is None
    sweep.stop()

    stopped = torch.load(run_dir / "last.pt", weights_only=True)
    marker = json.loads((run_dir / MARKER).read_text())
    assert marker["signal"] == "SIGTERM" and marker["step"] == stopped["step"]
    assert STEPS < stopped["step"] < 2 * STEPS  # mid-epoch 2
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"trainer.resume={run_dir}"],
        cwd=tmp_path,
        env=job_env(cluster),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    assert_same_run(reference, run_dir)


@pytest.mark.slow
def test_plain_srun_of_two_tasks_is_one_two_rank_run(cluster, tmp_path, references):
    """Issue 20 test 5 = issue 19 item 8. Shows: `srun -n 2 python train.py ...` (no torchrun,
    no submitit) is one 2-rank run, ranks from the srun step's SLURM_PROCID /
    SLURM_STEP_NUM_TASKS / SLURM_LOCALID and the rendezvous on the step's first node: exactly
    one run directory, world_size 2, equal to one process with the same global batch. (Before:
    two independent single-process copies.)"""
    cwd = tmp_path / "srun"
    cwd.mkdir()
    train = [sys.executable, str(ROOT / "train.py"), *references.ddp_args()]
    srun = subprocess.Popen(
        ["srun", "--ntasks=2", "--cpus-per-task=1", *train],
        cwd=cwd,
        env=job_env(cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    single_dir = references.run("ddp_single", references.ddp_args())
    out, _ = srun.communicate(timeout=400)
    assert srun.returncode == 0, out[-3000:]
    runs = [p for p in cwd.glob("outputs/*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_images"] == 359
    assert_same_run(single_dir, runs[0], exact=False)


def test_only_the_tasks_of_an_srun_step_are_ranks(cluster, tmp_path):
    """Issue 19 item 8, the other side. Shows, with SLURM's real environment: `python` in a
    batch script of --ntasks=2 (SLURM_NTASKS=2, no step) is one single process; the two tasks
    of `srun -n 2` are ranks 0 and 1 of 2 with a shared MASTER_ADDR / MASTER_PORT; torchrun's
    variables win inside a step."""
    probe = (
        "import os; from powergrad import distributed as d; "
        "r = d.srun_rendezvous(os.environ) if d.launcher() == 'srun' else {}; "
        "print(d.launcher(), *d.env_world(), r.get('MASTER_ADDR'), r.get('MASTER_PORT'))"
    )
    env = job_env(cluster)
    batch = cluster.run(
        "sbatch",
        "--ntasks=2",
        "--wait",
        f"--output={tmp_path / 'batch.out'}",
        f"--wrap={sys.executable} -c {json.dumps(probe)}",
    )
    assert batch.returncode == 0
    assert (tmp_path / "batch.out").read_text().split()[:4] == ["single", "0", "1", "0"]
    step = subprocess.run(
        ["srun", "--ntasks=2", sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert step.returncode == 0, step.stderr
    lines = sorted(step.stdout.splitlines())
    assert [ln.split()[:4] for ln in lines] == [["srun", "0", "2", "0"], ["srun", "1", "2", "1"]]
    assert len({ln.split(None, 4)[4] for ln in lines}) == 1  # one rendezvous for both
    assert lines[0].split()[4] == cluster.node
    torchrun = subprocess.run(
        ["srun", "--ntasks=2", "--export=ALL,RANK=3,WORLD_SIZE=8", sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert [ln.split()[:3] for ln in torchrun.stdout.splitlines()] == [["torchrun", "3", "8"]] * 2


@pytest.mark.slow
def test_a_job_with_a_bad_config_fails_the_sweep_with_its_one_line_error(cluster, tmp_path):
    """Issue 20 test 6. Shows: a job whose config is refused at start (method.alpha=2) writes
    the one-line `error: ...` to its submitit log and leaves no run directory; the sweep ends
    at once (the job's result says it failed; no sacct needed) with a non-zero status naming
    the same error."""
    sweep = Sweep(cluster, tmp_path, tiny("method=pgt", "method.alpha=2"))
    rc, out = sweep.finish()
    assert rc != 0, out[-3000:]
    message = "method.alpha=2.0 is out of range: PGT needs 0 <= alpha <= 1"
    errors = [ln for ln in sweep.job_logs().splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {message}"], sweep.job_logs()[-3000:]
    assert message in out
    assert not [p for p in sweep.dir.iterdir() if p.is_dir() and not p.name.startswith(".")]


@pytest.mark.slow
def test_time_limit_signal_checkpoints_and_requeues_up_to_max_num_timeout(
    cluster, time_limit_sweep
):
    """Issue 20 test 3 (time limit). Shows: with timeout_min=1 and signal_delay_s=2, SLURM
    itself sends USR2 before the limit; the trainer checkpoints, submitit counts a time-out and
    requeues the job; the requeued job resumes from that checkpoint and trains on until the
    limit's signal comes again; with max_num_timeout=1 that second time-out is not requeued:
    the job stops with its checkpoint (continue with trainer.resume) and the sweep fails saying
    so. (The sweep started with the module; this test collects it.)"""
    sweep = time_limit_sweep
    rc, out = sweep.finish(timeout=400)
    assert rc != 0 and "timed-out too many times" in out, out[-3000:]
    logs = sweep.job_logs()
    assert sweep.submitit_events("this job is timed-out") == 2, logs[-3000:]
    assert sweep.submitit_events("Requeued job") == 1 and "(0 remaining timeouts)" in logs
    assert "resuming" in logs
    first, second = stop_steps(logs)
    assert 0 < first < second  # the requeued job continued from the first checkpoint
    (job,) = sweep.job_ids()
    assert cluster.job(job)["Restarts"] == "1"
    (run_dir,) = [p.parent for p in sweep.dir.glob("*/last.pt")]
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == second
    assert json.loads((run_dir / MARKER).read_text())["step"] == second
