"""`hepml jobs`: the jobs of a folder with their model family, tasks, parameter count and parallel strategy."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hepml_dist.errors import UserError
from hepml_dist.models import count_parameters
from hepml_dist.spec import JobSpec, SpecError, load_job

app = typer.Typer()


def parameters(spec: JobSpec) -> str:
    """The model's parameter count, or why it cannot be counted."""
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
            spec = load_job(path)
        except SpecError as err:
            invalid += 1
            table.add_row(path.stem, "[red]invalid[/red]", str(err.problems[0].message), "", "", "")
            continue
        strategy = spec.parallel.strategy
        if strategy == "deepspeed":
            strategy += f" ZeRO-{spec.parallel.zero_stage}"
        count = parameters(spec)
        table.add_row(
            path.stem,
            spec.model.family,
            ", ".join(t.name for t in spec.tasks),
            f"{int(count):,}" if count.isdigit() else "?",
            strategy,
            f"{spec.parallel.num_workers} x {', '.join(spec.parallel.accelerators)}",
        )
    Console(width=160 if not Console().is_terminal else None).print(table)
    if invalid:
        raise typer.Exit(2)
