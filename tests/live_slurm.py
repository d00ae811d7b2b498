"""A real single-node SLURM on this machine, for the cluster test (Debian's slurm-wlm and munge).

Loopback only; one node with twice the machine's CPUs (CPU_OVERCOMMIT) and two GPUs backed by
dummy device files; a `cpu` and a `gpu` partition (the names profiles/slurm uses). Facts of these
machines that the configuration answers: no systemd and no usable cgroups (proctrack/linuxproc,
task/none); `--gpus` needs select/cons_tres; the executor plugin strips SLURM_* variables inside
jobs, so the configuration must sit at the default /etc/slurm/slurm.conf; without accounting only
`squeue` can report job states, which needs finished jobs kept (a large MinJobAge); without
DefMemPerCPU every job would take the whole node's memory and jobs would run one at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

MARKER = "# Written by the wsiattack test suite (tests/live_slurm.py); removed when the test ends."
CONF_DIR = Path("/etc/slurm")
MUNGE_SOCKET_DIR = Path("/run/munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "srun")
GPUS_PER_NODE = 2
NODE_MEM_MB = 8000
# Job slots per core: jobs here are mostly start-up and waiting (sbatch, srun, status polls), so
# the node declares more CPUs than it has (SlurmdParameters=config_overrides) to overlap them.
CPU_OVERCOMMIT = 2


def unavailable_reason() -> str | None:
    """Why a live SLURM cannot run here, or None when it can."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=_SBIN_PATH) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmd and munged and writing /etc/slurm needs root"
    for name in ("slurm.conf", "gres.conf"):
        path = CONF_DIR / name
        if path.exists() and MARKER not in path.read_text(errors="replace"):
            return f"{path} exists and is not this test's: not touching a real cluster's configuration"
    if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
        return "a slurmctld is already running on this machine"
    return None


_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _binary(name: str) -> str:
    return shutil.which(name, path=_SBIN_PATH) or name


class LiveSlurm:
    """Start munged, slurmctld and slurmd in the foreground (PIDs kept); stop them by PID."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.node = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        self.written: list[Path] = []

    def __enter__(self) -> LiveSlurm:
        try:
            self._write_config()
            self._start_munge()
            self._start([_binary("slurmctld"), "-D", "-i"], "slurmctld")
            self._start([_binary("slurmd"), "-D"], "slurmd")
            self._wait_for_idle_node(timeout_s=60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for path in self.written:
            path.unlink(missing_ok=True)

    # -- set-up ---------------------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in ("state", "spool", "log", "dev"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        devices = [self.state_dir / "dev" / f"nvidia{i}" for i in range(GPUS_PER_NODE)]
        for device in devices:
            device.touch()
        cpus = (os.cpu_count() or 1) * CPU_OVERCOMMIT
        s = self.state_dir
        slurm_conf = f"""{MARKER}
ClusterName=wsiattack-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
DefMemPerCPU=1000
MinJobAge=86400
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={s}/jobcomp.txt
MpiDefault=none
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={NODE_MEM_MB} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN
PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={self.node} MaxTime=INFINITE State=UP
"""
        gres_conf = (
            f"{MARKER}\nAutoDetect=off\nNodeName={self.node} Name=gpu File={s}/dev/nvidia[0-{GPUS_PER_NODE - 1}]\n"
        )
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        for name, text in (("slurm.conf", slurm_conf), ("gres.conf", gres_conf)):
            path = CONF_DIR / name
            path.write_text(text)
            self.written.append(path)

    def _start_munge(self) -> None:
        if subprocess.run([_binary("munge"), "-n"], capture_output=True).returncode == 0:
            return  # a munged already answers (e.g. started by the system)
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        self._start([_binary("munged"), "-F"], "munged", user="munge")
        deadline = time.monotonic() + 20
        while subprocess.run([_binary("munge"), "-n"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("munged did not come up: " + self._log_tail("munged"))
            time.sleep(0.2)

    def _start(self, command: list[str], name: str, user: str | None = None) -> None:
        log = open(self.state_dir / "log" / f"{name}.out", "w")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, user=user))

    def _wait_for_idle_node(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
            if state and all(s == "idle" for s in state):
                return
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{process.args[0]} exited with {process.returncode}: "
                        + self._log_tail(Path(process.args[0]).name)
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"node not idle after {timeout_s} s (sinfo: {state}): " + self._log_tail("slurmctld")
                )
            time.sleep(0.5)

    def _log_tail(self, name: str) -> str:
        texts = [
            p.read_text(errors="replace")[-2000:] for p in (self.state_dir / "log").glob(f"{name}*") if p.is_file()
        ]
        return "\n".join(texts)

    # -- queries --------------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller knows (finished ones included: MinJobAge keeps them)."""
        out = subprocess.run(
            ["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True, check=True
        ).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]
