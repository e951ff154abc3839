"""`hepml tune`: hyper-parameter searches with Ray Tune, each trial an ordinary training run."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from hepml_dist.cli.options import Overrides
from hepml_dist.tune.search import run_tune

app = typer.Typer()


@app.command()
def tune(
    job: Annotated[Path, typer.Argument(help="Job file to search around.")],
    space: Annotated[Path, typer.Option("--space", help="Search space YAML: `field.path: loguniform(1e-4, 3e-3)`, "
                                        "choice([...]), uniform(a, b), randint(a, b).")],
    trials: Annotated[int, typer.Option("--trials", min=1, help="Number of trials.")] = 8,
    metric: Annotated[str, typer.Option("--metric", help="Validation metric to optimise.")] = "val_loss",
    mode: Annotated[Literal["min", "max"], typer.Option("--mode", help="Whether the metric is better low or high.")] = "min",
    overrides: Overrides = None,
    concurrent: Annotated[int | None, typer.Option("--concurrent", min=1, help="Trials at once (default: as many "
                                                   "as the cluster's CPUs/GPUs fit).")] = None,
    scheduler: Annotated[Literal["asha", "fifo"], typer.Option("--scheduler", help="asha stops bad trials early; fifo runs "
                                                              "every trial to the end.")] = "asha",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the best job YAML (default: "
                                             "<tune dir>/best.yaml).")] = None,
    tune_dir: Annotated[Path | None, typer.Option("--tune-dir", help="Folder of the search (default: "
                                                  "<storage>/<job name>-tune).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the search's sampling.")] = 0,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (default: embedded).")] = None,
) -> None:
    """Hyper-parameter search with Ray Tune; the best trial's spec is written as a job YAML.

    Each trial is a normal run (its own run directory and tracker entry); ASHA stops poor trials early."""
    result = run_tune(job, space, trials=trials, metric=metric, mode=mode, overrides=overrides or [],
                      concurrent=concurrent, scheduler=scheduler, out=out, tune_dir=tune_dir, seed=seed, address=address)
    for row in result["trials"]:
        value = row["value"]
        shown = f"{value:.5g}" if isinstance(value, float) else str(value)
        typer.echo(f"{row['name']:24s} {metric}={shown:12s} {row['overrides']}")
    typer.echo(f"best: {result['best']['name']} {metric}={result['best']['value']:.5g} -> {result['best_job']}")
    typer.echo(f"curves and values of every trial: {result['plot']}")
