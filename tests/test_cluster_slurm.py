"""On a real SLURM: a throw-away slurmctld + two slurmd "nodes" (node1, node2) on this host, started for this module.

Jobs go through `hepml slurm submit` with the `local` site profile, as a user would submit them; a stand-in
`apptainer` on the PATH runs the container commands natively and logs them. SLURM must be installed (`.ci/run`
installs it with apt): without it these tests fail rather than skip.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")

STANDIN_APPTAINER = r"""#!/usr/bin/env bash
# Stand-in for `apptainer exec [options] IMAGE COMMAND...`: checks the image exists, logs the call, runs COMMAND natively.
set -euo pipefail
[[ ${1:-} == exec ]] || { echo "stand-in apptainer: only 'exec' is supported" >&2; exit 2; }
shift
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    -B|--bind|--env|--env-file|--pwd|-H|--home|--overlay|-W|--workdir|--mount|--network) shift 2 ;;
    *) shift ;;
  esac
done
image=$1
shift
[[ $image == *://* || -e $image ]] || { echo "FATAL: could not open image $image: no such file" >&2; exit 255; }
echo "node=${SLURMD_NODENAME:-?} image=$image command=$*" >> "$APPTAINER_STANDIN_LOG"
exec "$@"
"""

# A stand-in training command with the contract of `hepml train`: it is the Ray driver, runs its steps as Ray tasks
# spread over the cluster's nodes, checkpoints atomically, checkpoints and exits on SIGUSR1, resumes from its run dir.
STANDIN_TRAIN = r'''
import json, os, signal, sys, time
import ray

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
run_dir, steps = args["--run-dir"], int(args["--steps"])
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
ray.init(address=args["--address"], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=1)
def work(step):
    time.sleep(0.5)
    return ray.get_runtime_context().get_node_id()

def checkpoint(step):
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, ".state.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
    os.replace(tmp, os.path.join(run_dir, "state.json"))

path = os.path.join(run_dir, "state.json")
step = json.load(open(path))["step"] if os.path.exists(path) else 0
nodes = set()  # Ray nodes this run's steps ran on
print(f"stand-in training: resuming at step {step}", flush=True)
while step < steps:
    if stop:
        checkpoint(step)
        print(f"stand-in training: USR1, checkpointed at step {step}", flush=True)
        sys.exit(0)
    nodes.update(ray.get([work.remote(step), work.remote(step)]))
    step += 1
    checkpoint(step)
print(f"stand-in training: finished {steps} steps on {len(nodes)} nodes", flush=True)
sys.exit(int(args.get("--exit", 0)))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_block(size: int = 2000) -> int:
    """Start of a range of `size` ports with nothing listening at the ports Ray will use."""
    for _ in range(50):
        start = random.randrange(40000, 60000 - size, 1000)
        probes = [start + offset for block in range(0, size, 1000) for offset in (0, 1, 2, 3, 4, 5, 6, 7, 100, 101)]
        try:
            for port in probes:
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return start
    raise RuntimeError("no free port block for Ray")


@dataclass
class FakeSlurm:
    """A running throw-away SLURM and what the tests need to submit to it."""

    root: Path
    env: dict[str, str]
    site: Path
    image: Path
    apptainer_log: Path
    pids: dict[str, int] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def hepml(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "hepml_dist", *args, check=False, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: str, done: callable, what: str, timeout: float) -> dict[str, str]:  # type: ignore[valid-type]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if done(fields):
                return fields
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: timed out waiting for {what}; now {fields.get('JobState')}\n{self.log(job_id)}")

    def log(self, job_id: str, name: str = "quickstart") -> str:
        matches = list((self.root / "slurm-logs").glob(f"*-{job_id}.out"))
        return matches[0].read_text(errors="replace") if matches else "(no job output yet)"

    def idle(self) -> bool:
        states = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.split()
        return bool(states) and set(states) == {"idle"}


def _slurm_conf(root: Path, ctld_port: int, node_ports: list[int]) -> str:
    nodes = "\n".join(
        f"NodeName=node{i + 1} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=1 RealMemory=8000"
        for i, port in enumerate(node_ports)
    )
    return f"""\
ClusterName=hepmltest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{nodes}
PartitionName=debug Nodes=node[1-{len(node_ports)}] Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_file: Path) -> None:
    """SIGTERM the daemon whose PID is in pid_file, SIGKILL after 5 s."""
    if not pid_file.is_file():
        return
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
    except (ValueError, IndexError, ProcessLookupError):
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _ray_processes(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions `marker` (our Ray temp dirs)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSlurm]:
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"SLURM is not installed (missing {', '.join(missing)}): apt-get install -y --no-install-recommends "
            "slurmctld slurmd slurm-client munge (as .ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.fail("the fake SLURM runs its daemons as root (SlurmUser=root); run the integration tests as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool/node1", "spool/node2", "log", "bin"):
        (root / sub).mkdir(parents=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, _free_port(), [_free_port(), _free_port()]))

    apptainer = root / "bin" / "apptainer"
    apptainer.write_text(STANDIN_APPTAINER)
    apptainer.chmod(0o755)
    image = root / "hepml-test.sif"
    image.write_text("stand-in image\n")
    marker = f"/tmp/hr{os.getpid()}-"
    site = root / "site.yaml"
    site.write_text(
        f"extends: {REPO / 'cluster/sites/local.yaml'}\n"
        f"ray: {{port: {_free_port()}, port_range_start: {_free_block()}, temp_dir: '{marker}{{job_id}}', "
        "join_timeout_s: 90}\n"
    )

    env = dict(os.environ)
    env.update(
        SLURM_CONF=str(conf),
        PATH=f"{root / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        APPTAINER_STANDIN_LOG=str(root / "apptainer.log"),
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
    )
    cluster = FakeSlurm(root=root, env=env, site=site, image=image, apptainer_log=root / "apptainer.log")

    def daemon(*args: str) -> None:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (root / "log").glob("*.log"))
            raise AssertionError(f"{' '.join(args)} failed: {done.stderr}\n{logs}")

    try:
        daemon("munged", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
               f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log", f"--seed-file={root}/munged.seed")
        daemon("slurmctld", "-c")
        daemon("slurmd", "-N", "node1")
        daemon("slurmd", "-N", "node2")
        deadline = time.monotonic() + 30
        while not cluster.idle():
            if time.monotonic() > deadline:
                raise AssertionError("fake SLURM nodes did not become idle:\n" + cluster.run("sinfo", check=False).stdout)
            time.sleep(0.2)
        yield cluster
    finally:
        # Order matters: cancel jobs while slurmctld is up (else slurmstepd retries forever and ignores SIGTERM),
        # then slurmd, slurmctld, munged.
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        for _ in range(100):
            if not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
                break
            time.sleep(0.2)
        for node in ("node1", "node2"):
            _stop(root / f"slurmd-{node}.pid")
        _stop(root / "slurmctld.pid")
        _stop(root / "munged.pid")
        for pid in _ray_processes(marker):  # only if a test failed half-way; the tests assert there are none
            os.kill(pid, signal.SIGKILL)
        for leftover in Path("/tmp").glob(f"{Path(marker).name}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _submit(slurm: FakeSlurm, *args: str, wait: bool = False, timeout: float = 240) -> tuple[str, subprocess.CompletedProcess[str]]:
    done = slurm.hepml(
        "slurm", "submit", str(REPO / "jobs/part-quickstart.yaml"), "--site", str(slurm.site),
        "--set", "cluster.slurm.nodes=2", "--set", f"cluster.slurm.container_image={slurm.image}",
        "--set", "cluster.slurm.time=00:10:00", *args, *(["--wait"] if wait else []), timeout=timeout,
    )  # fmt: skip
    found = re.search(r"submitted job (\d+)", done.stdout)
    assert found, f"no job id in:\n{done.stdout}\n{done.stderr}"
    return found.group(1), done


def _standin(slurm: FakeSlurm, steps: int, exit_code: int = 0) -> list[str]:
    script = slurm.root / "standin_train.py"
    script.write_text(STANDIN_TRAIN)
    command = f"{sys.executable} {script} --address {{address}} --run-dir {{run_dir}} --steps {steps} --exit {exit_code}"
    return ["--site-set", f"train_command={command}"]


def _assert_torn_down(slurm: FakeSlurm, job_id: str) -> None:
    marker = f"/tmp/hr{os.getpid()}-{job_id}-"
    assert _ray_processes(marker) == [], f"Ray processes of job {job_id} survived the job"
    assert not list(Path("/tmp").glob(f"hr{os.getpid()}-{job_id}-*")), "a Ray temp dir survived the job"


def test_two_node_ray_cluster_trains_and_exit_code_is_the_trainings(slurm: FakeSlurm) -> None:
    job_id, done = _submit(slurm, *_standin(slurm, steps=6, exit_code=7), wait=True)
    log = slurm.log(job_id)
    assert done.returncode == 7, f"hepml slurm submit --wait should exit with the training's status\n{done.stderr}\n{log}"
    assert slurm.job(job_id)["ExitCode"] == "7:0"
    assert "Ray cluster ready: 2 nodes" in log
    assert "[ray-node 0 on node1]" in log and "[ray-node 1 on node2]" in log
    assert "finished 6 steps on 2 nodes" in log, log
    calls = slurm.apptainer_log.read_text()
    # Both Ray nodes and the training ran through the container prefix, on their SLURM nodes.
    assert re.search(r"node=node1 image=\S+ command=ray start .*--head", calls)
    assert re.search(r"node=node2 image=\S+ command=ray start .*--address=", calls)
    assert re.search(r"node=node1 image=\S+ command=\S+python\S* \S+standin_train.py", calls)
    _assert_torn_down(slurm, job_id)


def test_preemption_checkpoints_requeues_and_resumes(slurm: FakeSlurm) -> None:
    job_id, done = _submit(slurm, *_standin(slurm, steps=40))
    assert done.returncode == 0, done.stderr
    run_dir = slurm.root / "runs" / f"part-quickstart-{job_id}"
    state = run_dir / "state.json"
    slurm.wait_job(job_id, lambda f: state.is_file() and json.loads(state.read_text())["step"] >= 3, "training steps", 120)
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    # The script stops the training (which checkpoints), stops Ray and requeues the job: PENDING with one restart.
    slurm.wait_job(job_id, lambda f: f["Restarts"] == "1" and f["JobState"] == "PENDING", "the requeue", 90)
    log = slurm.log(job_id)
    assert "USR1" in log and "requeueing job" in log, log
    checkpointed = json.loads(state.read_text())["step"]
    assert 3 <= checkpointed < 40, f"checkpoint at step {checkpointed}"
    assert f"checkpointed at step {checkpointed}" in log
    _assert_torn_down(slurm, job_id)
    # SLURM holds a requeued job for 120 s (BeginTime); release it once the first run is gone from the nodes.
    slurm.wait_job(job_id, lambda f: slurm.idle(), "the nodes to be idle", 60)
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    final = slurm.wait_job(job_id, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), "the requeued run", 180)
    log = slurm.log(job_id)
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", log
    assert f"resuming at step {checkpointed}" in log
    assert "finished 40 steps on 2 nodes" in log
    _assert_torn_down(slurm, job_id)


def test_missing_image_and_dead_node_fail_clearly(slurm: FakeSlurm) -> None:
    job_id, done = _submit(slurm, "--set", f"cluster.slurm.container_image={slurm.root / 'nope.sif'}", wait=True)
    assert done.returncode == 2
    assert "container image" in slurm.log(job_id) and "not found" in slurm.log(job_id)

    job_id, done = _submit(slurm, "--site-set", 'node_setup=["echo broken node >&2; exit 9"]', wait=True)
    assert done.returncode == 3
    assert "a Ray node step exited" in slurm.log(job_id)
