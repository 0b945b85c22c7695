"""One run per directory, resume from the run itself, nothing lost or poisoned (real processes).

Each test is a case that lost work or silently ran another experiment before
powergrad.rundir existed; they run train.py / eval.py as a user does, on tiny synthetic data.
"""

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY,
    compose_train,
    history_without_timing,
    kill_when,
    run_train,
    save_checkpoint,
    tiny,
    train_in_process,
)
from omegaconf import OmegaConf

from powergrad import checkpoint, rundir
from powergrad.checkpoint import CheckpointError, NonFiniteError, TrainState
from powergrad.config import ConfigError
from powergrad.data import DatasetError
from powergrad.data.generate import write_image_folder
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


# 9. A run killed before its first checkpoint (here while it was being written: metrics.jsonl
#    already holds epoch 1) starts again in place under auto_resume, trainer.resume or its
#    preemption marker, on every requeue; nothing of value is lost, since no weights exist.
def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run_dir}", "trainer.auto_resume=true"]
    victim = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(
        victim, lambda: any(run_dir.glob(".last.pt.*.tmp")) and not (run_dir / "last.pt").exists()
    )
    assert len(history_without_timing(run_dir)) == 1 and (run_dir / "config.yaml").exists()
    metrics = run_dir / "metrics.jsonl"
    for records in (metrics.read_text(), ""):  # as killed, and as killed before epoch 1 ended
        metrics.write_text(records)
        for kwargs in (
            {"resume": False, "auto_resume": True},
            {"resume": True, "auto_resume": False},
        ):
            held = claim(run_dir, **kwargs)
            held.release()
            assert held.resume is False
        (run_dir / "preempted.json").write_text("{}\n")
        held = claim(run_dir, resume=False, auto_resume=False)
        held.release()
        assert held.resume is False and not (run_dir / "preempted.json").exists()
    # The requeue under torchrun (2 ranks, the same command): it starts again in place, saying
    # so once (rank 0), and trains to the end.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*torchrun, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("stopped before its first checkpoint; starting it again") == 1
    assert len(history_without_timing(run_dir)) == 2
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2


# 15. SIGKILL while best.pt is written: last.pt already ranks that epoch. The requeue (the same
#     command) finds the run finished, says so, and rebuilds best.pt from last.pt: summary.json
#     never names a best epoch whose weights exist nowhere.
def test_sigkill_while_best_pt_is_written_leaves_a_best_that_exists(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*tiny("trainer.epochs=1"), "trainer.auto_resume=true"]
    victim = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(victim, lambda: any(run_dir.glob(".best.pt.*.tmp")))
    last = checkpoint.load(run_dir / "last.pt")
    assert last["best_epoch"] == 1 and not (run_dir / "best.pt").exists()
    train_in_process(run_dir, *args)  # the requeue: the same command
    err = capsys.readouterr().err
    assert "is finished (1 of 1 epochs)" in err and "resuming" not in err, err
    assert "trainer.epochs=N trainer.allow_changes=true" in err
    best = checkpoint.load(run_dir / "best.pt")
    assert json.loads((run_dir / "summary.json").read_text())["best_epoch"] == best["epoch"] == 1
    for key, value in last["model"].items():
        assert torch.equal(best["model"][key], value), key


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# 16. The run's config on resume is the one stored in last.pt: an edited config.yaml is
#     reported and rewritten, never obeyed; a missing one neither stops trainer.resume nor lets
#     a requeued command change the experiment.
def test_a_resume_takes_the_config_stored_in_last_pt(finished_run, tmp_path, capsys):
    edited = _copy_run(finished_run, tmp_path / "edited")
    copy = OmegaConf.load(edited / "config.yaml")
    copy.method.alpha, copy.optim.lr_per_256, copy.seed = 0.25, 0.25, 7
    OmegaConf.save(copy, edited / "config.yaml")
    summary = train_in_process(edited, f"trainer.resume={edited}")
    err = capsys.readouterr().err
    assert "config.yaml differs from the config stored in last.pt" in err
    assert "seed: 7 in config.yaml, 0 in last.pt" in err
    assert (summary["method"], summary["seed"]) == ("baseline", 0)
    assert OmegaConf.load(edited / "config.yaml").optim.lr_per_256 == 0.05

    gone = _copy_run(finished_run, tmp_path / "gone")
    (gone / "config.yaml").unlink()
    (gone / "preempted.json").write_text('{"signal": "SIGTERM"}\n')
    before = _snapshot(gone)
    # The requeue of a command that now reads baseline -> PGT at 10x the lr, one more epoch.
    requeue = ("method=pgt", "optim.lr_per_256=0.5", "trainer.epochs=3", "trainer.auto_resume=true")
    with pytest.raises(ConfigError, match="would change the experiment") as error:
        train_in_process(gone, *TINY, *requeue)
    assert "config.yaml is missing" in capsys.readouterr().err
    assert "method.alpha: None -> 0.25" in str(error.value)
    assert "trainer.epochs: 2 -> 3" in str(error.value)
    assert _snapshot(gone) == before
    summary = train_in_process(gone, f"trainer.resume={gone}")
    assert (summary["model"], summary["method"], summary["epochs"]) == (
        "resnet18_nonorm",
        "baseline",
        2,
    )
    assert OmegaConf.load(gone / "config.yaml").optim.lr_per_256 == 0.05


def test_an_unreadable_config_yaml_is_reported_and_rewritten(finished_run, tmp_path, capsys):
    run_dir = _copy_run(finished_run, tmp_path / "run")
    (run_dir / "config.yaml").write_text("model: {name: [unclosed\n")
    summary = train_in_process(run_dir, f"trainer.resume={run_dir}")
    assert "config.yaml is not readable" in capsys.readouterr().err
    assert summary["model"] == "resnet18_nonorm"
    assert OmegaConf.load(run_dir / "config.yaml").model.name == "resnet18_nonorm"


# 17. A checkpoint that cannot continue this run is one line naming the file and what is wrong.
def test_a_last_pt_that_cannot_continue_is_one_line(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path / "no-optimizer")
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, run_dir / "last.pt")
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError) as error:
        train_in_process(run_dir, f"trainer.resume={run_dir}")
    assert f"{run_dir / 'last.pt'}" in str(error.value) and "'optimizer'" in str(error.value)
    assert "\n" not in str(error.value)
    assert _snapshot(run_dir) == before
    # Another architecture (opted in with allow_changes) cannot take these weights.
    run_dir = _copy_run(finished_run, tmp_path / "other-model")
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="another model") as error:
        train_in_process(
            run_dir, f"trainer.resume={run_dir}", "model=resnet18", "trainer.allow_changes=true"
        )
    assert "\n" not in str(error.value)
    assert _snapshot(run_dir) == before


# 18. A folder that is not a run (hydra.run.dir pointed at the user's own files) is refused as
#     it is: nothing deleted, nothing written, from one rank under torchrun. The user's own
#     files inside a real run do not stop it.
def test_a_folder_that_is_not_a_run_is_refused_untouched(finished_run, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    (folder / ".thesis.tex.tmp").write_text("a draft, autosaved\n")
    with pytest.raises(ConfigError, match=r"thesis is not a powergrad run directory.*notes\.txt"):
        claim(folder, resume=False, auto_resume=False)
    assert sorted(os.listdir(folder)) == [".thesis.tex.tmp", "notes.txt"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*torchrun, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={folder}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "notes.txt" in errors[0], errors
    assert sorted(os.listdir(folder)) == [".thesis.tex.tmp", "notes.txt"]

    run_dir = _copy_run(finished_run, tmp_path / "run")
    (run_dir / "notes.txt").write_text("why this run matters\n")
    (run_dir / ".notes.txt.tmp").write_text("an editor's autosave\n")
    (run_dir / ".last.pt.k3j2x9qa.tmp").write_bytes(b"half a checkpoint")
    held = claim(run_dir, resume=True, auto_resume=False)
    held.release()
    assert held.resume and (run_dir / ".notes.txt.tmp").exists()
    assert not (run_dir / ".last.pt.k3j2x9qa.tmp").exists()


# 19. A start that fails before its first checkpoint leaves nothing behind, so the next start
#     into the same directory is not refused: a bad dataset found after the claim, a model that
#     cannot take model.init's weights, Ctrl-C (a real SIGINT) in the first epoch.
def test_a_start_that_fails_before_its_first_checkpoint_leaves_nothing(finished_run, tmp_path):
    bad = tmp_path / "bad-dataset"
    write_image_folder(bad, classes=2, train_per_class=2, val_per_class=1, size=(32, 32))
    shutil.rmtree(next((bad / "val").iterdir()))  # a class without val images
    run_dir = tmp_path / "run"
    with pytest.raises(DatasetError):
        train_in_process(run_dir, *tiny("data=imagenet", f"data.root={bad}"))
    assert not run_dir.exists()
    with pytest.raises(CheckpointError):
        train_in_process(run_dir, *tiny("model=resnet18", f"model.init={finished_run / 'best.pt'}"))
    assert not run_dir.exists()
    train_in_process(run_dir, *tiny())  # the next start there is a new run, not refused
    assert (run_dir / "summary.json").exists()

    cmd = [sys.executable, str(ROOT / "train.py"), *tiny("trainer.epochs=50")]
    victim = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C reaches it even when this test runs in a background job (SIGINT ignored there).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("outputs/*/*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGINT)
    victim.communicate(timeout=120)
    assert victim.returncode != 0
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


# 20. `-m trainer.resume=...` is refused before anything is written (no multirun folder).
def test_multirun_resume_is_refused_and_leaves_nothing(finished_run, tmp_path):
    _refused(run_train(["-m", f"trainer.resume={finished_run}"], tmp_path), "without -m")
    assert not [p for p in tmp_path.rglob("*") if not p.is_dir()]  # no multirun.yaml, no log


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


def test_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    # 100 MiB: last.pt (~90 MB: weights + momentum of ResNet-18) fits, best.pt then does not.
    mount = ["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        run_dir = disk / "run"
        proc = _refused(
            _train(run_dir, "model=resnet18", "trainer.epochs=1", cwd=tmp_path),
            "no space left on the device",
        )
        assert "previous version of that file is intact" in proc.stderr
        assert checkpoint.load(run_dir / "last.pt")["best_epoch"] == 1
        assert not (run_dir / "best.pt").exists() and not list(run_dir.glob(".*.tmp"))
        # Space freed, the run resumed: best.pt is rebuilt from last.pt, which ranked it.
        subprocess.run(["mount", "-o", "remount,size=300m", str(disk)], check=True)
        assert train_in_process(run_dir, f"trainer.resume={run_dir}")["best_epoch"] == 1
        rundir.release(run_dir)  # the run's lock, held by this process (the mount is in use)
        assert "best.pt: rebuilt from last.pt" in capsys.readouterr().err
        assert checkpoint.load(run_dir / "best.pt")["epoch"] == 1
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
