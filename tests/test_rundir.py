"""One run per directory, resume from the run itself, nothing lost or poisoned (real processes).

Each test is a case that lost work or silently ran another experiment before
powergrad.rundir existed; they run train.py / eval.py as a user does, on tiny synthetic data.
"""

import json
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_train, run_train, save_checkpoint

from powergrad import checkpoint
from powergrad.checkpoint import NonFiniteError, TrainState
from powergrad.config import ConfigError
from powergrad.models import build_model
from powergrad.rundir import claim, resume_config

ROOT = Path(__file__).resolve().parents[1]
# 2 steps an epoch on 32 random 32x32 images: a run of a few epochs takes seconds.


def _train(run_dir, *args, cwd):
    return run_train([*TINY, *args, f"hydra.run.dir={run_dir}"], cwd)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _refused(proc, needle):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert needle in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def _snapshot(run_dir):
    """Every file of a run directory with its bytes (what a refused start must not touch)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run (baseline, lr 0.05 per 256) and its files' bytes."""
    cwd = tmp_path_factory.mktemp("finished")
    run_dir = cwd / "run"
    _ok(_train(run_dir, "optim.lr_per_256=0.05", cwd=cwd))
    return run_dir


# 1. Two starts into one directory at the same moment: one runs, the other is refused.
def test_simultaneous_starts_into_one_directory_never_both_run(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}"]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errors = b"".join(p.stderr.read() for p in procs).decode()
    assert codes == [0, 2], errors[-3000:]
    assert "in use by another running process" in errors or "already holds a run" in errors
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2


# 2. A resume that finds history but no last.pt stops; it never starts over in place.
def test_resume_without_last_pt_stops_and_keeps_the_history(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in finished_run.iterdir():
        if f.is_file() and f.name != "last.pt":
            (run_dir / f.name).write_bytes(f.read_bytes())
    before = _snapshot(run_dir)
    _refused(run_train([f"trainer.resume={run_dir}"], tmp_path), "but no last.pt to continue")
    assert _snapshot(run_dir) == before


# 3. A refused start into an existing run writes nothing there; a start that fails validation
#    leaves no outputs/DATE/TIME folder behind.
def test_refused_start_writes_nothing(finished_run, tmp_path):
    before = _snapshot(finished_run)
    _refused(_train(finished_run, "method=pgt", cwd=tmp_path), "already holds a run")
    assert _snapshot(finished_run) == before  # .hydra/ included
    _refused(run_train(["method.alpha=1.5"], tmp_path), "out of range")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


# 4. A diverged state (here an inf BatchNorm running variance) is never checkpointed.
def test_nonfinite_buffers_are_never_checkpointed(tmp_path):
    model = build_model("resnet18", 10)
    model.bn1.running_var.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"bn1\.running_var"):
        save_checkpoint(tmp_path, model, TrainState())
    assert not list(tmp_path.iterdir())


# 6. trainer.resume=DIR alone continues the run as it was configured.
def test_resume_alone_uses_the_runs_own_config(finished_run, tmp_path):
    before = (finished_run / "metrics.jsonl").read_text()
    # No TINY here: the command line's defaults (digits, resnet18, 30 epochs) must not apply.
    proc = _ok(run_train([f"trainer.resume={finished_run}", "trainer.progress=false"], tmp_path))
    assert (finished_run / "metrics.jsonl").read_text() == before  # 2 of 2 epochs: done
    assert json.loads((finished_run / "summary.json").read_text())["epochs"] == 2
    assert "resnet18_nonorm" in (finished_run / "config.yaml").read_text()
    assert "changed settings" not in proc.stderr


def test_resume_refuses_overrides_that_change_the_experiment(finished_run, tmp_path):
    before = _snapshot(finished_run)
    proc = _refused(
        run_train(
            [f"trainer.resume={finished_run}", "method=pgt", "optim.lr_per_256=0.1"], tmp_path
        ),
        "would change the experiment mid-run",
    )
    assert "method.alpha: None -> 0.25" in proc.stderr
    assert "optim.lr_per_256: 0.05 -> 0.1" in proc.stderr
    assert "trainer.allow_changes=true" in proc.stderr
    assert {k: v for k, v in _snapshot(finished_run).items() if not k.startswith(".hydra-")} == {
        k: v for k, v in before.items() if not k.startswith(".hydra-")
    }


def test_resume_config_merges_saved_values_and_the_command_lines_keys():
    saved = compose_train(*TINY, "optim.lr_per_256=0.05", "trainer.resume=/r")
    cfg = compose_train("trainer.resume=/r", "loader.workers=3")
    merged, changes = resume_config(
        cfg, saved, ["trainer.resume=/r", "loader.workers=3"], allow_changes=False
    )
    assert (merged.model.name, merged.optim.lr_per_256, merged.data.name) == (
        "resnet18_nonorm",
        0.05,
        "synthetic",
    )
    assert merged.loader.workers == 3 and changes == []  # loader settings are not the experiment
    with pytest.raises(ConfigError, match=r"trainer\.epochs: 2 -> 5"):
        resume_config(
            compose_train(*TINY, "trainer.epochs=5"),
            saved,
            ["trainer.epochs=5"],
            allow_changes=False,
        )


# 7. Extending a finished run: refused with the reason, or re-planned on request (never lr 0).
def test_extending_a_finished_run_is_refused_or_replanned_on_request(tmp_path):
    run_dir = tmp_path / "run"
    _ok(_train(run_dir, cwd=tmp_path))
    proc = _refused(
        run_train([f"trainer.resume={run_dir}", "trainer.epochs=3"], tmp_path),
        "trainer.epochs: 2 -> 3",
    )
    assert "re-plans the lr schedule" in proc.stderr
    before = checkpoint.load(run_dir / "last.pt")["model"]
    _ok(
        run_train(
            [f"trainer.resume={run_dir}", "trainer.epochs=3", "trainer.allow_changes=true"],
            tmp_path,
        )
    )
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[2]["config_changes"] == ["trainer.epochs: 2 -> 3"]
    # Epoch 3 trained on the re-planned cosine over 3 epochs; the old plan's lr 0 (2 epochs,
    # finished) would have left every weight as it was.
    after = checkpoint.load(run_dir / "last.pt")["model"]
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


# 9. auto_resume on a run that died before its first checkpoint starts it (nothing to lose).
def test_auto_resume_starts_a_run_that_died_before_its_first_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "trainer.epochs=50"]
    cmd += [f"hydra.run.dir={run_dir}", "trainer.auto_resume=true"]
    victim = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "config.yaml").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert (run_dir / "config.yaml").exists() and not (run_dir / "last.pt").exists()
    _ok(_train(run_dir, "trainer.auto_resume=true", cwd=tmp_path))
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2


# 13. Clean one-line errors.
def test_clean_errors_for_bad_resume_targets_and_checkpoints(finished_run, tmp_path):
    missing = tmp_path / "outputs" / "no-such-run"
    _refused(run_train([f"trainer.resume={missing}"], tmp_path), "not a powergrad run directory")
    assert not missing.exists()  # what Hydra created for it is removed again
    for name, data in (
        ("empty", b""),
        ("truncated", None),
        ("random", random.Random(0).randbytes(4096)),
    ):
        run_dir = tmp_path / name
        run_dir.mkdir()
        for f in ("config.yaml", "metrics.jsonl"):
            (run_dir / f).write_bytes((finished_run / f).read_bytes())
        last = (finished_run / "last.pt").read_bytes()
        (run_dir / "last.pt").write_bytes(last[: len(last) // 2] if data is None else data)
        _refused(run_train([f"trainer.resume={run_dir}"], tmp_path), "not a readable checkpoint")
    _refused(run_train(["trainer.batch_size=0"], tmp_path), "trainer.batch_size=0: must be >= 1")


def test_read_only_run_directory_is_refused_before_training(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in finished_run.iterdir():
        if f.is_file():
            (run_dir / f.name).write_bytes(f.read_bytes())
    # Root ignores permission bits: make the directory immutable instead.
    if subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True).returncode:
        pytest.skip("chattr +i is not permitted here")
    try:
        _refused(run_train([f"trainer.resume={run_dir}"], tmp_path), "cannot write the run")
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=True)


def test_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # 100 MiB: the first last.pt (~90 MB: weights + momentum of ResNet-18) fits, best.pt does not.
    mount = ["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        proc = _refused(
            _train(disk / "run", "model=resnet18", cwd=tmp_path), "no space left on the device"
        )
        assert "previous version of that file is intact" in proc.stderr
        assert checkpoint.load(disk / "run" / "last.pt")["epoch"] == 1
        assert not list((disk / "run").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# 14. Group-readable files as the umask allows; stale temp files of a killed write removed.
def test_run_files_follow_the_umask_and_stale_temps_are_removed(finished_run, tmp_path):
    for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "config.yaml"):
        mode = stat.S_IMODE((finished_run / name).stat().st_mode)
        assert mode & 0o044 == 0o044, (name, oct(mode))  # umask 022: readable by group, others
    summary = (finished_run / "summary.json").read_text()
    assert "NaN" not in summary and "Infinity" not in summary
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    held = claim(run_dir, resume=False, auto_resume=False)
    held.release()
    assert not stale.exists()


def test_claim_refuses_a_directory_another_process_holds(tmp_path):
    held = claim(tmp_path / "run", resume=False, auto_resume=False)
    code = (
        "import sys; from pathlib import Path; from powergrad.rundir import claim\n"
        "from powergrad.config import ConfigError\n"
        "try:\n    claim(Path(sys.argv[1]), resume=False, auto_resume=False)\n"
        "except ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True
    )
    held.release()
    assert "in use by another running process" in out.stdout
