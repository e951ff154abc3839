"""Launching jobs on clusters: `hepml submit/status/logs/wait/stop/list` (the Ray Jobs API of a running cluster) and the
`hepml slurm ...` group (render and submit a job as a SLURM batch job running a Ray cluster)."""

import datetime
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hepml_dist import files
from hepml_dist.cli.options import JobsApiAddress, Overrides
from hepml_dist.errors import UserError
from hepml_dist.launch import ray_jobs
from hepml_dist.launch.slurm import (
    cluster_dir,
    follow,
    load_site,
    render_sbatch,
    site_names,
    submit_script,
    wait_for_nodes,
)
from hepml_dist.spec import load_job

app = typer.Typer()

slurm_app = typer.Typer(
    no_args_is_help=True,
    help="Run a job on a SLURM cluster: one Ray node per SLURM node inside the container, `hepml train` on the head.",
)

JobArg = Annotated[Path, typer.Argument(help="Job file.")]
SiteOpt = Annotated[
    str | None,
    typer.Option("--site", help="Site profile: a name in cluster/sites/ (lumi, a100, local) or a path to a site YAML."),
]
SiteOverrides = Annotated[
    list[str] | None,
    typer.Option("--site-set", help="Override a site field, e.g. --site-set ray.join_timeout_s=600 (repeatable)."),
]
HoldOpt = Annotated[
    bool,
    typer.Option(
        "--hold",
        help="Start the Ray cluster sized for JOB but do not train: keep it up until the time limit or scancel, "
        "for jobs sent with `hepml submit` (see cluster/ray/README.md).",
    ),
]
RunDirOpt = Annotated[
    str | None,
    typer.Option(
        "--run-dir",
        help="Run directory (shared by all nodes); `{job_id}` is the SLURM job id. Default: "
        "<storage_path>/<job name>-{job_id}. Name an existing run directory to continue it.",
    ),
]


def _render(job: Path, site: str | None, overrides: list[str] | None, site_overrides: list[str] | None,
            run_dir: str | None, hold: bool = False):  # type: ignore[no-untyped-def]
    spec = load_job(job, overrides or [])
    site_name = site or spec.cluster.slurm.site
    if not site_name:
        raise UserError(f"{job}: no site: pass --site NAME (one of cluster/sites/) or set cluster.slurm.site")
    profile = load_site(site_name, site_overrides or [])
    return spec, profile, render_sbatch(spec, profile, run_dir=run_dir, source=str(job), hold=hold)


@slurm_app.command("render")
def render(
    job: JobArg,
    site: SiteOpt = None,
    overrides: Overrides = None,
    site_overrides: SiteOverrides = None,
    run_dir: RunDirOpt = None,
    hold: HoldOpt = False,
    output: Annotated[Path | None, typer.Option("--out", "-o", help="Write the script here (default: stdout).")] = None,
) -> None:
    """Print the sbatch script that runs JOB on SITE (check it, then `sbatch` it yourself, or use `submit`)."""
    _, _, script = _render(job, site, overrides, site_overrides, run_dir, hold)
    if output is None:
        typer.echo(script, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(output, script, mode=0o755)
    typer.echo(f"wrote {output}", err=True)


@slurm_app.command("submit")
def submit_to_slurm(
    job: JobArg,
    site: SiteOpt = None,
    overrides: Overrides = None,
    site_overrides: SiteOverrides = None,
    run_dir: RunDirOpt = None,
    hold: HoldOpt = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job (through requeues) and exit with its status.")] = False,
    sbatch_args: Annotated[
        list[str] | None, typer.Option("--sbatch-arg", help="Extra sbatch option, e.g. --sbatch-arg=--dependency=afterok:123.")
    ] = None,
) -> None:
    """Render JOB for SITE, keep the script in the site's log_dir, and sbatch it."""
    spec, profile, script = _render(job, site, overrides, site_overrides, run_dir, hold)
    log_dir = Path(profile.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    script_path = log_dir / f"{spec.name}-{stamp}.sbatch"
    files.write_text(script_path, script, mode=0o755)
    job_id = submit_script(script_path, sbatch_args or [])
    out = log_dir / f"{spec.name}-{job_id}.out"
    typer.echo(f"submitted job {job_id} ({spec.name} on {profile.name}, {spec.cluster.slurm.nodes} node(s))")
    typer.echo(f"  script: {script_path}\n  output: {out}")
    if not wait:
        return
    console = Console(stderr=True)

    def show(state):  # type: ignore[no-untyped-def]
        restarts = f", restart {state.restarts}" if state.restarts else ""
        console.print(f"job {job_id}: {state.state}{restarts} {state.reason if state.reason != 'None' else ''}".rstrip())

    with console.status(f"waiting for job {job_id}"):
        final = follow(job_id, show)
    if final.state != "COMPLETED" and out.is_file():
        tail = out.read_text(errors="replace").splitlines()[-25:]
        console.print(f"[red]job {job_id} ended {final.state}[/red]; last lines of {out}:")
        console.print("\n".join(tail), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(final.exit_code if final.state == "COMPLETED" or final.exit_code else 1)


@slurm_app.command("sites")
def sites() -> None:
    """Table of the site profiles in cluster/sites/."""
    names = site_names()
    if not names:
        raise UserError(f"no site profiles in {cluster_dir() / 'sites'}")
    table = Table(title=f"sites in {cluster_dir() / 'sites'}")
    for column in ("site", "accelerators", "node", "container", "description"):
        table.add_column(column)
    for name in names:
        profile = load_site(name)
        node = f"{profile.cpus_per_node} CPUs" + (f", {profile.gpus_per_node} GPUs" if profile.gpus_per_node else "")
        table.add_row(name, ", ".join(profile.accelerators), node, profile.container.exec or "(native)", profile.description)
    Console().print(table)


@slurm_app.command("wait-nodes")
def wait_nodes(
    address: Annotated[str, typer.Argument(help="Ray head address, host:port.")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Nodes that must be alive.")],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 300.0,
) -> None:
    """Wait until NODES Ray nodes have joined the cluster at ADDRESS (used by the sbatch script)."""
    alive = wait_for_nodes(address, nodes, timeout)
    typer.echo(f"Ray cluster ready: {len(alive)} node{'s' if len(alive) > 1 else ''}")
    for node in sorted(alive, key=lambda n: (not n["head"], n["address"])):
        resources = node["resources"]
        role = "head" if node["head"] else "worker"
        typer.echo(f"  {role} {node['address']}: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU")


app.add_typer(slurm_app, name="slurm")


# ----------------------------------------------------------------------------------------------------------------
# The Ray Jobs API of a running cluster (address: --address, else $RAY_ADDRESS, else http://127.0.0.1:8265)

JobIdArg = Annotated[str, typer.Argument(help="Submission id (from `hepml submit` or `hepml list`).")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", min=0, help="Give up waiting after this many seconds (exit 4). Default: no limit."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of text.")]
ERRORS_EXIT = "2 unknown id, unreachable cluster, or a missing or wrong token (RAY_AUTH_TOKEN)"
ENDED_EXITS = f"Exit status: 0 SUCCEEDED, 1 FAILED, 3 STOPPED, 4 still running after --timeout, {ERRORS_EXIT}."
REPORT_EXITS = f"Exit status: 0 when the cluster answered, {ERRORS_EXIT}."


@app.command(help="Submit a job to a running Ray cluster through the Jobs API; prints the submission id.\n\n"
             + REPORT_EXITS)
def submit(
    job: Annotated[Path, typer.Argument(help="Job file.")],
    address: JobsApiAddress = None,
    overrides: Overrides = None,
    run_dir: Annotated[str | None, typer.Option("--run-dir", help="Absolute run directory on the cluster's shared storage.")] = None,
    ship_code: Annotated[bool, typer.Option("--ship-code/--no-ship-code", help="Send the local hepml_dist package with the job.")] = True,
) -> None:
    spec = load_job(job, overrides or [])
    typer.echo(ray_jobs.JobsApi(address).submit(spec, run_dir=run_dir, ship_code=ship_code))


@app.command(help="Status of a submitted job: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED.\n\n" + REPORT_EXITS)
def status(job_id: JobIdArg, address: JobsApiAddress = None, as_json: JsonOpt = False) -> None:
    state = ray_jobs.JobsApi(address).state(job_id)
    typer.echo(json.dumps(state.as_dict(), indent=2) if as_json else _status_line(state))


@app.command(help="Logs of a submitted job; --follow streams them until the job ends.\n\n"
             f"Exit status: 0 (with --follow: as `hepml wait`: 1 FAILED, 3 STOPPED), {ERRORS_EXIT}.")
def logs(
    job_id: JobIdArg,
    address: JobsApiAddress = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new output until the job ends (Ctrl-C stops "
                                         "following, not the job); exit with the job's final state.")] = False,
) -> None:
    api = ray_jobs.JobsApi(address)
    if not follow:
        typer.echo(api.logs(job_id), nl=False)
        return
    final = api.follow(job_id, lambda chunk: typer.echo(chunk, nl=False))
    typer.echo(f"[hepml] {_status_line(final)}", err=True)
    raise typer.Exit(ray_jobs.exit_code(final))


@app.command(help="Wait for a submitted job to end; the exit status says how it ended.\n\n" + ENDED_EXITS)
def wait(job_id: JobIdArg, address: JobsApiAddress = None, timeout: TimeoutOpt = None) -> None:
    state = ray_jobs.JobsApi(address).wait(job_id, timeout_s=timeout)
    typer.echo(_status_line(state))
    raise typer.Exit(ray_jobs.exit_code(state))


@app.command(help="Stop a submitted job (its processes get SIGTERM, then SIGKILL); --wait until it has ended.\n\n"
             "Exit status: 0 (with --wait: the job's end, as for `hepml wait`: 3 STOPPED, 4 still running after "
             f"--timeout), {ERRORS_EXIT}.")
def stop(
    job_id: JobIdArg,
    address: JobsApiAddress = None,
    wait_until_ended: Annotated[
        bool, typer.Option("--wait", help="Wait until the job has ended; exit with its state.")
    ] = False,
    timeout: TimeoutOpt = None,
) -> None:
    api = ray_jobs.JobsApi(address)
    typer.echo(f"{job_id}: stop requested" if api.stop(job_id) else f"{job_id}: had already ended")
    if wait_until_ended:
        state = api.wait(job_id, timeout_s=timeout)
        typer.echo(_status_line(state))
        raise typer.Exit(ray_jobs.exit_code(state))


@app.command("list", help="Table of the cluster's jobs: id, status, start, end, entrypoint.\n\n" + REPORT_EXITS)
def list_jobs(address: JobsApiAddress = None, as_json: JsonOpt = False) -> None:
    jobs = ray_jobs.JobsApi(address).jobs()
    if as_json:
        typer.echo(json.dumps([job.as_dict() for job in jobs], indent=2))
        return
    rows = [("ID", "STATUS", "START", "END", "ENTRYPOINT")]
    rows += [(job.id, job.status, _local_time(job.start_time), _local_time(job.end_time), _shorten(job.entrypoint))
             for job in jobs]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:  # plain columns, one job a line: easy to grep and cut
        typer.echo("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]))


def _status_line(state: ray_jobs.JobState) -> str:
    return f"{state.id}: {state.status}" + (f" ({state.message})" if state.message else "")


def _local_time(iso: str | None) -> str:
    return datetime.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S") if iso else "-"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
