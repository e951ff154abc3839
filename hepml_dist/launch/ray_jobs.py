"""Submit jobs to a running Ray cluster through the Ray Jobs API, and follow them.

`submit` stages the resolved job spec in a fresh working directory, ships it (and, by default, the local
hepml_dist package, so the cluster runs exactly the code that validated the job) in the runtime environment, and
runs `python -m hepml_dist.cli train job.yaml --address auto --run-dir RUN_DIR` on the head node. The run
directory must be a path the cluster sees (cluster.storage_path, shared by the nodes).
"""

import os
import tempfile
import time
import uuid
from pathlib import Path

from ray.job_submission import JobSubmissionClient

import hepml_dist
from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec, dump_spec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str | None):
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - connection errors come in several types
        raise UserError(f"cannot reach the Ray Jobs API at {address} ({type(err).__name__}: {err}); "
                        "is the cluster up and the dashboard port (8265) reachable?") from None


def submit(spec: JobSpec, address: str, *, run_dir: str | None = None, ship_code: bool = True,
           submission_id: str | None = None) -> str:
    """Submit the job; returns the submission id."""
    target = run_dir or (str(Path(spec.cluster.storage_path) / spec.name) if spec.cluster.storage_path else None)
    if target is None or not os.path.isabs(target):
        raise UserError(
            "cluster.storage_path: a submitted job needs an absolute directory that the cluster's nodes share "
            "(set cluster.storage_path, or pass --run-dir /shared/path)"
        )
    staging = Path(tempfile.mkdtemp(prefix="hepml-submit-"))
    (staging / "job.yaml").write_text(dump_spec(spec))
    runtime_env: dict = {"working_dir": str(staging), "env_vars": {"PYTHONUNBUFFERED": "1"}}
    if ship_code:
        runtime_env["py_modules"] = [str(Path(hepml_dist.__file__).parent)]
    if os.environ.get("COMET_API_KEY"):
        runtime_env["env_vars"]["COMET_API_KEY"] = os.environ["COMET_API_KEY"]
    entrypoint = f"python -u -m hepml_dist.cli train job.yaml --address auto --run-dir {target}"
    job_id = submission_id or f"hepml-{spec.name}-{uuid.uuid4().hex[:8]}"
    return client(address).submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=job_id,
        metadata={"hepml_job": spec.name, "run_dir": target},
    )


def status(job_id: str, address: str | None = None) -> dict:
    c = client(address)
    try:
        info = c.get_job_info(job_id)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"no job {job_id!r} on the cluster ({err})") from None
    return {
        "id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "metadata": info.metadata,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def logs(job_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(job_id)


def wait(job_id: str, address: str | None = None, timeout_s: float = 600.0, poll_s: float = 2.0) -> str:
    """Block until the job ends; returns its final status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = status(job_id, address)["status"]
        if state in TERMINAL:
            return state
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")
