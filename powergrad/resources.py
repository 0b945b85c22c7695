"""How many CPU threads and loader workers a rank gets: the ``auto`` rules (issue 14 item 3).

The rules are pure functions of two numbers, the cores this process may use and the ranks
sharing them on the node, so they are tested without touching the machine:

- :func:`available_cores`: the CPUs of the process's affinity mask (``os.sched_getaffinity``:
  taskset, SLURM ``--cpus-per-task``, docker ``--cpuset-cpus``), capped by the cgroup CPU quota
  (``/sys/fs/cgroup/cpu.max`` on cgroup v2, ``cpu.cfs_quota_us / cpu.cfs_period_us`` on v1;
  docker ``--cpus``, Kubernetes limits), rounded up. ``os.cpu_count()`` sees neither.
- :func:`local_world_size`: ``LOCAL_WORLD_SIZE`` (torchrun), else 1.
- :func:`auto_threads` / :func:`auto_workers`: see their docstrings for the rule and the
  measurement behind it (scripts/profile_main.py --sections job; results/bench/).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = [
    "CORES_PER_WORKER",
    "OMP_ENV",
    "auto_threads",
    "auto_workers",
    "available_cores",
    "cgroup_cpu_limit",
    "cores_per_rank",
    "local_world_size",
    "resolve",
]

# CPU training: one loader worker per this many cores of the rank's share (see auto_workers).
CORES_PER_WORKER = 8
# Set before torch is first imported (libgomp reads it once): see auto_threads.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = Path("/sys/fs/cgroup/cpu")


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """CPUs allowed by the cgroup CPU quota (quota / period), or None when unlimited or unknown.

    ``root``: the cgroup filesystem (default /sys/fs/cgroup; tests pass a temporary folder).
    """
    base = root or _CGROUP_V2.parent
    try:
        quota, period = (base / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        v1 = base / "cpu" if root else _CGROUP_V1
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cores(affinity: int | None = None, quota: float | None = None) -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup quota (rounded up).

    Arguments given explicitly replace the machine's values (for tests).
    """
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    if quota is None:
        quota = cgroup_cpu_limit()
    cores = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, cores)


def local_world_size() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE; 1 when not launched by torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cores_per_rank(cores: int, ranks_on_node: int) -> int:
    """Each rank's even share of the node's cores, at least 1."""
    if cores < 1 or ranks_on_node < 1:
        raise ValueError(f"cores={cores}, ranks_on_node={ranks_on_node}: both must be >= 1")
    return max(1, cores // ranks_on_node)


def _share(world_size_on_node: int | None, cores: int | None) -> int:
    ranks = world_size_on_node or local_world_size()
    return cores_per_rank(cores or available_cores(), ranks)


def auto_workers(
    world_size_on_node: int | None = None, cores: int | None = None, *, accelerator: bool = False
) -> int:
    """DataLoader worker processes for one rank (``loader.workers: auto``).

    Rule, with ``share = cores // ranks_on_node`` (at least 1):

    - CPU training: ``0`` when ``share == 1``, else ``1 + (share - 1) // CORES_PER_WORKER``
      (one worker per 8 cores: 1 on 2..8 cores, 2 on 9..16). The model, not the loader, is
      the bottleneck on a CPU: on the digits main job a ResNet-18 step costs ~0.34 s of CPU per
      128 images, the torch loader ~0.2 ms per image (read + decode 0.06, seeding 0.01, crop
      0.05; scripts/profile_main.py --sections threads,parts), so one worker keeps up with ~8
      cores of training and sleeps otherwise (prefetch queue full). Measured on 2 cores
      (scripts/profile_main.py --sections job, 3 alternating rounds, quiet machine,
      results/bench/profile_job.json): threads 2 + 1 worker (PASSIVE) trains 1.50x [1.45,
      1.56] as fast as the old default threads 1 + 2 workers; threads 2 + 0 workers 1.47x
      [1.46, 1.49] (the loader's work lands on the training process).
    - With an accelerator: ``share - 1`` (at least 1): the CPU only decodes and augments,
      one core stays with the process that feeds the device. Not measured here.
    """
    share = _share(world_size_on_node, cores)
    if accelerator:
        return max(1, share - 1)
    return 0 if share == 1 else 1 + (share - 1) // CORES_PER_WORKER


def auto_threads(
    world_size_on_node: int | None = None, cores: int | None = None, *, accelerator: bool = False
) -> int:
    """Intra-op CPU threads for one rank (``trainer.threads: auto``).

    Rule: CPU training: ``share = cores // ranks_on_node`` (at least 1), every core of the
    rank's share; the loader workers of :func:`auto_workers` sleep most of the time and are
    not subtracted. With an accelerator: 1 (the device computes; not measured here).

    Needs ``OMP_WAIT_POLICY=PASSIVE`` in the environment before torch is imported
    (:data:`OMP_ENV`): torch's libgomp otherwise spins waiting threads, and once anything else
    wants a core (a loader worker, another job) a 2-thread step collapses (an earlier,
    loaded-machine run of scripts/profile_main.py --sections threads: 6.0 s instead of 1.0 s
    at 1 thread under load ~5, 1.07 s with PASSIVE). Spinning only pays when the step has the
    cores to itself: on a quiet machine a step without a loader took 0.169 s active vs 0.199 s
    passive (results/bench/profile_threads.json), but the whole job, where the loader worker
    shares the cores, is fastest passive (results/bench/profile_job.json).
    """
    if accelerator:
        return 1
    return _share(world_size_on_node, cores)


def resolve(threads: int | str | None, workers: int | str, *, accelerator: bool) -> tuple:
    """``(trainer.threads, loader.workers)`` with ``auto`` replaced by :func:`auto_threads` /
    :func:`auto_workers` for this node's ranks; other values pass through."""
    ranks = local_world_size()
    if threads == "auto":
        threads = auto_threads(ranks, accelerator=accelerator)
    if workers == "auto":
        workers = auto_workers(ranks, accelerator=accelerator)
    return threads, workers
