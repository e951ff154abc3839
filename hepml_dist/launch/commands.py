"""Launching jobs on clusters: `hepml submit/status/logs` (the Ray Jobs API of a running cluster) and the
`hepml slurm ...` group (render and submit a job as a SLURM batch job running a Ray cluster)."""

import datetime
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
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the script here (default: stdout).")] = None,
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
# The Ray Jobs API of a running cluster


@app.command()
def submit(
    job: Annotated[Path, typer.Argument(help="Job file.")],
    address: Annotated[str, typer.Option("--address", help="Ray Jobs API of the cluster, e.g. http://HOST:8265.")],
    overrides: Overrides = None,
    run_dir: Annotated[str | None, typer.Option("--run-dir", help="Absolute run directory on the cluster's shared storage.")] = None,
    ship_code: Annotated[bool, typer.Option("--ship-code/--no-ship-code", help="Send the local hepml_dist package with the job.")] = True,
) -> None:
    """Submit a job to a running Ray cluster through the Jobs API; prints the submission id."""
    job_id = ray_jobs.submit(load_job(job, overrides or []), address, run_dir=run_dir, ship_code=ship_code)
    typer.echo(job_id)


@app.command()
def status(job_id: Annotated[str, typer.Argument(help="Submission id from `hepml submit`.")], address: JobsApiAddress = None) -> None:
    """Status of a submitted job."""
    info = ray_jobs.status(job_id, address)
    typer.echo(f"{info['id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))


@app.command()
def logs(job_id: Annotated[str, typer.Argument(help="Submission id from `hepml submit`.")], address: JobsApiAddress = None) -> None:
    """Logs of a submitted job."""
    typer.echo(ray_jobs.logs(job_id, address), nl=False)
