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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_block(size: int = 2000) -> int:
    """Start of a range of `size` ports with nothing listening at the ports Ray will use."""
    for _ in range(50):
        start = random.randrange(40000, 60000 - size, 1000)
        offsets = (0, 1, 2, 3, 4, 5, 6, 7, 8, 100, 101)  # the ports Ray binds in each block, and the head's GCS port
        probes = [start + block + offset for block in range(0, size, 1000) for offset in offsets]
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

    def wait_job(self, job_id: str, done: Callable[[dict[str, str]], bool], what: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if done(fields):
                return fields
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: timed out waiting for {what}; now {fields.get('JobState')}\n{self.log(job_id)}")

    def log(self, job_id: str) -> str:
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


def _kill(pid: int, sig: int) -> bool:
    """Send sig to pid; False when the process is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _stop(pid_file: Path) -> None:
    """SIGTERM the daemon whose PID is in pid_file, SIGKILL after 15 s.

    slurmctld saves its state on SIGTERM and on a loaded machine that took just over 5 s in CI, so the daemon can
    exit at any point of this wait, including between the last check and the SIGKILL.
    """
    if not pid_file.is_file():
        return
    try:
        pid = int(pid_file.read_text().split()[0])
    except (ValueError, IndexError):
        return
    if not _kill(pid, signal.SIGTERM):
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not _kill(pid, 0):
            return
        time.sleep(0.1)
    _kill(pid, signal.SIGKILL)


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
    marker = f"/tmp/hsl{os.getpid()}-"
    site = root / "site.yaml"
    # The head's GCS port is the block's unused 9th port: an ephemeral port from the OS could fall inside a node's
    # worker-port range (block + 100 to block + 999), which Ray refuses ("used by other components").
    block = _free_block()
    site.write_text(
        f"extends: {REPO / 'cluster/sites/local.yaml'}\n"
        f"ray: {{port: {block + 8}, port_range_start: {block}, temp_dir: '{marker}{{job_id}}', "
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
            _kill(pid, signal.SIGKILL)
        for leftover in Path("/tmp").glob(f"{Path(marker).name}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _write_jets(out_dir: Path, examples: int = 1200, particles: int = 16, seed: int = 1) -> Path:
    """Five classes of jets (the part-quickstart tasks) that differ in constituent count and spread."""
    import numpy as np

    from hepml_dist.data.writer import DatasetWriter

    rng = np.random.default_rng(seed)
    label = rng.integers(0, 5, examples)
    n = np.clip(3 + 2 * label + rng.integers(0, 3, examples), 1, particles)
    real = np.arange(particles)[None, :] < n[:, None]
    pt = rng.exponential(20.0, (examples, particles)) + 1.0
    spread = (0.05 + 0.05 * label)[:, None]
    eta = rng.normal(0, 1, (examples, 1)) + rng.normal(0, 1, (examples, particles)) * spread
    phi = rng.uniform(-np.pi, np.pi, (examples, 1)) + rng.normal(0, 1, (examples, particles)) * spread
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    energy = np.sqrt(px**2 + py**2 + pz**2)

    def pad(values, dtype=np.float32):
        return np.where(real, values, 0).astype(dtype)

    charge = rng.choice([-1.0, 0.0, 1.0], (examples, particles))
    jet = {name: pad(v).sum(1) for name, v in (("px", px), ("py", py), ("pz", pz), ("e", energy))}
    jet_pt = np.hypot(jet["px"], jet["py"])
    zero = np.zeros((examples, particles), np.float32)
    columns = {
        "part_px": pad(px), "part_py": pad(py), "part_pz": pad(pz), "part_energy": pad(energy),
        "part_charge": pad(charge), "part_pid": pad(np.where(charge != 0, 211 * charge, 22), np.int32),
        "part_d0val": zero, "part_d0err": zero, "part_dzval": zero, "part_dzerr": zero, "part_n": n.astype(np.int32),
        "jet_pt": jet_pt.astype(np.float32), "jet_eta": np.arcsinh(jet["pz"] / np.maximum(jet_pt, 1e-3)).astype(np.float32),
        "jet_phi": np.arctan2(jet["py"], jet["px"]).astype(np.float32), "jet_energy": jet["e"].astype(np.float32),
        "jet_mass": np.sqrt(np.maximum(jet["e"] ** 2 - jet_pt**2 - jet["pz"] ** 2, 0)).astype(np.float32),
        "label_jet_class": label.astype(np.int64),
    }  # fmt: skip
    with DatasetWriter(out_dir, schema="jets", splits=(0.7, 0.15, 0.15), seed=seed, chunk_size=64, chunks_per_shard=2) as w:
        w.add(columns)
    return out_dir


@pytest.fixture(scope="module")
def jets(slurm: FakeSlurm) -> Path:
    """The part-quickstart data, small, in the submit directory (relative paths as a user would write them)."""
    _write_jets(slurm.root / "data" / "jets")
    return Path("data/jets")


def _quickstart(jets: Path, steps_per_epoch: int, epochs: int, eval_interval: int) -> list[str]:
    """part-quickstart.yaml on the small data, shrunk to seconds per epoch on the 2 fake nodes (1 CPU each)."""
    sets = [f"data.train={jets}/train", f"data.val={jets}/val", f"data.test={jets}/test",
            "data.inputs.max_length=16", "data.batch_size=32", f"data.steps_per_epoch={steps_per_epoch}",
            "data.val_steps=2", "data.shuffle_buffer=256", "data.loader_workers=0",
            "model.embed_dims=[16, 16]", "model.pair_embed_dims=[8]", "model.num_heads=2", "model.num_layers=1",
            f"training.epochs={epochs}", f"training.eval_interval={eval_interval}", "training.log_interval=5"]  # fmt: skip
    return [arg for value in sets for arg in ("--set", value)]


def _submit(slurm: FakeSlurm, *args: str, wait: bool = False, timeout: float = 240) -> tuple[str, subprocess.CompletedProcess[str]]:
    done = slurm.hepml(
        "slurm", "submit", str(REPO / "jobs/part-quickstart.yaml"), "--site", str(slurm.site),
        "--set", "cluster.slurm.nodes=2", "--set", f"cluster.slurm.container_image={slurm.image}",
        "--set", "cluster.slurm.time=00:10:00", *args, *(["--wait"] if wait else []), timeout=timeout,
    )  # fmt: skip
    found = re.search(r"submitted job (\d+)", done.stdout)
    assert found, f"no job id in:\n{done.stdout}\n{done.stderr}"
    return found.group(1), done


def _assert_torn_down(job_id: str) -> None:
    marker = f"/tmp/hsl{os.getpid()}-{job_id}-"
    assert _ray_processes(marker) == [], f"Ray processes of job {job_id} survived the job"
    assert not list(Path("/tmp").glob(f"hsl{os.getpid()}-{job_id}-*")), "a Ray temp dir survived the job"


def _checkpoints(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("checkpoints/step-*/state.json"))]


def test_quickstart_trains_on_a_two_node_ray_cluster_in_the_container(slurm: FakeSlurm, jets: Path) -> None:
    job_id, done = _submit(slurm, *_quickstart(jets, steps_per_epoch=10, epochs=1, eval_interval=5), wait=True)
    log = slurm.log(job_id)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{log}"
    assert "Ray cluster ready: 2 nodes" in log
    assert "[ray-node 0 on node1]" in log and "[ray-node 1 on node2]" in log
    assert "finished at step 10" in log
    # Two workers of 1 CPU on two nodes of 1 CPU each: the DDP group spans both Ray nodes.
    final = _checkpoints(slurm.root / "runs" / f"part-quickstart-{job_id}")[-1]
    assert final["finished"] and final["step"] == 10 and final["world_size"] == 2
    calls = slurm.apptainer_log.read_text()
    # The Ray nodes and the training all ran through the container prefix, each on its SLURM node.
    assert re.search(rf"node=node1 image={slurm.image} command=ray start .*--head", calls)
    assert re.search(rf"node=node2 image={slurm.image} command=ray start .*--address=", calls)
    assert re.search(rf"node=node1 image={slurm.image} command=hepml train \S+part-quickstart-{job_id}.job.yaml", calls)
    assert slurm.job(job_id)["ExitCode"] == "0:0"
    _assert_torn_down(job_id)


STEPS = 150


def test_preemption_checkpoints_requeues_and_the_requeued_run_finishes(slurm: FakeSlurm, jets: Path) -> None:
    # Many steps after the first checkpoint: on a loaded machine the signal must still land mid-run. One node (and
    # quicker): the pre-emption path stops every node the way the two-node test above tears its cluster down.
    job_id, done = _submit(slurm, *_quickstart(jets, steps_per_epoch=STEPS, epochs=1, eval_interval=10),
                           "--set", "cluster.slurm.nodes=1", "--set", "parallel.num_workers=1")
    assert done.returncode == 0, done.stderr
    run_dir = slurm.root / "runs" / f"part-quickstart-{job_id}"
    slurm.wait_job(job_id, lambda f: bool(_checkpoints(run_dir)), "the first checkpoint", 180)
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    # The script has the training checkpoint and stop, stops Ray and requeues: PENDING with one restart.
    slurm.wait_job(job_id, lambda f: f["Restarts"] == "1" and f["JobState"] == "PENDING", "the requeue", 120)
    log = slurm.log(job_id)
    assert "USR1" in log and "requeueing job" in log, log
    stopped = _checkpoints(run_dir)[-1]
    assert not stopped["finished"] and 10 <= stopped["step"] < STEPS, stopped
    _assert_torn_down(job_id)
    # SLURM holds a requeued job for 120 s (BeginTime); release it once the first run has left the nodes.
    slurm.wait_job(job_id, lambda f: slurm.idle(), "the nodes to be idle", 60)
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    final = slurm.wait_job(job_id, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), "the requeued run", 240)
    log = slurm.log(job_id)
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", log
    assert "(restart 1)" in log and f"resuming from step {stopped['step']}" in log, log
    last = _checkpoints(run_dir)[-1]
    assert last["finished"] and last["step"] == STEPS
    _assert_torn_down(job_id)


def test_job_exit_code_is_the_trainings(slurm: FakeSlurm) -> None:
    # One node is enough here (and quicker): the exit status does not depend on the cluster's size.
    job_id, done = _submit(slurm, "--site-set", "train_command=bash -c 'echo stand-in training; exit 7'",
                           "--set", "cluster.slurm.nodes=1", "--set", "parallel.num_workers=1", wait=True)
    log = slurm.log(job_id)
    assert done.returncode == 7, f"{done.stderr}\n{log}"
    assert slurm.job(job_id)["ExitCode"] == "7:0"
    assert "Ray cluster ready: 1 node\n" in log and "training exited with status 7" in log
    _assert_torn_down(job_id)


def test_missing_image_and_dead_node_fail_clearly(slurm: FakeSlurm) -> None:
    job_id, done = _submit(slurm, "--set", f"cluster.slurm.container_image={slurm.root / 'nope.sif'}", wait=True)
    assert done.returncode == 2
    assert "container image" in slurm.log(job_id) and "not found" in slurm.log(job_id)

    job_id, done = _submit(slurm, "--site-set", 'node_setup=["echo broken node >&2; exit 9"]', wait=True)
    assert done.returncode == 3
    assert "a Ray node step exited" in slurm.log(job_id)
    _assert_torn_down(job_id)
