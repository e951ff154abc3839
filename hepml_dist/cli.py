"""The `hepml` command line: load and override job specs, and run the service's verbs on them.

The CLI only loads the typed job spec and hands it on; all behaviour lives in the library.
Heavy libraries (torch, ray) are imported inside the commands that need them, so `hepml validate` stays fast.
"""

import importlib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec, SpecError, dump_spec, load_job


class _Commands(TyperGroup):
    """Turns UserError and SpecError into a clear message and exit status 2, with no traceback."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except SpecError as err:
            for problem in err.problems:
                typer.echo(str(problem), err=True)
            raise typer.Exit(2) from None
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="hepml_dist: train transformer models for jets and events on Ray clusters from one job file.",
)
console = Console(width=160 if not Console().is_terminal else None)

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field, e.g. --set optim.lr=1e-4 (repeatable)."),
]


def load(job: Path, overrides: list[str] | None = None) -> JobSpec:
    """Load a job file with overrides; problems propagate as SpecError (printed by _Commands)."""
    return load_job(job, overrides or [])


@app.command()
def validate(
    jobs: Annotated[list[Path], typer.Argument(help="Job files to check.")],
    overrides: Overrides = None,
) -> None:
    """Check job files; print every problem as `file: field: message`. Exit 0 if all are valid, else 2."""
    problems = []
    for job in jobs:
        try:
            load(job, overrides)
        except SpecError as err:
            problems.extend(err.problems)
    for problem in problems:
        typer.echo(str(problem), err=True)
    if problems:
        bad = len({p.source for p in problems})
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
    spec = load(job, overrides)
    if params:
        typer.echo(f"parameters: {_parameters(spec)}")
        return
    typer.echo(dump_spec(spec), nl=False)


def _parameters(spec: JobSpec) -> str:
    """The model's parameter count, or why it cannot be counted (a family not installed in this build)."""
    from hepml_dist.models import count_parameters  # imports torch

    try:
        return str(count_parameters(spec))
    except (KeyError, ModuleNotFoundError) as err:
        return f"unknown ({err})"


@app.command("jobs")
def list_jobs(directory: Annotated[Path, typer.Argument(help="Folder of job files.")] = Path("jobs")) -> None:
    """Table of the jobs in a folder: model family, tasks and parallel strategy."""
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise UserError(f"no job files (*.yaml) in {directory}")
    table = Table(title=f"jobs in {directory}")
    table.add_column("job", no_wrap=True)
    for column in ("family", "tasks", "params", "strategy", "workers"):
        table.add_column(column)
    invalid = 0
    for path in files:
        try:
            spec = load(path)
        except SpecError as err:
            invalid += 1
            table.add_row(path.stem, "[red]invalid[/red]", str(err.problems[0].message), "", "", "")
            continue
        strategy = spec.parallel.strategy
        if strategy == "deepspeed":
            strategy += f" ZeRO-{spec.parallel.zero_stage}"
        table.add_row(
            path.stem,
            spec.model.family,
            ", ".join(t.name for t in spec.tasks),
            _params_cell(spec),
            strategy,
            f"{spec.parallel.num_workers} x {', '.join(spec.parallel.accelerators)}",
        )
    console.print(table)
    if invalid:
        raise typer.Exit(2)


def _params_cell(spec: JobSpec) -> str:
    count = _parameters(spec)
    return f"{int(count):,}" if count.isdigit() else "?"


# Each area of the service adds its commands through `register(app)` in its own module (one line each).
COMMAND_MODULES: list[str] = [
    "hepml_dist.data.commands",
    "hepml_dist.models.commands",
    "hepml_dist.omnijet.commands",
    "hepml_dist.train.commands",
    "hepml_dist.launch.commands",
    "hepml_dist.evaluate.commands",
    "hepml_dist.data.generate.commands",
    "hepml_dist.research.commands",
]
for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
