"""Preemption: finish the step in flight, agree across ranks, checkpoint, exit to be requeued.

Signals: SIGTERM (SLURM preemption, ``scancel``, torchrun forwarding its own SIGTERM), SIGUSR1
(``sbatch --signal=USR1@120``) and, inside a submitit job, submitit's own signal (USR2 unless
$SUBMITIT_PREEMPT_SIGNAL says otherwise; sent ``signal_delay_s`` before the time limit). The
handler only records the signal; the training loop polls it between steps.

Agreement: a single process reads the flag every step (a Python attribute, free). With several
ranks the flag is all-reduced (max) every ``trainer.preempt_check_every_steps`` steps and at each
epoch end: one 4-byte collective and host sync every N steps instead of every step, at the
cost of up to N - 1 more steps before stopping (well inside SLURM's warning time). All ranks
poll at the same steps, so they stop at the same step and write one consistent checkpoint.

Then rank 0 writes :data:`MARKER` next to ``last.pt`` and every rank raises :class:`Preempted`.
train.py turns that into the exit, see :func:`exit_for_requeue`:

- submitit's signal inside a submitit job (Hydra's ``submitit_slurm`` / ``submitit_local``
  launchers; SLURM sends it ``signal_delay_s`` before the time limit, or ``scancel
  --signal=USR2 JOB``): rank 0 hands over to submitit's handler, which resubmits the same Hydra
  job (``scontrol requeue`` under SLURM, up to ``max_num_timeout`` times for time limits; the
  local executor restarts it) and exits; other ranks exit 0. The requeued job gets the same run
  directory, finds the marker and resumes from ``last.pt``, continuing the same wandb run (its
  id is in the checkpoint).
- SIGTERM or SIGUSR1 (``scancel JOB``, SLURM preemption, torchrun, plain python): every rank
  exits with :data:`EXIT_PREEMPTED` (3) and nothing is requeued by us: after ``scancel`` the
  job stays ended; a partition with ``PreemptMode=REQUEUE`` requeues it itself, and the
  requeued job resumes from the marker. Running the same command with the same
  ``hydra.run.dir`` (or ``trainer.resume=RUN_DIR``) continues.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from powergrad import distributed as pgdist
from powergrad.fileio import atomic_write

__all__ = ["EXIT_PREEMPTED", "MARKER", "Preempted", "PreemptionWatcher", "exit_for_requeue"]

# Exit status of every rank after a preemption checkpoint outside submitit (torchrun reports
# it per worker and exits 1 itself; the marker file is the reliable sign).
EXIT_PREEMPTED = 3
# Written by rank 0 beside last.pt when a run stopped for preemption; a start that finds it in
# its run directory resumes instead of refusing the directory.
MARKER = "preempted.json"


class Preempted(Exception):
    """Training stopped on a preemption signal after writing ``last.pt``."""

    def __init__(self, signum: int, step: int, run_dir: Path, requeue: Any = None) -> None:
        self.signum, self.step, self.run_dir, self.requeue = signum, step, run_dir, requeue
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint in {run_dir}")


def _submitit_signal() -> int | None:
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    from submitit import JobEnvironment

    return JobEnvironment._usr_sig()


class PreemptionWatcher:
    """Records preemption signals while active (a context manager) and decides when to stop.

    Args:
        info: this process's place in the job.
        check_every_steps: with several ranks, agree on the flag every N optimizer steps.
    """

    def __init__(self, info: pgdist.DistInfo, check_every_steps: int = 10) -> None:
        self.info = info
        self.every = max(1, check_every_steps)
        self.signum = 0  # signal received by this rank (0: none); written by the handler only
        self.agreed = 0  # signal the ranks agreed to stop on (0: keep training)
        self._previous: dict[int, Any] = {}
        self._submitit_sig = _submitit_signal()
        self._requeue = None  # submitit's checkpoint-and-requeue handler, inside a submitit job

    def __enter__(self) -> PreemptionWatcher:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        signums = {signal.SIGTERM, signal.SIGUSR1}
        if self._submitit_sig is not None:
            signums.add(self._submitit_sig)
            self._requeue = signal.getsignal(self._submitit_sig)
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: Any) -> None:
        if not self.signum:
            self.signum = signum
            message = (
                f"rank {self.info.rank}: {signal.Signals(signum).name} received; stopping after "
                "the step in flight and writing a checkpoint\n"
            )
            # os.write, not print: the handler may interrupt a write to sys.stderr (tqdm), and
            # re-entering its buffered writer raises RuntimeError.
            with contextlib.suppress(OSError, ValueError):
                os.write(sys.stderr.fileno(), message.encode())

    def should_stop(self, step: int | None) -> bool:
        """True on every rank once any rank got a signal; ``step=None`` forces a poll now.

        A collective when distributed: every rank must call it at the same steps.
        """
        if not self.info.distributed:
            self.agreed = self.signum
            return bool(self.agreed)
        if step is not None and step % self.every:
            return False
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self.info.device)
        # Into a separate attribute: a signal handled while the collective runs must not be
        # overwritten by this rank's older flag (it is then seen at the next poll).
        self.agreed = int(pgdist.all_reduce_max(flag).item())
        return bool(self.agreed)

    def stop(self, run_dir: Path, step: int) -> None:
        """After the checkpoint: rank 0 writes the marker, then every rank raises Preempted."""
        if self.info.is_main:
            name = signal.Signals(self.agreed).name
            record = {"signal": name, "step": step, "time": time.time()}
            atomic_write(run_dir / MARKER, json.dumps(record) + "\n")
        pgdist.barrier()  # the marker exists before any rank exits
        # Only submitit's own signal asks for a requeue: SIGTERM is also what `scancel` sends,
        # and `scontrol requeue` would bring a cancelled job back.
        requeue = self._requeue if self.agreed == self._submitit_sig else None
        raise Preempted(self.agreed, step, run_dir, requeue)


def exit_for_requeue(e: Preempted) -> None:
    """Leave the process after a preemption checkpoint (see the module docstring); never returns."""
    if callable(e.requeue):
        if pgdist.env_world()[0] == 0:
            # submitit: resubmit this Hydra job (same overrides, same run dir), then exit.
            e.requeue(e.signum, None)
        sys.exit(0)
    sys.exit(EXIT_PREEMPTED)
