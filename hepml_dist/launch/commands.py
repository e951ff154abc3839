"""The `hepml slurm ...` command group: render and submit a job as a SLURM batch job running a Ray cluster."""

import datetime
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from hepml_dist.errors import UserError

slurm_app = typer.Typer(
    no_args_is_help=True,
    help="Run a job on a SLURM cluster: one Ray node per SLURM node inside the container, `hepml train` on the head.",
)

JobArg = Annotated[Path, typer.Argument(help="Job file.")]
SiteOpt = Annotated[
    str | None,
    typer.Option("--site", help="Site profile: a name in cluster/sites/ (lumi, a100, local) or a path to a site YAML."),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a job field, e.g. --set cluster.slurm.nodes=4 (repeatable)."),
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
    from hepml_dist.cli import load
    from hepml_dist.launch.slurm import load_site, render_sbatch

    spec = load(job, overrides)
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
    _write_atomic(output, script)
    typer.echo(f"wrote {output}", err=True)


@slurm_app.command("submit")
def submit(
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
    from rich.console import Console

    from hepml_dist.launch.slurm import follow, submit_script

    spec, profile, script = _render(job, site, overrides, site_overrides, run_dir, hold)
    log_dir = Path(profile.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    script_path = log_dir / f"{spec.name}-{stamp}.sbatch"
    _write_atomic(script_path, script)
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
    from rich.console import Console
    from rich.table import Table

    from hepml_dist.launch.slurm import cluster_dir, load_site, site_names

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
    from hepml_dist.launch.slurm import wait_for_nodes

    alive = wait_for_nodes(address, nodes, timeout)
    typer.echo(f"Ray cluster ready: {len(alive)} node{'s' if len(alive) > 1 else ''}")
    for node in sorted(alive, key=lambda n: (not n["head"], n["address"])):
        resources = node["resources"]
        role = "head" if node["head"] else "worker"
        typer.echo(f"  {role} {node['address']}: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def register(app: typer.Typer) -> None:
    app.add_typer(slurm_app, name="slurm")
