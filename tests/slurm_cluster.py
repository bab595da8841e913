"""A real Slurm cluster on this machine, for tests: munged, slurmctld and one slurmd per node.

Everything the daemons write (config, munge key and socket, state, spool, logs, pid files) lives
in one folder; `SLURM_CONF` points Slurm's commands at it, so nothing under /etc is touched.
Several slurmd daemons with their own node names (`slurmd -N n1`) and ports make a multi-node
cluster on one machine. `stop()` ends what `start()` began, by the PIDs the daemons wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo")
# Job states after which a job does not run again (a requeued job passes through REQUEUED and
# PENDING instead).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def ensure_installed() -> str | None:
    """Install Debian's slurm-wlm and munge if missing; return why they cannot be had, or None."""
    if all(_find(n) for n in DAEMONS + COMMANDS):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm and munge are not installed, and installing them needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed, and there is no apt-get to install them"
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"apt-get install slurm-wlm munge failed: {done.stderr.strip()[-500:]}"
    missing = [n for n in DAEMONS + COMMANDS if not _find(n)]
    return f"installed slurm-wlm and munge, but {missing} are still missing" if missing else None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_job(text: str) -> dict[str, str]:
    """`scontrol show job -o` output → {field: value} (values are single words in the fields
    tests read: JobState, ExitCode, Restarts, NodeList, ...)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmCluster:
    """A running cluster of `nodes` (names), each with `cpus` CPUs, all on 127.0.0.1."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus: int = 2) -> None:
        self.root = Path(root)
        self.nodes = nodes
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        # munged wants every folder above its socket open to all (pytest's tmp folders are not)
        # and a socket path under 108 bytes, hence a folder of its own directly in /tmp.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self._pid_files: list[Path] = []

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment pointed at this cluster, without any outer job's SLURM_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ---------------------------------------------------------------- daemons
    def start(self, timeout: float = 60.0) -> None:
        """Write the key and config, start munged, slurmctld and the slurmd of each node."""
        for sub in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge_dir = self.munge_dir
        munge_dir.chmod(0o755)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        pid = munge_dir / "munged.pid"
        self._run_daemon(
            [
                _find("munged"),
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={pid}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            pid,
        )
        self.conf.write_text(self._config())
        self._run_daemon([_find("slurmctld")], self.root / "slurmctld.pid")
        for node in self.nodes:
            self._run_daemon([_find("slurmd"), "-N", node], self.root / f"slurmd-{node}.pid")
        self._wait_idle(timeout)

    def _config(self) -> str:
        ports = [free_port() for _ in range(len(self.nodes) + 1)]
        r = self.root
        lines = [
            "ClusterName=pytest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ports[0]}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start (120 s
            # by default); the scheduler intervals make such a job start a second later.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "KillWait=5",
            "MailProg=/bin/true",
        ]
        for node, port in zip(self.nodes, ports[1:], strict=True):
            lines.append(
                f"NodeName={node} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                "RealMemory=2000 State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
            "State=UP"
        )
        return "\n".join(lines) + "\n"

    def _run_daemon(self, argv: list[str | None], pid_file: Path) -> None:
        """Start a daemon that forks into the background, and wait for its pid file."""
        done = subprocess.run([str(a) for a in argv], env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed to start: {done.stderr.strip()}")
        self._pid_files.append(pid_file)
        deadline = time.monotonic() + 20
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} wrote no pid file {pid_file}")
            time.sleep(0.1)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2], strict=False))
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, wait for them to go, then end the daemons by their pid files."""
        if self.conf.is_file():
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", check=False).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        for pid_file in reversed(self._pid_files):
            _terminate(pid_file)
        self._pid_files.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def logs(self) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for f in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    # ------------------------------------------------------------------- jobs
    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster."""
        return subprocess.run(
            list(argv),
            env=kwargs.pop("env", self.env),
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
            **kwargs,
        )

    def sbatch(self, script: str | Path, *flags: str, env: dict[str, str], cwd: Path) -> int:
        """Submit `script` from `cwd` with the environment `env` (built from `self.env`: the
        job inherits it); return the job id."""
        done = self.run("sbatch", "--parsable", *flags, str(script), env=env, cwd=cwd)
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        return parse_job(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout)

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a final state; return its record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(0.5)


def _terminate(pid_file: Path, timeout: float = 15.0) -> None:
    """SIGTERM the process named in `pid_file`, then SIGKILL if it outlives `timeout`."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: its parent is not us to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
