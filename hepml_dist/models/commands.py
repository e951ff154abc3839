"""The `hepml export` command group: trained models to inference formats."""

from pathlib import Path
from typing import Annotated

import typer

export_app = typer.Typer(no_args_is_help=True, help="Export trained models for inference (ONNX).")


@export_app.command("onnx")
def onnx(
    source: Annotated[Path, typer.Argument(help="Run directory (best checkpoint, else latest) or a checkpoint folder.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="ONNX file; default CHECKPOINT/model.onnx.")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    check: Annotated[bool, typer.Option(help="Compare onnxruntime with PyTorch on random jets first.")] = True,
) -> None:
    """Export a ParT-family (ParT, Sophon, Multi/SingleParTau) or AOT model to ONNX with dynamic batch and length.

    ParT jobs keep weaver's I/O names (pf_features, pf_vectors, pf_mask -> softmax); FILE.json lists the columns.
    """
    from hepml_dist.models.export import export_onnx  # imports torch

    result = export_onnx(source, out, opset=opset, check=check)
    typer.echo(f"wrote {result.path}")
    typer.echo(f"  inputs:  {', '.join(result.inputs)}")
    for name, columns in result.outputs.items():
        typer.echo(f"  output:  {name} [N, {len(columns)}]")
    if result.max_abs_difference is not None:
        typer.echo(f"  onnxruntime vs PyTorch: max |difference| = {result.max_abs_difference:.1e}")


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
