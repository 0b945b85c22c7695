"""DDP on CPU: real torchrun with gloo against a single process with the same global batch.

The equivalence uses ResNet-18 without normalization (the paper's Table 2 model): with
BatchNorm, DDP computes per-rank batch statistics (no SyncBN), so 2 x 32 images normalized
separately are not 64 normalized together and the weights legitimately differ. Without BN the
only difference is the order of floating-point sums (gradient all-reduce), hence allclose.
"""

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_train

from powergrad import distributed as pgdist
from powergrad.config import ConfigError, validate_train
from powergrad.data.digits import materialize_digits
from powergrad.data.sampling import epoch_permutation, rank_batches, shard_range, sharded_order

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "model=resnet18_nonorm",
    "method=pgt",
    "method.alpha=0.25",
    "trainer.epochs=1",
    "trainer.warmup_epochs=0",
    "trainer.batch_size=64",  # global: 2 ranks x 32, or 1 process x 64
    "trainer.threads=1",
    "trainer.progress=false",
    "loader.workers=0",
    "logger=none",
]


def test_union_of_rank_batches_is_the_single_process_batch():
    order = epoch_permutation(1437, seed=0, epoch=3)
    single = rank_batches(order, 64, rank=0, world_size=1).reshape(-1, 64)
    ranks = [rank_batches(order, 32, rank=r, world_size=2).reshape(-1, 32) for r in range(2)]
    # 1437 // 2 // 32 = 22 steps on two ranks, 1437 // 64 = 22 steps on one.
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 22
    for b in range(22):
        assert np.array_equal(np.concatenate([ranks[0][b], ranks[1][b]]), single[b])
    # DALI's reader splits a list into contiguous shards: the layout it is given matches.
    laid_out = sharded_order(order, 32, 2)
    for r in range(2):
        start, stop = shard_range(len(laid_out), r, 2)
        assert np.array_equal(laid_out[start:stop], rank_batches(order, 32, r, 2))


def test_torchrun_variables_win_over_the_submitit_job(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    # Under a submitit SLURM job the ranks are SLURM's task ids.
    assert pgdist.env_world() == (5, 8, 1) and pgdist.launcher() == "submitit"
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert pgdist.env_world() == (2, 4, 0) and pgdist.launcher() == "torchrun"


def test_srun_step_rendezvous_from_slurms_variables():
    # What SLURM 22.05 sets in task 1 of `srun -n 4` on two nodes (tests/test_slurm.py runs
    # the real thing): torchrun's variables, the same MASTER_ADDR / MASTER_PORT in every task.
    env = {
        "SLURM_JOB_ID": "812",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NODELIST": "gpu[007-008]",
    }
    rendezvous = pgdist.srun_rendezvous(env)
    port = rendezvous.pop("MASTER_PORT")
    assert rendezvous == {
        "MASTER_ADDR": "gpu007",
        "RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
    }
    assert port == pgdist.srun_rendezvous({**env, "SLURM_PROCID": "3"})["MASTER_PORT"]
    assert 20000 <= int(port) <= 60000
    assert port != pgdist.srun_rendezvous({**env, "SLURM_STEP_ID": "1"})["MASTER_PORT"]
    assert pgdist.srun_rendezvous({**env, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    hosts = ["vm", "gpu[003-010,012],cpu1", "rack[1-2]-n[05-06],x", "a1,a2"]
    assert [pgdist.first_host(h) for h in hosts] == ["vm", "gpu003", "rack1-n05", "a1"]


@pytest.mark.parametrize(
    ("local_rank", "visible", "index"),
    [(0, 1, 0), (3, 1, 0), (3, 4, 3), (0, 8, 0), (7, 8, 7)],
)
def test_device_is_the_local_ranks_gpu_or_the_only_one_visible(local_rank, visible, index):
    # srun --gpus-per-task=1 (or GPU binding) shows each task one GPU: cuda:0, not cuda:3.
    assert pgdist.cuda_index(local_rank, visible) == index


def test_a_rank_without_a_gpu_of_its_own_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ConfigError) as e:
        pgdist.cuda_index(3, 2)
    assert "local rank 3" in str(e.value) and "CUDA_VISIBLE_DEVICES=2,3" in str(e.value)
    assert "\n" not in str(e.value)


def _small_odd_digits(tmp_path):
    """32 train images per class (320: 5 steps of 64) and 359 val images (not divisible by 2).

    Few steps on purpose: at this learning rate the non-BN network amplifies float rounding
    (a single process with 2 threads instead of 1 differs by ~1e-2 after 22 steps); over 5
    steps reordered sums stay at float noise, so a real data or gradient mismatch stands out.
    """
    src, root = materialize_digits(), tmp_path / "digits"
    shutil.copytree(src / "val", root / "val")
    sorted((root / "val").glob("*/*"))[0].unlink()
    for label in sorted(p.name for p in (src / "train").iterdir()):
        (root / "train" / label).mkdir(parents=True)
        for f in sorted((src / "train" / label).iterdir())[:32]:
            shutil.copy(f, root / "train" / label / f.name)
    return root


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "SUBMITIT_EXECUTOR": ""}


def run_ddp_beside_single(tmp_path, common, ddp_extra=()):
    """`train.py COMMON` once as one process (run dir tmp_path/single) and at the same time
    under a 2-rank torchrun (+ ddp_extra; started in tmp_path/ddp, so its run lands under
    ddp/outputs/); asserts both succeeded, returns (single run dir, torchrun's cwd)."""
    ddp_cwd, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_cwd.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = subprocess.Popen(
        [*torchrun, str(ROOT / "train.py"), *common, *ddp_extra],
        cwd=ddp_cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    single = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *common, f"hydra.run.dir={single_dir}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out, _ = ddp.communicate(timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert ddp.returncode == 0, out[-3000:]
    return single_dir, ddp_cwd


@pytest.mark.slow
def test_two_rank_torchrun_matches_one_process_with_the_same_global_batch(tmp_path):
    data = _small_odd_digits(tmp_path)
    common = [*ARGS, f"data.root={data}"]
    single_dir, ddp_cwd = run_ddp_beside_single(tmp_path, common)

    # Both ranks used rank 0's run directory: exactly one run under outputs/.
    (ddp_dir,) = [p.parent for p in ddp_cwd.glob("outputs/*/*/summary.json")]
    a = torch.load(single_dir / "last.pt", weights_only=True)
    b = torch.load(ddp_dir / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 320 // 64 and b["world_size"] == 2
    # Per-rank random streams, each saved for an exact resume.
    assert len(a["rng"]) == 1 and len(b["rng"]) == 2
    assert not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    sa = json.loads((single_dir / "summary.json").read_text())
    sb = json.loads((ddp_dir / "summary.json").read_text())
    # Validation: 359 images over 2 ranks (180 + 179), each counted once.
    assert sa["val_images"] == sb["val_images"] == 359
    assert sb["world_size"] == 2 and sb["batch_size"] == 64
    assert sa["train_loss"] == pytest.approx(sb["train_loss"], rel=1e-4)
    assert sa["val_loss"] == pytest.approx(sb["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_two_rank_torchrun_multirun_uses_one_sweep_directory(tmp_path):
    # Every rank runs Hydra's launcher; ranks > 0 used to create their own pid-stamped
    # multirun/DATE/TIME_PID-RAND folders. Rank 0's is the sweep's, the others go to a temp dir.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    tiny = [o for o in TINY if not o.startswith("trainer.batch_size")]
    proc = subprocess.run(
        [*torchrun, str(ROOT / "train.py"), "-m", *tiny, "trainer.batch_size=16", "seed=0,1"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sweeps = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    assert len(sweeps) == 1, sweeps
    summaries = sorted(sweeps[0].glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["world_size"] for p in summaries} == {2}
    assert not (tmp_path / "outputs").exists()


def test_init_kwargs_bind_nccl_to_the_ranks_gpu_and_set_the_timeout():
    gpu = pgdist.init_process_group_kwargs(torch.device("cuda", 3), timeout_min=45)
    assert gpu == {
        "backend": "nccl",
        "init_method": "env://",
        "timeout": datetime.timedelta(minutes=45),
        "device_id": torch.device("cuda", 3),
    }
    cpu = pgdist.init_process_group_kwargs(torch.device("cpu"), timeout_min=30)
    assert cpu == {
        "backend": "gloo",
        "init_method": "env://",
        "timeout": datetime.timedelta(minutes=30),
    }


def test_a_timeout_that_is_not_positive_is_refused():
    with pytest.raises(ConfigError, match=r"^trainer\.dist_timeout_min=0\.0: must be > 0"):
        validate_train(compose_train(*TINY, "trainer.dist_timeout_min=0"))
