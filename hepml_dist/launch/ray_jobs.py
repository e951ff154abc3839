"""Submit jobs to a running Ray cluster through the Ray Jobs API, and follow, wait for, stop and list them.

`submit` stages the resolved job spec in a fresh working directory, ships it (and, by default, the local
hepml_dist package, so the cluster runs exactly the code that validated the job) in the runtime environment, and
runs `python -m hepml_dist.cli train job.yaml --address auto --run-dir RUN_DIR` on the head node. The run
directory must be a path the cluster sees (cluster.storage_path, shared by the nodes).

Every call goes through `connect`, which picks the address (--address, else $RAY_API_SERVER_ADDRESS or
$RAY_ADDRESS, else the local default), sends the cluster's token when one is in the environment ($RAY_AUTH_TOKEN or
the file named by $RAY_AUTH_TOKEN_PATH; never printed or stored), and turns the Jobs API's failures (unreachable
address, missing or wrong token, unknown job id) into UserErrors that say what to do.
"""

import asyncio
import contextlib
import datetime
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

import hepml_dist
from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec, dump_spec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own order of precedence
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
"""Exit status of the commands that wait for a job's end (wait, logs --follow, stop --wait), by final state."""
EXIT_STILL_RUNNING = 4
"""Exit status when --timeout passes before the job ends. (2 is every user error: unknown id, no cluster, token.)"""
TERMINAL = set(EXIT_CODES)


@dataclass(frozen=True)
class JobState:
    """What the Jobs API knows of one job; times are ISO 8601 (UTC) or None."""

    id: str
    status: str
    message: str
    entrypoint: str
    start_time: str | None
    end_time: str | None
    metadata: dict
    type: str

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_address(address: str | None) -> str:
    return address or next((os.environ[v] for v in ADDRESS_VARIABLES if os.environ.get(v)), DEFAULT_ADDRESS)


def token_from_environment() -> tuple[str, str] | None:
    """(token, where it came from) when the environment names the cluster's token, else None (then Ray's own
    lookup applies: with RAY_AUTH_MODE=token it reads ~/.ray/auth_token)."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({err.strerror})") from None
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token, f"the file {path} (RAY_AUTH_TOKEN_PATH)"
    return None


class JobsApi:
    """The Jobs API of one cluster; every method raises UserError for what the user can fix."""

    def __init__(self, address: str | None = None):
        self.address = resolve_address(address)
        token = token_from_environment()
        # Ray sends a token only under RAY_AUTH_MODE=token; an explicit header makes RAY_AUTH_TOKEN alone enough.
        headers = {"Authorization": f"Bearer {token[0]}"} if token else {}
        self.token_source = token[1] if token else "Ray's token file (RAY_AUTH_MODE=token)"
        with self.translated(), _address_variables_unset():
            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextlib.contextmanager
    def translated(self, job_id: str | None = None) -> Iterator[None]:
        """Turn the client's exceptions into UserErrors naming the address, the token's source or the job id."""
        try:
            yield
        except AuthenticationError as err:
            raise UserError(self._auth_problem(401 if "required" in err.message.split(":")[0] else 403)) from None
        except aiohttp.WSServerHandshakeError as err:
            if err.status in (401, 403):
                raise UserError(self._auth_problem(err.status)) from None
            if err.status == 404 and job_id:
                raise UserError(self._unknown(job_id)) from None
            raise
        except (ConnectionError, requests.RequestException, aiohttp.ClientConnectionError) as err:
            raise UserError(f"cannot reach the Ray Jobs API at {self.address} ({type(err).__name__}: {err}); "
                            "is the cluster up and its dashboard port (8265) reachable?") from None
        except RuntimeError as err:  # the client's answer to any other refused request
            if job_id and "status code 404" in str(err):
                raise UserError(self._unknown(job_id)) from None
            raise UserError(f"the Ray Jobs API at {self.address}: {err}") from None

    def _auth_problem(self, status: int) -> str:
        if status == 401:
            return (f"the cluster at {self.address} requires a token: set RAY_AUTH_TOKEN to the cluster's token (or "
                    "RAY_AUTH_TOKEN_PATH to a file holding it); `ray get-auth-token` on the head node prints it")
        return (f"the cluster at {self.address} refused the token from {self.token_source}: it is not this "
                "cluster's token (compare with `ray get-auth-token` on the head node)")

    def _unknown(self, job_id: str) -> str:
        return f"no job {job_id!r} on the cluster at {self.address} (`hepml list` shows the jobs it knows)"

    def state(self, job_id: str) -> JobState:
        with self.translated(job_id):
            return _state(self.client.get_job_info(job_id))

    def jobs(self) -> list[JobState]:
        with self.translated():
            found = [_state(details) for details in self.client.list_jobs()]
        return sorted(found, key=lambda job: job.start_time or "")

    def logs(self, job_id: str) -> str:
        with self.translated(job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> JobState:
        """Stream the job's output to `write` until the job ends; returns its final state."""
        self.state(job_id)  # an unknown id fails here, with a clear message

        async def stream() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        with self.translated(job_id):
            asyncio.run(stream())
        return self.wait(job_id, timeout_s=30.0)  # the stream closes at the end; the state may lag a moment

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already ended."""
        with self.translated(job_id):
            return self.client.stop_job(job_id)

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> JobState:
        """The job's state once it has ended, or when `timeout_s` has passed (then it is still running)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not (state := self.state(job_id)).ended:
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
        return state

    def submit(self, spec: JobSpec, *, run_dir: str | None = None, ship_code: bool = True,
               submission_id: str | None = None) -> str:
        """Submit the job; returns the submission id."""
        target = run_dir or (str(Path(spec.cluster.storage_path) / spec.name) if spec.cluster.storage_path else None)
        if target is None or not os.path.isabs(target):
            raise UserError(
                "cluster.storage_path: a submitted job needs an absolute directory that the cluster's nodes share "
                "(set cluster.storage_path, or pass --run-dir /shared/path)"
            )
        with tempfile.TemporaryDirectory(prefix="hepml-submit-") as staging:  # uploaded by submit_job
            (Path(staging) / "job.yaml").write_text(dump_spec(spec))
            runtime_env: dict = {"working_dir": staging, "env_vars": {"PYTHONUNBUFFERED": "1"}}
            if ship_code:
                runtime_env["py_modules"] = [str(Path(hepml_dist.__file__).parent)]
            if os.environ.get("COMET_API_KEY"):
                runtime_env["env_vars"]["COMET_API_KEY"] = os.environ["COMET_API_KEY"]
            with self.translated():
                return self.client.submit_job(
                    entrypoint=f"python -u -m hepml_dist.cli train job.yaml --address auto --run-dir {target}",
                    runtime_env=runtime_env,
                    submission_id=submission_id or f"hepml-{spec.name}-{uuid.uuid4().hex[:8]}",
                    metadata={"hepml_job": spec.name, "run_dir": target},
                )


def exit_code(state: JobState) -> int:
    return EXIT_CODES.get(state.status, EXIT_STILL_RUNNING)


@contextlib.contextmanager
def _address_variables_unset() -> Iterator[None]:
    """Ray's client lets $RAY_ADDRESS override the address it is given; an explicit --address must win."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _iso(milliseconds: int | None) -> str | None:
    if not milliseconds:
        return None
    return datetime.datetime.fromtimestamp(milliseconds / 1000, tz=datetime.timezone.utc).isoformat(timespec="seconds")


def _state(details) -> JobState:  # type: ignore[no-untyped-def]
    return JobState(
        id=details.submission_id or details.job_id or "",
        status=str(details.status),
        message=details.message or "",
        entrypoint=details.entrypoint or "",
        start_time=_iso(details.start_time),
        end_time=_iso(details.end_time),
        metadata=dict(details.metadata or {}),
        type=str(details.type.value if hasattr(details.type, "value") else details.type),
    )
