"""Process-group setup from the launcher's environment, and the few collectives we need.

Where the ranks come from, first match wins:

1. torchrun (one node or many, also inside a SLURM allocation): RANK / WORLD_SIZE /
   LOCAL_RANK, plus MASTER_ADDR / MASTER_PORT read by ``env://``.
2. A submitit job (Hydra's ``submitit_slurm`` / ``submitit_local`` launchers, one task per GPU):
   submitit's job environment (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID under SLURM), with
   MASTER_ADDR = the job's first node and MASTER_PORT derived from the job id, exported by
   :class:`submitit.helpers.TorchDistributedEnvironment` before ``env://`` reads them.
3. The tasks of a plain ``srun`` step (``srun -n 8 python train.py ...``): SLURM_PROCID /
   SLURM_STEP_NUM_TASKS / SLURM_LOCALID, with MASTER_ADDR = the step's first node and
   MASTER_PORT derived from the job and step ids (as submitit does), see
   :func:`srun_rendezvous`. Only a step's tasks are ranks: ``python train.py`` in a batch
   script of ``--ntasks=4`` is one process (SLURM_NTASKS=4 there, but no SLURM_STEP_ID).
4. None of these: a single process, and every helper is a no-op.

The device: CPU, or ``cuda:LOCAL_RANK`` when the process sees all of its node's GPUs, or
``cuda:0`` when SLURM gave the task its own GPU (``--gpus-per-task=1``), see
:func:`cuda_index`.

No custom launcher. Rank 0 alone logs and writes files.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "cuda_index",
    "env_world",
    "first_host",
    "gather_objects",
    "in_submitit_job",
    "init_process_group_kwargs",
    "is_main",
    "launcher",
    "rank",
    "setup",
    "srun_rendezvous",
    "world_size",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that logs and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is active."""
        return self.world_size > 1


def _torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def in_submitit_job() -> bool:
    """True inside a job started by submitit (Hydra's submitit launchers), on any rank."""
    # Set by submitit in every task of a job it started (values: "slurm", "local").
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def _srun_step() -> bool:
    # SLURM sets SLURM_STEP_ID in the tasks of an srun step only, not in a batch script, so a
    # `python train.py` in an sbatch script of --ntasks=4 (SLURM_NTASKS=4) stays one process.
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank): torchrun's variables, else the submitit job's tasks,
    else the srun step's tasks, else (0, 1, 0)."""
    if _torchrun():
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    if in_submitit_job():
        from submitit import JobEnvironment

        job = JobEnvironment()
        return job.global_rank, job.num_tasks, job.local_rank
    if _srun_step():
        env = os.environ
        return (
            int(env["SLURM_PROCID"]),
            int(env["SLURM_STEP_NUM_TASKS"]),
            int(env.get("SLURM_LOCALID", "0")),
        )
    return 0, 1, 0


def launcher() -> str:
    """Who started this process: ``torchrun``, ``submitit``, ``srun`` (a plain srun step of
    several tasks) or ``single``."""
    if _torchrun():
        return "torchrun"
    return "submitit" if in_submitit_job() else "srun" if _srun_step() else "single"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[003-010,012],cpu1`` -> ``gpu003``, parsed as
    submitit parses it for its own rendezvous (SlurmJobEnvironment.hostnames)."""
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)[0]


def srun_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task of a plain srun step, from SLURM's ``env``.

    MASTER_ADDR is the step's first node; MASTER_PORT is kept when set, else drawn in
    [20000, 60000] from the job and step ids (every task draws the same; two steps of one
    job, such as two ``srun`` lines of a batch script running at once, draw different ones),
    as submitit's TorchDistributedEnvironment does from the job id.
    """
    job, step = env["SLURM_JOB_ID"], env["SLURM_STEP_ID"]
    port = env.get("MASTER_PORT") or str(random.Random(f"{job}.{step}").randint(20000, 60000))
    nodes = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    return {
        "MASTER_ADDR": first_host(nodes),
        "MASTER_PORT": port,
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device index for a rank, from the number of GPUs this process can see.

    One visible GPU (``srun --gpus-per-task=1``, GPU binding): 0, whatever the local rank.
    Several (torchrun, ``--gpus-per-node=N``): the local rank's. A local rank beyond them
    raises ConfigError naming CUDA_VISIBLE_DEVICES and the local rank.
    """
    from powergrad.config import ConfigError

    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise ConfigError(
        f"local rank {local_rank} has no GPU of its own: this process sees {visible} "
        f"(CUDA_VISIBLE_DEVICES={devices}); give each task one GPU (srun --gpus-per-task=1) "
        "or every task all of its node's GPUs"
    )


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA (this rank's GPU, :func:`cuda_index`) when available, else CPU;
    ``cpu`` / ``cuda`` forced."""
    from powergrad.config import ConfigError

    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but CUDA is not available; use trainer.device=cpu")
    return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))


# torch's own default for gloo; NCCL's is 10 minutes. Every collective waits at most this long
# for the slowest rank (trainer.dist_timeout_min), including the start-up barrier behind which
# each node's local rank 0 checks the dataset (powergrad.data.layout.check_dataset_per_node).
DEFAULT_TIMEOUT_MIN = 30.0


def init_process_group_kwargs(device: torch.device, timeout_min: float) -> dict[str, Any]:
    """Keyword arguments of ``torch.distributed.init_process_group`` for a rank on ``device``.

    NCCL on CUDA with ``device_id`` (the communicator is created now, bound to this rank's GPU,
    instead of lazily at the first collective, and barriers know their device: no "guessing
    device" warning); gloo on CPU. ``env://`` rendezvous; ``timeout_min`` minutes for any one
    collective (``device`` must carry its index, as :func:`pick_device`'s does).
    """
    kwargs: dict[str, Any] = {
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "init_method": "env://",
        "timeout": datetime.timedelta(minutes=timeout_min),
    }
    if device.type == "cuda":
        kwargs["device_id"] = device
    return kwargs


def setup(device_preference: str = "auto", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistInfo:
    """Pick the device and, when the job has more than one rank, join the process group.

    Backend: NCCL on GPU, gloo on CPU (:func:`init_process_group_kwargs`); ``timeout_min``
    bounds every collective. Idempotent: a second call reuses the group.
    """
    if not _torchrun() and in_submitit_job() and env_world()[1] > 1:
        from submitit.helpers import TorchDistributedEnvironment

        # Every task of the job derives the same MASTER_ADDR (first node) and MASTER_PORT
        # (seeded by the job id); CUDA_VISIBLE_DEVICES is left alone (pick_device).
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    elif not _torchrun() and _srun_step():
        os.environ.update(srun_rendezvous(os.environ))  # then env:// reads them like torchrun's
    rank, world_size, local_rank = env_world()
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(**init_process_group_kwargs(device, timeout_min))
    return DistInfo(rank, world_size, local_rank, device)


def cleanup() -> None:
    """Leave the process group, if one is active."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (or without a process group)."""
    return not _active() or dist.get_rank() == 0


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (counts and sums; no-op on one rank)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks in place (no-op on one rank)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op on one rank)."""
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. the run directory, the wandb id)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` on one rank)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
