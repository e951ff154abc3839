"""CLI verbs of the research workflow: `hepml predict` (model outputs back to ROOT/parquet) and `hepml tune`
(Ray Tune hyper-parameter searches). Heavy libraries are imported inside the commands."""

from pathlib import Path
from typing import Annotated

import typer

from hepml_dist.errors import UserError


def register(app: typer.Typer) -> None:
    app.command()(predict)
    app.command()(tune)


def predict(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (best checkpoint, else latest) or checkpoint folder.")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="Shards (split folder, glob, brace pattern) or raw "
                                            "ROOT/parquet files (globs); repeatable, read in the order given.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: FILE.root (TTree) or FILE.parquet.")],
    schema: Annotated[str | None, typer.Option("--schema", help="Converter schema for raw files (shipped name or "
                                               "YAML); default: the one the training data was converted with.")] = None,
    observers: Annotated[str, typer.Option("--observers", help="Comma-separated input columns to copy, e.g. "
                                           "jet_pt,jet_sdmass,event.")] = "",
    workers: Annotated[int, typer.Option("--workers", min=0, help="Ray actors to spread the input over "
                                         "(0: this process).")] = 0,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Examples per forward pass "
                                                   "(default: the job's data.batch_size).")] = None,
    step_size: Annotated[int, typer.Option("--step-size", min=1, help="Raw files: entries per work unit.")] = 20000,
    tree: Annotated[str, typer.Option("--tree", help="Name of the output TTree (ROOT output).")] = "Events",
    rntuple: Annotated[bool, typer.Option("--rntuple", help="Write an RNTuple instead of a TTree.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="GPUs per Ray actor.")] = 0.0,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (default: embedded Ray on "
                                                "127.0.0.1 when --workers > 0).")] = None,
) -> None:
    """Run a trained model over shards or raw ROOT/parquet files; write one row per jet/event with the model's
    outputs (score_<task>_<class>, <task>_<target>_pred), the truth of its tasks and the observer columns."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hepml_dist.research.predict import predict as run_predict

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: use cpu or cuda")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rows]} rows"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as progress:
        bar = progress.add_task(f"predicting {out.name}", total=None, rows=0)

        def on_unit(done: int, total: int, rows: int) -> None:
            progress.update(bar, completed=done, total=total, rows=rows)

        summary = run_predict(run_dir, data, out, schema=schema, observers=[o.strip() for o in observers.split(",")],
                              workers=workers, batch_size=batch_size, step_size=step_size, tree=tree, rntuple=rntuple,
                              device=device, gpus_per_worker=gpus_per_worker, address=address, on_unit=on_unit)
    typer.echo(f"wrote {summary['rows']} rows to {summary['out']} (model {summary['checkpoint']})")


def tune(
    job: Annotated[Path, typer.Argument(help="Job file to search around.")],
    space: Annotated[Path, typer.Option("--space", help="Search space YAML: `field.path: loguniform(1e-4, 3e-3)`, "
                                        "choice([...]), uniform(a, b), randint(a, b).")],
    trials: Annotated[int, typer.Option("--trials", min=1, help="Number of trials.")] = 8,
    metric: Annotated[str, typer.Option("--metric", help="Validation metric to optimise.")] = "val_loss",
    mode: Annotated[str, typer.Option("--mode", help="min or max.")] = "min",
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field of the job for every "
                                                        "trial (repeatable).")] = None,
    concurrent: Annotated[int | None, typer.Option("--concurrent", min=1, help="Trials at once (default: as many "
                                                   "as the cluster's CPUs/GPUs fit).")] = None,
    scheduler: Annotated[str, typer.Option("--scheduler", help="asha (stop bad trials early) or fifo.")] = "asha",
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the best job YAML (default: "
                                             "<tune dir>/best.yaml).")] = None,
    tune_dir: Annotated[Path | None, typer.Option("--dir", help="Folder of the search (default: "
                                                  "<storage>/<job name>-tune).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the search's sampling.")] = 0,
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster to join (default: embedded).")] = None,
) -> None:
    """Hyper-parameter search with Ray Tune: each trial a normal run (own run dir and tracker entry); the best
    trial's spec is written as a job YAML."""
    from hepml_dist.research.tune import run_tune

    if mode not in ("min", "max"):
        raise UserError(f"--mode {mode}: use min or max")
    if scheduler not in ("asha", "fifo"):
        raise UserError(f"--scheduler {scheduler}: use asha or fifo")
    result = run_tune(job, space, trials=trials, metric=metric, mode=mode, overrides=overrides or [],
                      concurrent=concurrent, scheduler=scheduler, out=out, tune_dir=tune_dir, seed=seed, address=address)
    for row in result["trials"]:
        value = row["value"]
        shown = f"{value:.5g}" if isinstance(value, float) else str(value)
        typer.echo(f"{row['name']:24s} {metric}={shown:12s} {row['overrides']}")
    typer.echo(f"best: {result['best']['name']} {metric}={result['best']['value']:.5g} -> {result['best_job']}")
    typer.echo(f"curves and values of every trial: {result['plot']}")
