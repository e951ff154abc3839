"""`hepml validate` and `hepml show`: check job files and print them resolved (no torch: these start fast)."""

from pathlib import Path
from typing import Annotated

import typer

from hepml_dist.cli.options import Overrides
from hepml_dist.spec import SpecError, dump_spec, load_job

app = typer.Typer()


@app.command()
def validate(
    jobs: Annotated[list[Path], typer.Argument(help="Job files to check.")],
    overrides: Overrides = None,
) -> None:
    """Check job files; print every problem as `file: field: message`. Exit 0 if all are valid, else 2."""
    problems, bad = [], 0
    for job in jobs:
        try:
            load_job(job, overrides or [])
        except SpecError as err:
            problems.extend(err.problems)
            bad += 1
    for problem in problems:
        typer.echo(str(problem), err=True)
    if problems:
        typer.echo(f"{bad} of {len(jobs)} job(s) invalid", err=True)
        raise typer.Exit(2)
    typer.echo(f"{len(jobs)} job(s) valid")


@app.command()
def show(
    job: Annotated[Path, typer.Argument(help="Job file.")],
    overrides: Overrides = None,
    params: Annotated[bool, typer.Option("--params", help="Print only the model's parameter count.")] = False,
) -> None:
    """Print the fully resolved job (extends and overrides applied) as YAML."""
    spec = load_job(job, overrides or [])
    if params:
        from hepml_dist.models.commands import parameters  # imports torch: only for --params

        typer.echo(f"parameters: {parameters(spec)}")
        return
    typer.echo(dump_spec(spec), nl=False)
