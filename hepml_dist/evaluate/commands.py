"""CLI verb of the evaluation area: `hepml report RUN_DIR` (the HTML page of a trained, evaluated run)."""

from pathlib import Path
from typing import Annotated

import typer


def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, trained (`hepml train`) and evaluated (`hepml evaluate`).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file to write (default RUN_DIR/report.html).")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline",
                                           help="Fit and show the gradient-boosted baseline (tau jobs).")] = True,
    baseline_jets: Annotated[int | None, typer.Option(
        "--baseline-jets", min=100, help="Fit the baseline on at most this many train jets (default: all).")] = None,
) -> None:
    """Write a self-contained HTML report: run facts, training curves, ROC, confusion, response, the baseline."""
    from rich.console import Console

    from hepml_dist.evaluate.report import build_report

    console = Console(stderr=True)
    path = build_report(run_dir, out=out, with_baseline=baseline, max_train_jets=baseline_jets,
                        log=lambda message: console.print(f"[dim]report:[/dim] {message}"))
    typer.echo(f"report: {path.resolve()}")


def register(app: typer.Typer) -> None:
    app.command()(report)
