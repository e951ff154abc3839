"""`hepml submit` against a real Ray head (`ray start --head` on 127.0.0.1, stopped afterwards): the job runs to
completion through the Jobs API, and `hepml status` / `hepml logs` follow it."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from train_helpers import tiny_job, write_jet_dataset, write_job

pytestmark = pytest.mark.integration

DASHBOARD_PORT = 8271


def hepml(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hepml_dist.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def ray_head():
    """A separate Ray cluster with the Jobs API, on its own ports; every process it started is ended by pid."""
    temp = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    # The head runs job entrypoints (`python -m hepml_dist.cli ...`) with its own PATH: like a cluster node whose
    # environment has hepml_dist installed, it must find this interpreter first, whether or not the venv is active.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--port=6391", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}", "--num-cpus=4",
         "--include-dashboard=true", "--ray-client-server-port=20091", "--dashboard-agent-listen-port=52391",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(1)
        else:
            pytest.fail("the Ray head's Jobs API did not come up in 150 s")
        yield address
    finally:
        stop_processes_of(head.pid, temp)


def stop_processes_of(pid: int, temp_dir: str) -> None:
    """End the `ray start` process, its descendants, and any daemon that names our private temp dir (no `ray stop`:
    that would end every Ray on the machine)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == pid or any(temp_dir in part for part in proc.info["cmdline"] or []):
            found[proc.pid] = proc
    for proc in list(found.values()):
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for proc in found.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_submit_runs_a_job_to_completion(ray_head, tmp_path):
    dataset = write_jet_dataset(tmp_path / "data")
    job = write_job(tmp_path / "job.yaml", tiny_job(
        dataset, parallel={"num_workers": 2}, training={"epochs": 1, "eval_interval": 8, "log_interval": 4, "seed": 7},
        tracking={"mode": "disabled"},
    ))
    run_dir = tmp_path / "runs" / "tiny"

    refused = hepml("submit", str(job), "--address", ray_head)  # no shared storage named: refused up front
    assert refused.returncode == 2 and "cluster.storage_path" in refused.stderr

    submitted = hepml("submit", str(job), "--address", ray_head, "--run-dir", str(run_dir))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("hepml-tiny-")

    deadline = time.monotonic() + 300
    state = ""
    while time.monotonic() < deadline:
        state = hepml("status", job_id, "--address", ray_head).stdout
        if any(word in state for word in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = hepml("logs", job_id, "--address", ray_head).stdout
    assert "SUCCEEDED" in state, f"{state}\n{logs[-3000:]}"
    assert "finished at step 8" in logs
    assert (run_dir / "checkpoints" / "step-00000008" / "model.pt").is_file()
