"""CLI verbs of the training engine: train, evaluate, submit, status, logs."""

from pathlib import Path
from typing import Annotated

import typer

from hepml_dist.errors import UserError

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field, e.g. --set optim.lr=1e-4 (repeatable)."),
]
Address = Annotated[
    str | None,
    typer.Option("--address", help="Ray Jobs API address, e.g. http://HOST:8265 (default: $RAY_ADDRESS or 127.0.0.1)."),
]


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(evaluate)
    app.command()(submit)
    app.command()(status)
    app.command()(logs)


def train(
    job: Annotated[Path | None, typer.Argument(help="Job file (optional with --resume: the run's own spec is used).")] = None,
    overrides: Overrides = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (`auto`, host:6379); default: an embedded Ray on 127.0.0.1.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default: <cluster.storage_path or ./runs>/<job name>).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory from its latest checkpoint.")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--plain", help="Progress bar or plain log lines (default: bar on a terminal).")] = None,
) -> None:
    """Train a job on Ray (DDP or DeepSpeed workers). Re-running the same job resumes from its last checkpoint."""
    from hepml_dist.spec import load_job
    from hepml_dist.train.checkpoint import latest_checkpoint
    from hepml_dist.train.launch import launch, load_for_resume

    if resume is not None:
        if latest_checkpoint(resume) is None:
            raise UserError(f"--resume {resume}: no checkpoint in {resume}/checkpoints to resume from")
        spec = load_job(job, overrides or []) if job else load_for_resume(resume)
        if run_dir is not None and run_dir.resolve() != resume.resolve():
            raise UserError("give either --resume RUN_DIR or --run-dir DIR, not two different directories")
        run_dir = resume
    elif job is None:
        raise UserError("name a job file (hepml train JOB.yaml), or --resume RUN_DIR")
    else:
        spec = load_job(job, overrides or [])
    result = launch(spec, address=address, run_dir=run_dir, progress=progress)
    if result.finished:
        typer.echo(f"finished at step {result.step}: {result.run_dir}")
    elif result.stopped:
        typer.echo(f"stopped on request at step {result.step} (checkpoint written); run the same command to resume: {result.run_dir}")
    else:
        typer.echo(f"ended at step {result.step}: {result.run_dir}")


def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory or checkpoint folder.")],
    split: Annotated[str, typer.Option("--split", help="Split to evaluate: test, val or train.")] = "test",
    max_batches: Annotated[int | None, typer.Option("--max-batches", help="Evaluate at most this many batches.")] = None,
) -> None:
    """Metrics (metrics.json) and plots (plots/*.png) of a trained run on a split."""
    from hepml_dist.evaluate.runner import evaluate_run

    if split not in ("train", "val", "test"):
        raise UserError(f"--split {split}: use train, val or test")
    report = evaluate_run(run_dir, split, max_batches)
    for name, value in report["metrics"].items():
        typer.echo(f"{name:40s} {value:.5g}")


def submit(
    job: Annotated[Path, typer.Argument(help="Job file.")],
    address: Annotated[str, typer.Option("--address", help="Ray Jobs API of the cluster, e.g. http://HOST:8265.")],
    overrides: Overrides = None,
    run_dir: Annotated[str | None, typer.Option("--run-dir", help="Absolute run directory on the cluster's shared storage.")] = None,
    ship_code: Annotated[bool, typer.Option("--ship-code/--no-ship-code", help="Send the local hepml_dist package with the job.")] = True,
) -> None:
    """Submit a job to a running Ray cluster through the Jobs API; prints the submission id."""
    from hepml_dist.launch.ray_jobs import submit as submit_job
    from hepml_dist.spec import load_job

    job_id = submit_job(load_job(job, overrides or []), address, run_dir=run_dir, ship_code=ship_code)
    typer.echo(job_id)


def status(job_id: Annotated[str, typer.Argument(help="Submission id from `hepml submit`.")], address: Address = None) -> None:
    """Status of a submitted job."""
    from hepml_dist.launch.ray_jobs import status as job_status

    info = job_status(job_id, address)
    typer.echo(f"{info['id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))


def logs(job_id: Annotated[str, typer.Argument(help="Submission id from `hepml submit`.")], address: Address = None) -> None:
    """Logs of a submitted job."""
    from hepml_dist.launch.ray_jobs import logs as job_logs

    typer.echo(job_logs(job_id, address), nl=False)
