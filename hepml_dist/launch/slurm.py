"""SLURM launch: site profiles, the sbatch script that runs a Ray cluster inside an allocation, submission and follow-up.

A *site profile* (cluster/sites/<name>.yaml) says what a node of a cluster looks like (CPUs, GPUs, accelerator), how
to run a command in the container, and the site's environment (NCCL/RCCL interfaces, MIOpen cache). The job spec
says how many nodes and for how long (`cluster.slurm`). `render_sbatch` joins the two into one self-contained bash
script (cluster/slurm/ray-cluster.sbatch.j2) with the resolved job embedded, so what runs is what was validated.
"""

from __future__ import annotations

import re
import shlex
import string
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from pydantic import Field, ValidationError, field_validator
from ray._raylet import GcsClient

from hepml_dist.locations import cluster_dir
from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec, SpecError, dump_spec
from hepml_dist.spec.base import Section
from hepml_dist.spec.loader import deep_merge, resolve_extends
from hepml_dist.spec.parallel import ACCELERATORS, Accelerator

TEMPLATE = "ray-cluster.sbatch.j2"
DEFAULT_TRAIN_COMMAND = "hepml train {job} --address {address} --run-dir {run_dir}"
# Ray puts its AF_UNIX sockets at <temp dir>-<node>/session_<date>_<time>_<pid>/sockets/plasma_store (and raylet);
# the kernel limit for such a path is 107 bytes.
_RAY_SOCKET_SUFFIX = len("-99/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_AF_UNIX_LIMIT = 107


class ContainerSite(Section):
    """How a command runs inside the job's container image."""

    exec: str = ""
    """Command prefix that runs a command in the image, e.g. `apptainer exec --nv {image}` (CUDA) or
    `singularity exec --rocm -B /scratch {image}` (ROCm); `{image}` becomes the job's `cluster.slurm.container_image`
    (or `image` below). Empty: run natively."""
    image: str | None = None
    """Image used when the job names none (a .sif path, or a URI such as docker://...)."""


class RaySite(Section):
    """How the Ray nodes are started inside the allocation."""

    port: int = Field(6379, ge=1024, le=65535)
    """GCS port of the Ray head."""
    port_range_start: int = Field(30000, ge=1024, le=64000)
    """Start of the per-node port blocks (1000 ports each: node manager, object manager, agents, worker ports).
    Nodes that share an IP (several SLURM nodes on one host) get consecutive blocks."""
    temp_dir: str = "/tmp/ray-{job_id}"
    """Node-local Ray temp dir (`-<node index>` is appended). Keep it short: Ray's sockets live below it and AF_UNIX
    paths are limited to 107 bytes. `{job_id}` is the SLURM job id."""
    join_timeout_s: int = Field(300, ge=5)
    """Seconds to wait for the head to come up and for every node to join before the job fails."""
    dashboard: bool = True
    """Start the Ray dashboard on the head (port = block start + 7, bound to localhost; reach it with an ssh tunnel).
    Ray Train's state API and `hepml submit` (Jobs API) need it."""
    ip_interface: str | None = None
    """Network interface whose IPv4 address each node uses for Ray (e.g. `hsn0`); None: the node's SLURM NodeAddr."""


class SiteProfile(Section):
    """One cluster: its nodes, container runtime, environment and SLURM defaults."""

    name: str
    """Short site name (the file name without .yaml)."""
    description: str = ""
    """One line on the machine."""
    accelerators: list[Accelerator] = Field(min_length=1)
    """Accelerator types a job may request on this site (`parallel.accelerator`); `cpu` for CPU-only nodes."""
    cpus_per_node: int = Field(ge=1)
    """CPU cores per node given to the job and to Ray (`--cpus-per-task`, `ray start --num-cpus`)."""
    gpus_per_node: int = Field(0, ge=0)
    """GPUs per node (`--gpus-per-node`, `ray start --num-gpus`; an MI250X has 2 GCDs, each one GPU)."""
    gres: str | None = None
    """Explicit GRES request instead of --gpus-per-node, e.g. `gpu:a100:4`."""
    mem: str | None = None
    """Memory per node (`--mem`), e.g. `480G`; None: the partition's default."""
    partition: str | None = None
    """Default partition (the job's `cluster.slurm.partition` wins)."""
    account: str | None = None
    """Default account/project (the job's `cluster.slurm.account` wins)."""
    qos: str | None = None
    """Default QOS (the job's `cluster.slurm.qos` wins)."""
    sbatch: list[str] = Field(default_factory=list)
    """Extra #SBATCH options, e.g. `--exclusive`."""
    srun: list[str] = Field(default_factory=list)
    """Extra srun options for the Ray node steps, e.g. `--gpus-per-node=8`."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run by the batch script before anything else (e.g. `module load ...`)."""
    node_setup: list[str] = Field(default_factory=list)
    """Shell lines run on every node before `ray start` (e.g. creating a node-local cache directory)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment of the job (NCCL/RCCL interfaces, MIOpen cache, ...); values are expanded by the shell, so
    `${SLURM_JOB_ID}` and `${USER}` work."""
    container: ContainerSite = Field(default_factory=ContainerSite)
    """Container runtime."""
    ray: RaySite = Field(default_factory=RaySite)
    """Ray start-up."""
    train_command: str = DEFAULT_TRAIN_COMMAND
    """Training command run (inside the container) as the Ray driver on the head node. Placeholders: `{job}` (the
    resolved job file), `{address}` (the Ray head, host:port), `{run_dir}`. It must checkpoint and exit on SIGUSR1
    and resume when re-run with the same run directory."""
    storage_path: str | None = None
    """Shared directory for run directories when the job sets no `cluster.storage_path`; None: ./runs."""
    log_dir: str = "slurm-logs"
    """Directory (relative to the submit directory, or absolute) for the job's output, script and job file."""
    preempt_seconds: int = Field(120, ge=10)
    """SLURM sends USR1 this many seconds before the time limit (`--signal=B:USR1@N`): checkpoint and requeue."""
    requeue: bool = True
    """Requeue the job after a pre-emption signal; the next run resumes from the checkpoint."""
    max_requeues: int = Field(20, ge=0)
    """Give up requeueing after this many restarts."""

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if bad:
            raise ValueError(f"not shell variable names: {', '.join(bad)}")
        return env

    @field_validator("sbatch", "srun")
    @classmethod
    def _options(cls, options: list[str]) -> list[str]:
        bad = [option for option in options if not option.startswith("-")]
        if bad:
            raise ValueError(f"options start with '-', e.g. --exclusive (got {bad})")
        return options

    @property
    def vendor(self) -> str:
        return ACCELERATORS[self.accelerators[0]].vendor


# ----------------------------------------------------------------------------------------------------- site files


def site_names() -> list[str]:
    return sorted(p.stem for p in (cluster_dir() / "sites").glob("*.yaml"))


def site_path(site: str) -> Path:
    """A site given by name (cluster/sites/<name>.yaml) or by path."""
    if site.endswith((".yaml", ".yml")) or "/" in site:
        path = Path(site)
        if not path.is_file():
            raise UserError(f"site file {site} not found")
        return path
    path = cluster_dir() / "sites" / f"{site}.yaml"
    if not path.is_file():
        known = ", ".join(site_names()) or "none"
        raise UserError(f"unknown site {site!r}: no {path} (known sites: {known}; or give a path to a site YAML)")
    return path


def set_dotted(data: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a mapping."""
    for raw in overrides:
        key, sep, text = raw.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{source}: --site-set {raw!r}: write field.path=value, e.g. ray.join_timeout_s=600")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        override: Any = value
        for part in reversed(key.strip().split(".")):
            override = {part: override}
        data = deep_merge(data, override)
    return data


def load_site(site: str, overrides: Sequence[str] = ()) -> SiteProfile:
    """Load a site profile (name or path; `extends` other site files like job files do) with `--site-set` overrides."""
    path = site_path(site)
    try:
        data = resolve_extends(path)
    except SpecError as err:
        raise UserError("\n".join(str(p) for p in err.problems)) from None
    data = set_dotted(data, overrides, str(path))
    data.setdefault("name", path.stem)
    try:
        return SiteProfile.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(part) for part in e["loc"]) or "(top level)"
            message = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"{path}: {where}: {message}")
        raise UserError("invalid site profile:\n" + "\n".join(lines)) from None


# ------------------------------------------------------------------------------------------------------ rendering


def shell_word(template: str, variables: dict[str, str], what: str) -> str:
    """A template with `{name}` placeholders as one bash word: literal text single-quoted, each placeholder a
    double-quoted reference to the shell variable `variables[name]` (expanded when the script runs)."""
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(shlex.quote(literal))
        if field is None:
            continue
        if field not in variables or spec or conversion:
            known = ", ".join("{" + name + "}" for name in variables) or "none"
            raise UserError(f"{what}: unknown placeholder {{{field}}} in {template!r} (known: {known})")
        parts.append(f'"${{{variables[field]}}}"')
    return "".join(parts) or "''"


def shell_words(template: str, variables: dict[str, str], what: str) -> list[str]:
    """A command template split like a shell would, each word quoted by shell_word."""
    try:
        words = shlex.split(template)
    except ValueError as err:
        raise UserError(f"{what}: cannot split {template!r}: {err}") from None
    return [shell_word(word, variables, what) for word in words]


def shell_value(value: str) -> str:
    """A double-quoted bash word that still expands $VAR and ${VAR}."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'


@dataclass(frozen=True)
class Plan:
    """The resolved choices of one submission."""

    nodes: int
    image: str | None
    partition: str | None
    account: str | None
    qos: str | None
    run_dir: str


SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
"""A SLURM time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""


def plan(spec: JobSpec, site: SiteProfile, run_dir: str | None = None) -> Plan:
    """Check that the job fits the site; every problem is reported at once, naming the field to change."""
    slurm = spec.cluster.slurm
    parallel = spec.parallel
    problems: list[str] = []
    wrong = [a for a in parallel.accelerators if a not in site.accelerators]
    if wrong:
        problems.append(
            f"parallel.accelerator: {', '.join(wrong)} is not available on site {site.name!r} "
            f"(it has {', '.join(site.accelerators)})"
        )
    if parallel.gpus_per_worker > site.gpus_per_node:
        problems.append(
            f"parallel.gpus_per_worker: {parallel.gpus_per_worker} GPUs per worker, but a node of {site.name!r} "
            f"has {site.gpus_per_node}"
        )
    gpus = parallel.num_workers * parallel.gpus_per_worker
    if gpus > slurm.nodes * site.gpus_per_node:
        problems.append(
            f"parallel.num_workers: {parallel.num_workers} workers x {parallel.gpus_per_worker:g} GPU need {gpus:g} "
            f"GPUs; cluster.slurm.nodes={slurm.nodes} x {site.gpus_per_node} GPUs on {site.name!r} give "
            f"{slurm.nodes * site.gpus_per_node}: raise cluster.slurm.nodes or lower parallel.num_workers"
        )
    cpus = parallel.num_workers * parallel.cpus_per_worker
    if parallel.cpus_per_worker > site.cpus_per_node or cpus > slurm.nodes * site.cpus_per_node:
        problems.append(
            f"parallel.cpus_per_worker: {parallel.num_workers} workers x {parallel.cpus_per_worker:g} CPUs do not fit "
            f"on {slurm.nodes} node(s) of {site.cpus_per_node} CPUs ({site.name!r}): lower parallel.cpus_per_worker "
            f"or raise cluster.slurm.nodes"
        )
    if not SLURM_TIME.match(slurm.time):
        problems.append(f"cluster.slurm.time: {slurm.time!r} is not a SLURM time (HH:MM:SS or D-HH:MM:SS)")
    image = slurm.container_image or site.container.image
    if "{image}" in site.container.exec and not image:
        problems.append(
            f"cluster.slurm.container_image: site {site.name!r} runs everything in a container; name the image "
            f"(e.g. --set cluster.slurm.container_image=/path/hepml-{site.vendor}.sif)"
        )
    longest_temp = len(site.ray.temp_dir.replace("{job_id}", "9" * 10)) + _RAY_SOCKET_SUFFIX
    if longest_temp > _AF_UNIX_LIMIT:
        problems.append(
            f"site ray.temp_dir: {site.ray.temp_dir!r} is too long: Ray's socket paths below it would reach "
            f"{longest_temp} bytes, over the {_AF_UNIX_LIMIT}-byte AF_UNIX limit; use a short node-local path such "
            f"as /tmp/ray-{{job_id}}"
        )
    if problems:
        raise UserError(f"job {spec.name!r} does not fit site {site.name!r}:\n  " + "\n  ".join(problems))
    storage = spec.cluster.storage_path or site.storage_path or "runs"
    return Plan(
        nodes=slurm.nodes,
        image=image,
        partition=slurm.partition or site.partition,
        account=slurm.account or site.account,
        qos=slurm.qos or site.qos,
        run_dir=run_dir or f"{storage}/{spec.name}-{{job_id}}",
    )


def templates():  # type: ignore[no-untyped-def]
    """The Jinja environment of the sbatch templates in cluster/slurm/ (bash-safe comment markers)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(cluster_dir() / "slurm"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        # bash's ${#array[@]} would open a Jinja comment
        comment_start_string="{##",
        comment_end_string="##}",
    )


HOLD_COMMAND = "sleep infinity"


def render_sbatch(
    spec: JobSpec, site: SiteProfile, run_dir: str | None = None, source: str = "", hold: bool = False
) -> str:
    """The sbatch script for `spec` on `site` (see cluster/slurm/ray-cluster.sbatch.j2).

    `hold`: start the Ray cluster and keep it up until the time limit (or scancel) instead of training, for jobs
    sent with `hepml submit` (Jobs API); it is not requeued."""
    if hold:
        site = site.model_copy(update={"train_command": HOLD_COMMAND, "requeue": False})
    chosen = plan(spec, site, run_dir)
    job_yaml = dump_spec(spec)
    if "HEPML_JOB_SPEC_END" in job_yaml:
        raise UserError("the job spec contains the text HEPML_JOB_SPEC_END, which ends the embedded job; remove it")
    prefix = site.container.exec.replace("{image}", chosen.image or "")
    runtime = {"job": "HEPML_JOB_FILE", "address": "HEAD_ADDRESS", "run_dir": "HEPML_RUN_DIR"}
    context = {
        "header": f"Rendered by `hepml slurm render` for job {spec.name} on site {site.name}"
        + (f" from {source}" if source else "")
        + ".",
        "job_name": spec.name,
        "site_name": site.name,
        "nodes": chosen.nodes,
        "cpus_per_node": site.cpus_per_node,
        "gpus_per_node": site.gpus_per_node,
        "gres": site.gres,
        "mem": site.mem,
        "time": spec.cluster.slurm.time,
        "partition": chosen.partition,
        "account": chosen.account,
        "qos": chosen.qos,
        "log_dir": site.log_dir,
        "log_dir_word": shell_word(site.log_dir, {}, "site log_dir"),
        "preempt_seconds": site.preempt_seconds,
        "requeue": site.requeue,
        "max_requeues": site.max_requeues,
        "sbatch_options": site.sbatch,
        "srun_options": [shlex.quote(option) for option in site.srun],
        "container": shell_words(prefix, {}, "site container.exec"),
        "image": shlex.quote(chosen.image) if chosen.image and "{image}" in site.container.exec else None,
        "ray": site.ray,
        "temp_root": shell_word(site.ray.temp_dir, {"job_id": "SLURM_JOB_ID"}, "site ray.temp_dir"),
        "run_dir": shell_word(chosen.run_dir, {"job_id": "SLURM_JOB_ID"}, "--run-dir"),
        "env": [(name, shell_value(value)) for name, value in site.env.items()],
        "setup": site.setup,
        "node_setup": site.node_setup,
        "train_command": " ".join(shell_words(site.train_command, runtime, "site train_command")),
        "job_yaml": job_yaml,
    }
    return templates().get_template(TEMPLATE).render(**context)


# ----------------------------------------------------------------------------------------------------- submission


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(f"{command[0]} not found: run this on a SLURM login node (or install SLURM)") from None


def submit_script(script: Path, extra: Sequence[str] = ()) -> str:
    """`sbatch --parsable` the script; returns the job id."""
    done = _run(["sbatch", "--parsable", *extra, str(script)])
    if done.returncode != 0:
        raise UserError(f"sbatch {script} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


@dataclass(frozen=True)
class JobState:
    """What `scontrol show job` says about a job."""

    state: str
    exit_code: int
    restarts: int
    reason: str

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}  # fmt: skip


def job_state(job_id: str) -> JobState | None:
    """The job's state, or None when SLURM no longer knows it."""
    done = _run(["scontrol", "show", "job", "-o", job_id])
    if done.returncode != 0:
        return None
    fields = dict(item.split("=", 1) for item in done.stdout.split() if "=" in item)
    code = fields.get("ExitCode", "0:0").split(":")
    status, signal = int(code[0] or 0), int(code[1] or 0) if len(code) > 1 else 0
    return JobState(
        state=fields.get("JobState", "UNKNOWN"),
        exit_code=status if status else (128 + signal if signal else 0),
        restarts=int(fields.get("Restarts", 0)),
        reason=fields.get("Reason", ""),
    )


def follow(job_id: str, on_change: Callable[[JobState], None] = lambda state: None, poll_s: float = 1.0) -> JobState:
    """Poll the job until it reaches a final state (a requeued job goes on), calling `on_change` on every change."""
    last: JobState | None = None
    while True:
        state = job_state(job_id)
        if state is None:
            raise UserError(f"SLURM no longer knows job {job_id} (purged after MinJobAge?); check its output file")
        if state != last:
            on_change(state)
            last = state
        if state.finished:
            return state
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------------- on the node


def alive_nodes(address: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The alive nodes of the Ray cluster at `address`, from its GCS (as `ray status` reads them): no driver is
    started, so this works before any raylet has registered. Connecting blocks for about 30 s when nothing listens
    at `address`; the sbatch script only calls it once the head's port answers."""
    try:
        infos = GcsClient(address=address).get_all_node_info(timeout=timeout_s).values()
    except Exception as err:  # noqa: BLE001 - RPC errors come in several types; the caller retries
        raise ConnectionError(f"cannot read the node table of the Ray cluster at {address}: {err}") from None
    return [
        {
            "address": f"{info.node_manager_address}:{info.node_manager_port}",
            "head": bool(info.is_head_node),
            "resources": dict(info.resources_total),
        }
        for info in infos
        if info.state == 0  # GcsNodeInfo.ALIVE
    ]


def wait_for_nodes(address: str, nodes: int, timeout_s: float) -> list[dict[str, Any]]:
    """Wait until `nodes` Ray nodes are alive in the cluster at `address`; returns them."""
    deadline = time.monotonic() + timeout_s
    alive: list[dict[str, Any]] = []
    error = ""
    while time.monotonic() < deadline:
        try:
            alive, error = alive_nodes(address), ""
        except ConnectionError as err:
            error = f" (last error: {err})"
        if len(alive) >= nodes:
            return alive
        time.sleep(1.0)
    raise UserError(
        f"only {len(alive)} of {nodes} Ray nodes joined {address} within {timeout_s:g} s{error}; "
        "see the node steps' output in the job log"
    )
