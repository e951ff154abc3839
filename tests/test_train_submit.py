"""The Ray Jobs API verbs (`hepml submit/status/logs/wait/stop/list`) against one real Ray head for the module
(`ray start --head` on 127.0.0.1 with token authentication on, stopped afterwards): a training job runs to
completion, short shell jobs exercise following, waiting, stopping and listing, and the exit statuses, the
RAY_ADDRESS fallback and the token errors are the documented ones."""

import json
import os
import secrets
import select
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from ray.job_submission import JobSubmissionClient

from train_helpers import tiny_job, write_jet_dataset, write_job

pytestmark = pytest.mark.integration

DASHBOARD_PORT = 8271
# The caller's own Ray settings must not leak into the commands under test (another test may have set them).
RAY_CLIENT_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens on loopback


def clean_environment(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in RAY_CLIENT_VARIABLES}, **extra}


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray cluster with the Jobs API and token authentication, on its own ports; yields (address,
    token). Every process it started is ended by pid."""
    temp = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    token = secrets.token_hex(16)  # given in the environment, so the head writes no token file
    # The head runs job entrypoints (`python -m hepml_dist.cli ...`) with its own PATH: like a cluster node whose
    # environment has hepml_dist installed, it must find this interpreter first, whether or not the venv is active.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = clean_environment(PATH=path, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2", RAY_USAGE_STATS_ENABLED="0",
                            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
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
                if requests.get(f"{address}/api/version", headers=bearer(token), timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            pytest.fail("the Ray head's Jobs API did not come up in 150 s")
        yield address, token
    finally:
        stop_processes_of(head.pid, temp)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def stop_processes_of(pid: int, temp_dir: str) -> None:
    """Stop the `ray start --block` process, which on SIGTERM shuts its cluster down in order (about 7 s; ending all
    processes at once leaves the GCS and raylet hanging), then kill whatever is left: its descendants and any
    daemon that names our private temp dir (no `ray stop`: that would end every Ray on the machine)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == pid or any(temp_dir in part for part in proc.info["cmdline"] or []):
            found[proc.pid] = proc
    for proc in list(found.values()):
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    try:
        found[pid].terminate()
    except (KeyError, psutil.NoSuchProcess):
        pass
    _, alive = psutil.wait_procs(list(found.values()), timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def hepml(*args: str, token: str, timeout_s: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run `hepml ARGS` with only the given Ray variables; the cluster's token must never show in its output."""
    done = subprocess.run([sys.executable, "-m", "hepml_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, env=clean_environment(**env))
    assert token not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_submit_runs_a_job_to_completion(ray_head, tmp_path):
    address, token = ray_head
    dataset = write_jet_dataset(tmp_path / "data")
    job = write_job(tmp_path / "job.yaml", tiny_job(
        dataset, parallel={"num_workers": 2}, training={"epochs": 1, "eval_interval": 8, "log_interval": 4, "seed": 7},
        tracking={"mode": "disabled"},
    ))
    run_dir = tmp_path / "runs" / "tiny"
    cluster = {"token": token, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN": token}  # no --address: $RAY_ADDRESS

    refused = hepml("submit", str(job), **cluster)  # no shared storage named: refused up front
    assert refused.returncode == 2 and "cluster.storage_path" in refused.stderr

    submitted = hepml("submit", str(job), "--run-dir", str(run_dir), **cluster)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("hepml-tiny-")

    waited = hepml("wait", job_id, "--timeout", "300", timeout_s=330, **cluster)
    logs = hepml("logs", job_id, **cluster).stdout
    assert waited.returncode == 0, f"{waited.stdout}\n{logs[-3000:]}"
    assert waited.stdout.startswith(f"{job_id}: SUCCEEDED")
    assert "finished at step 8" in logs
    assert (run_dir / "checkpoints" / "step-00000008" / "model.pt").is_file()
    state = json.loads(hepml("status", job_id, "--json", **cluster).stdout)
    assert state["status"] == "SUCCEEDED" and state["metadata"]["run_dir"] == str(run_dir)
    assert state["start_time"] <= state["end_time"]


def test_the_cluster_and_the_commands_require_the_token(ray_head):
    address, token = ray_head
    assert requests.get(f"{address}/api/jobs/", timeout=10).status_code == 401
    assert requests.get(f"{address}/api/jobs/", headers=bearer("not-the-token"), timeout=10).status_code == 403

    missing = hepml("status", "hepml-x", "--address", address, token=token)
    assert missing.returncode == 2
    assert f"the cluster at {address} requires a token: set RAY_AUTH_TOKEN" in missing.stderr

    wrong = hepml("list", token=token, RAY_ADDRESS=address, RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode == 2 and "refused the token from RAY_AUTH_TOKEN" in wrong.stderr
    assert "not-the-token" not in wrong.stdout + wrong.stderr

    # --address wins over $RAY_ADDRESS (which names nothing), and reaches the cluster: the id is unknown there
    unknown = hepml("stop", "hepml-no-such-job", "--address", address, token=token, RAY_ADDRESS=UNREACHABLE,
                    RAY_AUTH_TOKEN=token)
    assert unknown.returncode == 2 and f"no job 'hepml-no-such-job' on the cluster at {address}" in unknown.stderr

    unreachable = hepml("wait", "hepml-x", token=token, RAY_ADDRESS=UNREACHABLE, RAY_AUTH_TOKEN=token)
    assert unreachable.returncode == 2 and f"cannot reach the Ray Jobs API at {UNREACHABLE}" in unreachable.stderr


def read_until(stream, text: str, timeout_s: float) -> str:
    """What `stream` (a pipe) gives until `text` shows up or `timeout_s` passes."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while text.encode() not in seen and time.monotonic() < deadline:
        if select.select([stream], [], [], 0.2)[0]:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen.decode()


def test_follow_wait_stop_and_list_short_jobs(ray_head, tmp_path):
    address, token = ray_head
    client = JobSubmissionClient(address, headers=bearer(token))
    suffix = uuid.uuid4().hex[:6]
    sleeper = client.submit_job(submission_id=f"sleeper-{suffix}",
                                entrypoint="python -c \"import time; print('tick', flush=True); time.sleep(120)\"")
    failer = client.submit_job(submission_id=f"failer-{suffix}", entrypoint="python -c \"print('boom'); exit(5)\"")
    cluster = {"token": token, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN": token}

    following = subprocess.Popen([sys.executable, "-m", "hepml_dist.cli", "logs", sleeper, "--follow"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=clean_environment(RAY_ADDRESS=address, RAY_AUTH_TOKEN=token))
    try:
        failed = hepml("wait", failer, "--timeout", "120", timeout_s=150, **cluster)
        assert failed.returncode == 1 and failed.stdout.startswith(f"{failer}: FAILED"), failed.stdout
        followed_failure = hepml("logs", failer, "--follow", **cluster)
        assert followed_failure.returncode == 1 and "boom" in followed_failure.stdout

        streamed = read_until(following.stdout, "tick", timeout_s=60)
        assert "tick" in streamed, streamed  # the running job's output arrives while it runs
        running = hepml("wait", sleeper, "--timeout", "0.5", **cluster)
        assert running.returncode == 4 and running.stdout.startswith(f"{sleeper}: RUNNING"), running.stdout

        stopped = hepml("stop", sleeper, "--wait", "--timeout", "90", **cluster)
        assert stopped.returncode == 3, stopped.stdout + stopped.stderr
        assert f"{sleeper}: stop requested" in stopped.stdout and f"{sleeper}: STOPPED" in stopped.stdout
        assert following.wait(timeout=60) == 3
        assert f"{sleeper}: STOPPED" in following.stderr.read().decode()
    finally:
        following.kill()

    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    listed = hepml("list", "--json", token=token, RAY_ADDRESS=address, RAY_AUTH_TOKEN_PATH=str(token_file))
    assert listed.returncode == 0, listed.stderr
    states = {job["id"]: job for job in json.loads(listed.stdout)}
    assert states[sleeper]["status"] == "STOPPED" and states[failer]["status"] == "FAILED"
    assert "time.sleep(120)" in states[sleeper]["entrypoint"] and states[failer]["end_time"]

    table = hepml("list", **cluster).stdout.splitlines()
    assert table[0].split() == ["ID", "STATUS", "START", "END", "ENTRYPOINT"]
    assert any(line.startswith(sleeper) and line.split()[1] == "STOPPED" for line in table), table
    status = hepml("status", failer, **cluster)
    assert status.returncode == 0 and status.stdout.startswith(f"{failer}: FAILED")
