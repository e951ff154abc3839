"""`hepml chain submit FILE --site SITE`: every stage of a chain becomes one SLURM batch job, started by SLURM when
the stages it needs have completed (`--dependency=afterok:...`).

A job stage is rendered exactly as `hepml slurm submit` renders a job (launch/slurm.py: a Ray cluster over the
job's nodes, inside the container, `hepml train` on the head, pre-emption and requeue); its run directory is the
one the chain planned, so the stages after it find it. A step stage (tokenize, evaluate, report, ...) runs its
command line in the same container prefix from a one-node script (cluster/slurm/chain-step.sbatch.j2). Jobs are
submitted in dependency order with `--kill-on-invalid-dep=yes`: when a stage fails, SLURM cancels every stage
that waits on it instead of leaving them pending forever. <chain dir>/chain-slurm.json records stage -> job id
after each submission, so a submission that stops half-way says what it left queued.
"""

from __future__ import annotations

import datetime
import shlex
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from hepml_dist import files
from hepml_dist.chain.plan import PlannedStage, plan_chain
from hepml_dist.chain.run import output_complete
from hepml_dist.errors import UserError
from hepml_dist.launch.slurm import (
    SLURM_TIME,
    SiteProfile,
    load_site,
    render_sbatch,
    shell_value,
    shell_words,
    submit_script,
    templates,
)
from hepml_dist.spec import JobSpec, load_job

STEP_TEMPLATE = "chain-step.sbatch.j2"
RECORD_FILE = "chain-slurm.json"
DEFAULT_STEP_TIME = "04:00:00"
# Options of `hepml train` that take a value; the chain renders only --set and --run-dir, the others are the
# launcher's business on the cluster (the Ray address is the job's own cluster).
_TRAIN_VALUE_OPTIONS = {"--address", "--resume"}


@dataclass(frozen=True)
class TrainCommand:
    """What a job stage's `hepml train JOB --set ... --run-dir DIR` command line asks for."""

    job: Path
    overrides: list[str]
    run_dir: str | None


def parse_train_command(stage: PlannedStage) -> TrainCommand:
    """The job file, overrides and run directory of a job stage's command line."""
    argv = list(stage.argv)
    if "train" not in argv:
        raise UserError(f"stage {stage.name!r}: a job stage runs `hepml train JOB ...`, its command is {shlex.join(argv)}")
    words = iter(argv[argv.index("train") + 1:])
    job: Path | None = None
    overrides: list[str] = []
    run_dir: str | None = None
    for word in words:
        option, equals, inline = word.partition("=")
        if option in ("--set", "-s", "--run-dir", *_TRAIN_VALUE_OPTIONS):
            value = inline if equals else next(words, None)
            if value is None:
                raise UserError(f"stage {stage.name!r}: {option} without a value in {shlex.join(argv)}")
            if option in ("--set", "-s"):
                overrides.append(value)
            elif option == "--run-dir":
                run_dir = value
        elif not word.startswith("-") and job is None:
            job = Path(word)
    if job is None:
        raise UserError(f"stage {stage.name!r}: no job file in its command {shlex.join(argv)}")
    return TrainCommand(job, overrides, stage.outputs.get("run_dir") or run_dir)


def topological(stages: Sequence[PlannedStage]) -> list[PlannedStage]:
    """The stages in an order where every stage comes after those it needs (the given order where it allows)."""
    by_name = {stage.name: stage for stage in stages}
    for stage in stages:
        unknown = [need for need in stage.needs if need not in by_name]
        if unknown:
            raise UserError(f"stage {stage.name!r}: needs: unknown stage(s) {', '.join(unknown)}")
    ordered: list[PlannedStage] = []
    placed: set[str] = set()
    while len(ordered) < len(stages):
        ready = [s for s in stages if s.name not in placed and all(n in placed for n in s.needs)]
        if not ready:
            stuck = sorted(s.name for s in stages if s.name not in placed)
            raise UserError(f"stages {', '.join(stuck)}: their needs form a cycle; nothing was submitted")
        ordered.append(ready[0])
        placed.add(ready[0].name)
    return ordered


def slurm_job_name(chain: str, stage: str) -> str:
    return f"{chain}.{stage}" if chain else stage


def render_step(stage: PlannedStage, site: SiteProfile, chain: str = "", time: str = DEFAULT_STEP_TIME,
                image: str | None = None) -> str:
    """The one-node sbatch script that runs a step stage's command line in the site's container."""
    if stage.gpus > site.gpus_per_node:
        raise UserError(f"stage {stage.name!r} needs {stage.gpus} GPUs; a node of site {site.name!r} has "
                        f"{site.gpus_per_node}")
    image = image or site.container.image
    if "{image}" in site.container.exec and not image:
        raise UserError(f"stage {stage.name!r}: site {site.name!r} runs everything in a container; name the image "
                        f"with --site-set container.image=/path/hepml-{site.vendor}.sif (or give the chain's jobs one: "
                        "set cluster.slurm.container_image=...)")
    prefix = site.container.exec.replace("{image}", image or "")
    context = {
        "header": f"Rendered by `hepml chain submit` for stage {stage.name} ({stage.kind}) on site {site.name}.",
        "job_name": slurm_job_name(chain, stage.name),
        "stage": stage.name,
        "site_name": site.name,
        # a step runs on one node: at most all of its cores
        "cpus": max(1, min(stage.cpus, site.cpus_per_node)),
        "gpus": stage.gpus,
        "mem": site.mem,
        "time": time,
        "partition": site.partition,
        "account": site.account,
        "qos": site.qos,
        "log_dir": site.log_dir,
        "requeue": site.requeue,
        "sbatch_options": site.sbatch,
        "container": shell_words(prefix, {}, "site container.exec"),
        "image": shlex.quote(image) if image and "{image}" in site.container.exec else None,
        "env": [(name, shell_value(value)) for name, value in site.env.items()],
        "setup": site.setup,
        "command": [shlex.quote(word) for word in stage.argv],
    }
    return templates().get_template(STEP_TEMPLATE).render(**context)


@dataclass(frozen=True)
class Rendered:
    """One stage's batch script and where SLURM will write its output (`%j`: the job id)."""

    script: str
    output: str


def stage_job(stage: PlannedStage, jobs: dict[str, JobSpec]) -> JobSpec:
    """A job stage's loaded spec: from `jobs` (ChainPlan.jobs), else loaded from its command line."""
    if stage.name in jobs:
        return jobs[stage.name]
    command = parse_train_command(stage)
    return load_job(command.job, command.overrides)


def steps_image(specs: list[JobSpec]) -> str | None:
    """The image steps run in: the one image the chain's jobs name (steps need the same software), if they agree."""
    images = {spec.cluster.slurm.container_image for spec in specs} - {None}
    return images.pop() if len(images) == 1 else None


def render_stage(stage: PlannedStage, site: SiteProfile, chain: str = "", step_time: str = DEFAULT_STEP_TIME,
                 job: JobSpec | None = None, image: str | None = None) -> Rendered:
    """A job stage's Ray-cluster script (`job`: its spec) or a step's one-node script (in `image`, else the site's)."""
    if stage.kind != "job":
        return Rendered(render_step(stage, site, chain, step_time, image),
                        f"{site.log_dir}/{slurm_job_name(chain, stage.name)}-%j.out")
    spec = job or stage_job(stage, {})
    script = render_sbatch(spec, site, run_dir=parse_train_command(stage).run_dir, source=f"chain stage {stage.name}")
    return Rendered(script, f"{site.log_dir}/{spec.name}-%j.out")


def _write_record(chain_dir: Path, site: SiteProfile, record: dict[str, dict[str, Any]]) -> None:
    files.write_json(chain_dir / RECORD_FILE, {
        "site": site.name,
        "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jobs": {name: entry["job_id"] for name, entry in record.items()},
        "stages": record,
    })


def submit_chain(stages: Sequence[PlannedStage], site: str | SiteProfile, chain_dir: Path,
                 site_overrides: Sequence[str] = (), skip: Collection[str] = (), chain: str = "",
                 step_time: str = DEFAULT_STEP_TIME, jobs: dict[str, JobSpec] | None = None) -> dict[str, str]:
    """Submit every stage (but those in `skip`, finished already) as a SLURM job that waits for the jobs of the
    stages it needs; returns stage -> job id, also written to <chain_dir>/chain-slurm.json. `jobs`: the loaded
    spec of each job stage (ChainPlan.jobs); a job stage not in it is loaded from its command line. Steps run in
    the container image the jobs name (when they name one), else the site's `container.image`.

    All scripts are rendered (and so checked against the site) before the first sbatch."""
    if not SLURM_TIME.match(step_time):
        raise UserError(f"step time {step_time!r} is not a SLURM time limit (HH:MM:SS or D-HH:MM:SS)")
    profile = site if isinstance(site, SiteProfile) else load_site(site, site_overrides)
    chain_dir = Path(chain_dir)
    ordered = [stage for stage in topological(stages) if stage.name not in skip]
    specs = {stage.name: stage_job(stage, jobs or {}) for stage in stages if stage.kind == "job"}
    image = steps_image(list(specs.values()))
    rendered = {stage.name: render_stage(stage, profile, chain, step_time, specs.get(stage.name), image)
                for stage in ordered}
    script_dir = chain_dir / "slurm"
    script_dir.mkdir(parents=True, exist_ok=True)
    Path(profile.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    record: dict[str, dict[str, Any]] = {}
    for stage in ordered:
        script_path = files.write_text(script_dir / f"{stage.name}.sbatch", rendered[stage.name].script, mode=0o755)
        waits_for = [record[need]["job_id"] for need in stage.needs if need in record]
        options = [f"--job-name={slurm_job_name(chain, stage.name)}"]
        if waits_for:
            options += [f"--dependency=afterok:{':'.join(waits_for)}", "--kill-on-invalid-dep=yes"]
        try:
            job_id = submit_script(script_path, options)
        except UserError as err:
            queued = ", ".join(f"{name} {entry['job_id']}" for name, entry in record.items()) or "none"
            raise UserError(f"stage {stage.name!r}: {err}\nalready queued (scancel them or leave them): {queued}; "
                            f"see {chain_dir / RECORD_FILE}") from None
        record[stage.name] = {
            "job_id": job_id,
            "kind": stage.kind,
            "needs": list(stage.needs),
            "script": str(script_path),
            "output": rendered[stage.name].output.replace("%j", job_id),
        }
        _write_record(chain_dir, profile, record)
    return {name: entry["job_id"] for name, entry in record.items()}


def submit_command(
    chain: Annotated[Path, typer.Argument(help="Chain file (YAML: name, set, stages).")],
    site: Annotated[str, typer.Option(
        "--site", help="Site profile: a name in cluster/sites/ (lumi, a100, local) or a path to a site YAML.")],
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="Folder of the chain's state, logs and default outputs (default: the file's workdir, "
        "else chains/<name>); on storage every node sees.")] = None,
    site_overrides: Annotated[list[str] | None, typer.Option(
        "--site-set", help="Override a site field, e.g. --site-set container.image=/path/hepml.sif (repeatable).")] = None,
    step_time: Annotated[str, typer.Option(
        "--step-time", help="Time limit of each step stage (tokenize, evaluate, ...); job stages use their "
        "cluster.slurm.time.")] = DEFAULT_STEP_TIME,
    everything: Annotated[bool, typer.Option(
        "--all", help="Submit the stages whose outputs are complete too (default: skip them).")] = False,
) -> None:
    """Submit every stage of a chain to SLURM as a job that starts when the stages it needs have completed."""
    plan = plan_chain(chain, workdir)
    done = [] if everything else [stage.name for stage in plan.stages if output_complete(stage)]
    ids = submit_chain(plan.stages, site, plan.workdir, site_overrides or [], skip=done, chain=plan.spec.name,
                       step_time=step_time, jobs=plan.jobs)
    for stage in plan.stages:
        needs = f" (after {', '.join(stage.needs)})" if stage.needs else ""
        typer.echo(f"  {stage.name}: " + (f"job {ids[stage.name]}{needs}" if stage.name in ids else "done, not submitted"))
    typer.echo(f"submitted {len(ids)} job(s) of chain {plan.spec.name}; stage -> job id in "
               f"{plan.workdir / RECORD_FILE} (squeue --me; a failed stage cancels the stages after it)")
