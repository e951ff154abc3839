"""`hepml validate`, `hepml show` and `hepml jobs`: check job files, print them resolved, list them (no torch: these
start fast; only `--params` builds the models)."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hepml_dist.cli.options import JsonOutput, Overrides
from hepml_dist.errors import UserError
from hepml_dist.locations import JOBS_PATH_VARIABLE, jobs_search_path
from hepml_dist.spec import JobSpec, SpecError, dump_spec, load_job

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


def _job_row(path: Path, with_params: bool) -> dict[str, Any]:
    """One job's line in `hepml jobs`: family, tasks, strategy, workers (and parameter count), or why it is invalid."""
    try:
        spec = load_job(path)
    except SpecError as err:
        return {"job": path.stem, "file": str(path), "valid": False, "problem": str(err.problems[0])}
    strategy = spec.parallel.strategy
    if strategy == "deepspeed":
        strategy += f" ZeRO-{spec.parallel.zero_stage}"
    row = {"job": path.stem, "file": str(path), "valid": True, "family": spec.model.family,
           "tasks": [t.name for t in spec.tasks], "strategy": strategy,
           "workers": f"{spec.parallel.num_workers} x {', '.join(spec.parallel.accelerators)}"}
    if with_params:
        row["params"] = _parameters(spec)
    return row


def _parameters(spec: JobSpec) -> int | None:
    from hepml_dist.models.commands import parameters  # imports torch: only for --params

    count = parameters(spec)
    return int(count) if count.isdigit() else None


def _job_files(directory: Path | None) -> list[Path]:
    """The job files of `directory`, or of every folder on the jobs search path (a name found twice: the first)."""
    if directory is not None:
        if not directory.is_dir():
            raise UserError(f"{directory}: no such folder (give a folder of job files, or nothing for the shipped jobs)")
        return sorted(directory.glob("*.yaml"))
    found: dict[str, Path] = {}
    for folder in jobs_search_path(Path("jobs") if Path("jobs").is_dir() else None):
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return list(found.values())


@app.command("jobs")
def list_jobs(
    directory: Annotated[Path | None, typer.Argument(
        help=f"Folder of job files. Default: ./jobs (if any), the folders of ${JOBS_PATH_VARIABLE}, the shipped jobs.",
        show_default=False)] = None,
    params: Annotated[bool, typer.Option("--params", help="Count each model's parameters (builds the models: "
                                                          "a few seconds).")] = False,
    as_json: JsonOutput = False,
) -> None:
    """Table of the jobs in a folder: model family, tasks and parallel strategy."""
    files = _job_files(directory)
    if not files:
        raise UserError(f"no job files (*.yaml) in {directory}")
    rows = [_job_row(path, params) for path in files]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    else:
        _print_jobs(rows, params, title=f"jobs in {directory}" if directory else "jobs")
    if not all(row["valid"] for row in rows):
        raise typer.Exit(2)


def _print_jobs(rows: list[dict[str, Any]], params: bool, title: str) -> None:
    table = Table(title=title)
    table.add_column("job", no_wrap=True)
    for column in ("family", "tasks", *(["params"] if params else []), "strategy", "workers", "file"):
        table.add_column(column)
    for row in rows:
        if not row["valid"]:
            table.add_row(row["job"], "[red]invalid[/red]", row["problem"], *([""] if params else []), "", "", row["file"])
            continue
        count = [f"{row['params']:,}" if row.get("params") is not None else "?"] if params else []
        table.add_row(row["job"], row["family"], ", ".join(row["tasks"]), *count, row["strategy"], row["workers"],
                      row["file"])
    Console(width=200 if not Console().is_terminal else None).print(table)
