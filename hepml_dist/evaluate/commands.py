"""`hepml evaluate RUN_DIR` (metrics.json and plots of a trained run on a split) and `hepml report RUN_DIR` (the
self-contained HTML page of a trained, evaluated run)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hepml_dist.cli.options import SplitName
from hepml_dist.evaluate.report import build_report
from hepml_dist.evaluate.runner import evaluate_run

app = typer.Typer()


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory or checkpoint folder.")],
    split: Annotated[SplitName, typer.Option("--split", help="Split to evaluate.")] = "test",
    max_batches: Annotated[int | None, typer.Option("--max-batches", help="Evaluate at most this many batches.")] = None,
) -> None:
    """Metrics (metrics.json) and plots (plots/*.png) of a trained run on a split."""
    report = evaluate_run(run_dir, split, max_batches)
    for name, value in report["metrics"].items():
        typer.echo(f"{name:40s} {value:.5g}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, trained (`hepml train`) and evaluated (`hepml evaluate`).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file to write (default RUN_DIR/report.html).")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline",
                                           help="Fit and show the family's baseline: gradient-boosted trees for "
                                           "jet taggers and AOT jobs (MLPF's rule-based particle flow is always shown).")] = True,
    baseline_jets: Annotated[int | None, typer.Option(
        "--baseline-jets", min=100, help="Fit the baseline on at most this many train jets (default: all).")] = None,
    track: Annotated[bool, typer.Option("--track/--no-track", help="Also send the figures to the run's TensorBoard "
                                        "folder, plots/report/ and Comet experiment.")] = True,
) -> None:
    """Write a self-contained HTML report: run facts, training curves, ROC, confusion, response, the baseline."""
    console = Console(stderr=True)
    path = build_report(run_dir, out=out, with_baseline=baseline, max_train_jets=baseline_jets,
                        log=lambda message: console.print(f"[dim]report:[/dim] {message}"), track=track)
    typer.echo(f"report: {path.resolve()}")
