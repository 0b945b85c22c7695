"""The `auto` thread and worker rules: pure functions of (cores, ranks on the node)."""

from __future__ import annotations

import math
import os

import pytest

from powergrad import resources
from powergrad.resources import (
    auto_threads,
    auto_workers,
    available_cores,
    cgroup_cpu_limit,
    cores_per_rank,
    local_world_size,
)


@pytest.mark.parametrize(
    ("cores", "ranks", "share"),
    [(1, 1, 1), (2, 1, 2), (2, 2, 1), (2, 4, 1), (16, 4, 4), (18, 4, 4), (64, 8, 8)],
)
def test_cores_per_rank_is_the_floor_share_and_at_least_one(cores, ranks, share):
    assert cores_per_rank(cores, ranks) == share


@pytest.mark.parametrize(("cores", "ranks"), [(0, 1), (2, 0), (-1, 1)])
def test_cores_per_rank_rejects_nonpositive_counts(cores, ranks):
    with pytest.raises(ValueError, match="must be >= 1"):
        cores_per_rank(cores, ranks)


def test_available_cores_takes_the_affinity_capped_by_the_quota_rounded_up():
    assert available_cores(affinity=8, quota=None) == 8
    assert available_cores(affinity=8, quota=2.0) == 2
    assert available_cores(affinity=8, quota=1.5) == 2  # a fractional quota still runs 2
    assert available_cores(affinity=2, quota=16.0) == 2
    assert available_cores(affinity=4, quota=0.2) == 1


def test_available_cores_on_this_machine_is_within_the_affinity_mask():
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_and_unlimited(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    assert cgroup_cpu_limit(tmp_path) == 4.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None


@pytest.mark.parametrize(("value", "ranks"), [(None, 1), ("4", 4), ("0", 1), ("x", 1)])
def test_local_world_size_reads_torchrun_env(monkeypatch, value, ranks):
    if value is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
    assert local_world_size() == ranks


# (cores on the node, ranks on the node) -> (threads, workers) per rank, CPU training.
CPU_TABLE = [
    ((1, 1), (1, 0)),
    ((2, 1), (2, 1)),  # the main job on a 2-core machine
    ((2, 2), (1, 0)),
    ((4, 1), (4, 1)),
    ((8, 1), (8, 1)),
    ((9, 1), (9, 2)),
    ((16, 1), (16, 2)),
    ((17, 1), (17, 3)),
    ((8, 2), (4, 1)),
    ((16, 4), (4, 1)),
    ((3, 4), (1, 0)),
]


@pytest.mark.parametrize(("node", "expected"), CPU_TABLE)
def test_cpu_rule_table(node, expected):
    cores, ranks = node
    assert (auto_threads(ranks, cores), auto_workers(ranks, cores)) == expected


@pytest.mark.parametrize(
    ("cores", "ranks"), [(c, r) for c in range(1, 65) for r in (1, 2, 3, 4, 8)]
)
def test_cpu_rule_uses_the_share_and_one_worker_per_eight_cores(cores, ranks):
    share = cores_per_rank(cores, ranks)
    threads, workers = auto_threads(ranks, cores), auto_workers(ranks, cores)
    assert threads == share
    assert workers == (0 if share == 1 else math.ceil(share / 8))
    # The ranks' threads never exceed the node's cores; workers are at most 1 per 4 cores + 1.
    assert threads * ranks <= cores or share == 1
    assert workers <= 1 + share // 4


@pytest.mark.parametrize(("cores", "ranks"), [(c, r) for c in range(1, 33) for r in (1, 2, 4, 8)])
def test_accelerator_rule_gives_the_loader_the_share(cores, ranks):
    """With a GPU the CPU only feeds it: one intra-op thread, the rest of the share decodes."""
    share = cores_per_rank(cores, ranks)
    assert auto_threads(ranks, cores, accelerator=True) == 1
    assert auto_workers(ranks, cores, accelerator=True) == max(1, share - 1)


def test_defaults_read_this_machine(monkeypatch):
    monkeypatch.setattr(resources, "available_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert (auto_threads(), auto_workers()) == (auto_threads(1, 2), auto_workers(1, 2))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert (auto_threads(), auto_workers()) == (1, 0)


def test_omp_env_asks_for_passive_waiting():
    assert resources.OMP_ENV == {"OMP_WAIT_POLICY": "PASSIVE"}
