"""A real one-node SLURM cluster for the tests, started and stopped by the test session.

munged, slurmctld and slurmd from Debian's packages (``apt-get install slurm-wlm munge``), each
in the foreground as a child of the test process, with everything in one temporary folder: the
munge key and socket, slurm.conf, free TCP ports, state / spool / log / pid files. A cluster
already running on the machine is not touched: the clients (sbatch, srun, scontrol, submitit's
calls to them) find this one through ``SLURM_CONF`` in :attr:`SlurmCluster.env`.

Settings that differ from a production cluster, each for test speed only:

- ``cred_expire=10``: a requeued job may start again after cred_expire + 1 s (SLURM's default
  is 120 s, which would make every requeue test wait two minutes);
- ``sched_interval=1``: the scheduler looks at pending jobs every second (default 60 s), so a
  requeued job starts as soon as it may;
- ``OverSubscribe=FORCE:4``: up to 4 jobs share a CPU, so the tests' jobs run side by side on a
  2-core machine instead of queueing behind each other;
- no accounting (no slurmdbd): ``sacct`` answers "accounting storage is disabled", so
  submitit sees a job's end only through its result file (see tests/test_slurm.py).
"""

from __future__ import annotations

import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
# Where Debian installs the daemons (not on a non-root PATH).
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_binaries() -> list[str]:
    """The SLURM / munge programs this machine lacks (empty when a cluster can start)."""
    return [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (held open until all are
    picked, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM), run in the child before exec: a daemon gets
    # SIGTERM when the test process dies without reaching stop() (SIGKILL, a CI time-out).
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def clean_environment() -> dict[str, str]:
    """This process's environment without SLURM's or submitit's job variables (the tests may
    themselves run inside a SLURM job; the jobs they start must see only their own)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SUBMITIT_"))
    }


class SlurmCluster:
    """One node (this machine, named by its host name), one partition ``debug``.

    Args:
        root: an empty folder for everything the cluster writes.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        self.env = {**clean_environment(), "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        for sub in ("munge", "key", "ctld", "spool", "log", "run"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket folder that others cannot traverse, and a key others can read.
        for path in (r, r / "munge", r / "log"):
            path.chmod(0o755)
        (r / "key").chmod(0o700)
        key = r / "key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, slurmd_port = _free_ports(2)
        user = getpass.getuser()
        self.munge_socket = r / "munge" / "munge.socket"
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=powergrad-test",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire: a requeued job may start again after 11 s (default 121 s).
                    f"AuthInfo=socket={self.munge_socket},cred_expire=10",
                    f"StateSaveLocation={r / 'ctld'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.logs / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=sched_interval=1",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "MinJobAge=3600",  # finished jobs stay in scontrol for the session's checks
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE "
                    "State=UP OverSubscribe=FORCE:4",
                    "",
                ]
            )
        )

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.out", "ab")  # noqa: SIM115 (closed with the process)
        self._procs[name] = subprocess.Popen(
            [_which(name), *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C to pytest reaches pytest, which stops us in order
            preexec_fn=_die_with_parent,
        )
        log.close()

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        """Write the configuration, start the three daemons and wait until the node is idle."""
        try:
            # Jobs find their rendezvous (MASTER_ADDR) by this name, from SLURM's node list.
            socket.gethostbyname(self.node)
        except OSError as e:
            raise RuntimeError(
                f"host name {self.node!r} does not resolve ({e}); add it to /etc/hosts"
            ) from None
        self._write_config()
        r = self.root
        self._daemon(
            "munged",
            "--foreground",
            f"--socket={self.munge_socket}",
            f"--key-file={r / 'key' / 'munge.key'}",
            f"--seed-file={r / 'key' / 'munged.seed'}",
            f"--pid-file={r / 'run' / 'munged.pid'}",
            f"--log-file={self.logs / 'munged.log'}",
        )
        self._wait(lambda: self.munge_socket.exists(), timeout_s, "munged's socket")
        self._daemon("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._daemon("slurmd", "-D", "-N", self.node, "-f", str(self.conf))
        self._wait(lambda: self.node_state() == "idle", timeout_s, f"node {self.node} idle")
        return self

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon's log, for error messages."""
        out = []
        for path in sorted(self.logs.glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command (``scontrol``, ``squeue``, ...) against this cluster."""
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60
        )

    def node_state(self) -> str:
        """``idle``, ``mix``, ``alloc``, ``down``, ... (``""`` while slurmctld is not up)."""
        proc = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields for one job (finished jobs stay for MinJobAge);
        empty once SLURM forgot it."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode:
            return {}
        return dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)

    def job_ids(self) -> list[str]:
        """Every job SLURM still lists as pending or running (array tasks as ``ID_N``)."""
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def cancel(self, job_ids: list[str]) -> None:
        """End these jobs now, pending or running: cancelled (no requeue), processes killed."""
        self.run("scancel", *job_ids, check=False)
        self.run("scancel", "--signal=KILL", "--full", *job_ids, check=False)

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by PID (SIGTERM, then
        SIGKILL after 10 s)."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.cancel(sorted(set(jobs)))
                deadline = time.monotonic() + 20
                while self.job_ids() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_cluster() -> SlurmCluster:
    """A started cluster in a fresh folder under the system's temp dir (not pytest's, whose
    0700 parents munged refuses for its socket)."""
    root = Path(tempfile.mkdtemp(prefix="powergrad-slurm-"))
    cluster = SlurmCluster(root)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
