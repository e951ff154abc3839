"""`hepml predict` (a trained model's outputs back to ROOT/parquet, one row per jet or event) and the
`hepml export` group (trained models to ONNX)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hepml_dist.errors import UserError
from hepml_dist.inference.export import export_onnx
from hepml_dist.inference.predict import predict as run_predict

app = typer.Typer()
export_app = typer.Typer(no_args_is_help=True, help="Export trained models for inference (ONNX).")
app.add_typer(export_app, name="export")


@app.command()
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
    """Run a trained model over shards or raw ROOT/parquet files; write one row per jet or event.

    The rows hold the model's outputs (score_<task>_<class>, <task>_<target>_pred), the truth of its tasks and the
    observer columns, in input order."""
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


@export_app.command("onnx")
def onnx(
    source: Annotated[Path, typer.Argument(help="Run directory (best checkpoint, else latest) or a checkpoint folder.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="ONNX file; default CHECKPOINT/model.onnx.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    check: Annotated[bool, typer.Option(help="Compare onnxruntime with PyTorch on random jets first.")] = True,
) -> None:
    """Export a ParT-family (ParT, Sophon, Multi/SingleParTau), AOT or MLPF model to ONNX, dynamic batch and length.

    ParT jobs keep weaver's I/O names (pf_features, pf_vectors, pf_mask -> softmax); FILE.json lists the columns.
    """
    result = export_onnx(source, out, opset=opset, check=check)
    typer.echo(f"wrote {result.path}")
    typer.echo(f"  inputs:  {', '.join(result.inputs)}")
    for name, columns in result.outputs.items():
        typer.echo(f"  output:  {name} [N, {len(columns)}]")
    if result.max_abs_difference is not None:
        typer.echo(f"  onnxruntime vs PyTorch: max |difference| = {result.max_abs_difference:.1e}")
