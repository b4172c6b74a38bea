"""A real SLURM cluster on localhost for the tests in this folder.

munged, slurmctld and two slurmd "nodes" (n1, n2, both 127.0.0.1) run from a temporary folder with their
own config, key, ports and state; nothing outside that folder is touched. Jobs run as the current user.
"""

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODES = ("n1", "n2")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}

SLURM_CONF = """\
ClusterName=localtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
# Look at pending jobs every second, so a requeued or dependent job starts without the usual minute.
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
        self._daemons: list[subprocess.Popen] = []

    def cmd(self, *args: str) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path = REPO) -> int:
        done = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"sbatch {' '.join(args)}: {done.stderr}"
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        line = self.cmd("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for(self, job_id: int, done, timeout: float, what: str) -> dict[str, str]:
        """Poll the job every 0.5 s until done(job) is true; fail with the job's record on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not {what} after {timeout:.0f} s: {job}")
            time.sleep(0.5)

    def wait_until_finished(self, job_id: int, timeout: float) -> dict[str, str]:
        return self.wait_for(job_id, lambda j: j["JobState"] in TERMINAL_STATES, timeout, "finished")

    def start(self) -> None:
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        ctld_port, n1_port, n2_port = _free_ports(3)
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(
            root=self.root, user=_user(), ctld_port=ctld_port, n1_port=n1_port, n2_port=n2_port))
        munge = self.root / "munge"
        self._spawn("munged", "--foreground", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                    f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                    f"--seed-file={munge}/munged.seed")
        _wait(lambda: (munge / "munge.socket").exists(), 10, "munged socket")
        self._spawn("slurmctld", "-D", "-i")
        for node in NODES:
            self._spawn("slurmd", "-D", "-N", node)
        _wait(self._nodes_idle, 30, f"nodes {NODES} idle ({self.root}/log)")

    def _spawn(self, *args: str) -> None:
        with open(self.root / "log" / f"{args[0]}-{len(self._daemons)}.stdout", "w") as log:
            self._daemons.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _nodes_idle(self) -> bool:
        try:
            states = self.cmd("sinfo", "--noheader", "--Node", "--format=%N %t").split("\n")
        except RuntimeError:
            return False
        return sorted(s for s in states if s.endswith(" idle")) == [f"{n} idle" for n in NODES]

    def cancel_all(self) -> None:
        self.cmd("scancel", f"--user={_user()}")
        _wait(lambda: not self.cmd("squeue", "--noheader"), 60, "cancelled jobs to end")

    def stop(self) -> None:
        # Jobs outlive the daemons (their slurmstepd keep running): cancel them first.
        try:
            self.cancel_all()
            self.cmd("scontrol", "shutdown")
        except RuntimeError as err:
            print(f"local SLURM teardown: {err}")
        for proc in reversed(self._daemons):  # slurmd and slurmctld first, munged last
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM is not installed and installing it needs root: run scripts/slurm/install_local_slurm.sh")
    subprocess.run([str(REPO / "scripts" / "slurm" / "install_local_slurm.sh")], check=True)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    _ensure_installed()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def no_slurm_job_outlives_its_test(slurm):
    """A test that failed while its job ran leaves nothing queued or running for the next one."""
    yield
    slurm.cancel_all()
