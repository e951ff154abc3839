"""`hepml train`: run a job on Ray Train (an embedded Ray on 127.0.0.1, or a cluster), or continue a run."""

from pathlib import Path
from typing import Annotated

import typer

from hepml_dist import runs
from hepml_dist.cli.options import Overrides
from hepml_dist.errors import UserError
from hepml_dist.spec import load_job
from hepml_dist.train.launch import launch

app = typer.Typer()


@app.command()
def train(
    job: Annotated[Path | None, typer.Argument(help="Job file (optional with --resume: the run's own spec is used).")] = None,
    overrides: Overrides = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (`auto`, host:6379); default: an embedded Ray on 127.0.0.1.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default: <cluster.storage_path or ./runs>/<job name>).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory from its latest checkpoint.")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--plain", help="Progress bar or plain log lines (default: bar on a terminal).")] = None,
) -> None:
    """Train a job on Ray (DDP or DeepSpeed workers). Re-running the same job resumes from its last checkpoint."""
    if resume is not None:
        if runs.latest_checkpoint(resume) is None:
            raise UserError(f"--resume {resume}: no checkpoint in {resume}/checkpoints to resume from")
        spec = load_job(job, overrides or []) if job else runs.read_run_spec(resume, overrides or [])
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
