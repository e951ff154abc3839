"""`hepml train`: run a job in worker processes of this machine or on Ray Train (an embedded Ray on 127.0.0.1, or a
cluster), as `cluster.launcher` says (`auto`: processes unless the job needs Ray), or continue a run.

When the job runs on the `processes` launcher the workers' fork server starts before this module imports torch (the
launcher is imported once the job is read), so both import at the same time on two cores. A run stopped by a
signal prints the command that resumes it and exits with `signals.EXIT_STATUS` (130 after Ctrl-C, 143 after
SIGTERM, 0 after SLURM's SIGUSR1)."""

import shlex
from pathlib import Path
from typing import Annotated

import typer

from hepml_dist import run_files as runs
from hepml_dist.cli.options import Overrides
from hepml_dist.errors import UserError
from hepml_dist.spec import load_job
from hepml_dist.train.environment import choose_launcher, start_fork_server
from hepml_dist.train.signals import EXIT_STATUS, StoppedAtOnce
from hepml_dist.train.startup import StartupClock

app = typer.Typer()


@app.command()
def train(
    job: Annotated[Path | None, typer.Argument(help="Job file (optional with --resume: the run's own spec is used).")] = None,
    overrides: Overrides = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (`auto`, host:6379); the job then runs on Ray. Default: this machine, or $RAY_ADDRESS if set (not with cluster.launcher processes).")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default: <cluster.storage_path or ./runs>/<job name>).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this directory from its latest checkpoint.")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--plain", help="Progress bar or plain log lines (default: bar on a terminal).")] = None,
) -> None:
    """Train a job: DDP or DeepSpeed workers on this machine or a Ray cluster. Re-running it resumes the run."""
    startup = StartupClock.from_process_start()
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
    if choose_launcher(spec, address).name == "processes":
        start_fork_server(spec)  # its imports (torch, the loop) now, on the core the driver's own imports leave free
    from hepml_dist.train.launch import launch  # torch, the loader, the models: after the fork server has started

    try:
        startup.mark("cli")
        result = launch(spec, address=address, run_dir=run_dir, progress=progress, startup=startup)
    except StoppedAtOnce as stop:
        typer.echo(f"stopped at once by a second {stop.signal_name}, not waiting for the final checkpoint; "
                   f"{how_to_resume(stop.run_dir, address)}")
        raise typer.Exit(stop.exit_status) from None
    if result.finished:
        typer.echo(f"finished at step {result.step}: {result.run_dir}")
        return
    if result.stopped or result.stop_signal:
        cause = f"by {result.stop_signal}" if result.stop_signal else "on request"
        saved = " (checkpoint written)" if result.stopped else ""
        typer.echo(f"stopped {cause} at step {result.step}{saved}; {how_to_resume(result.run_dir, address)}")
    else:
        typer.echo(f"ended at step {result.step}: {result.run_dir}")
    if result.stop_signal:
        raise typer.Exit(EXIT_STATUS[result.stop_signal])


def how_to_resume(run_dir: Path, address: str | None) -> str:
    """The command that continues a run from its latest checkpoint, with the run's own resolved spec."""
    if runs.latest_checkpoint(run_dir) is None:
        return f"{run_dir} holds no checkpoint yet: run the same command again to start over"
    command = ["hepml", "train", "--resume", str(run_dir), *(["--address", address] if address else [])]
    return f"to resume: {shlex.join(command)}"
