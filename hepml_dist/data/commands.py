"""`hepml data convert/verify/inspect/weights/plot`: make datasets from ROOT/parquet, check them, look at them.

The other `hepml data` commands live with their areas: `generate` (hepml_dist.generate) and `tokenize`
(hepml_dist.omnijet); the group is assembled in hepml_dist.cli.
"""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from hepml_dist.cli.options import Fractions, Overrides, Split, SplitName
from hepml_dist.data.check import column_ranges, verify_dataset
from hepml_dist.data.convert import convert, load_schema
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.plot import plot_dataset, plot_weighted_groups
from hepml_dist.data.reweight import compute_weights
from hepml_dist.errors import UserError
from hepml_dist.spec import load_job

app = typer.Typer()


def _console() -> Console:
    return Console(width=160 if not Console().is_terminal else None)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=_console())


def parse_fractions(text: str, option: str) -> tuple[float, float, float]:
    """`0.7,0.1,0.2` -> the train, val and test fractions; a UserError naming `option` otherwise."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"{option} {text!r}: give three fractions train,val,test, e.g. 0.7,0.1,0.2")
    return values  # type: ignore[return-value]


@app.command("convert")
def convert_command(
    inputs: Annotated[list[Path], typer.Argument(help="ROOT or parquet files (globs expanded by the shell).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write.")],
    schema: Annotated[str, typer.Option(help="Shipped schema (jetclass, jetclass2, fcc-tau, clic-events) "
                                        "or a schema YAML file.")],
    fractions: Fractions = "0.7,0.1,0.2",
    shard_size: Annotated[int, typer.Option(min=1, help="Examples per shard.")] = 16384,
    chunk_size: Annotated[int, typer.Option(min=1, help="Examples per chunk (tar sample).")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the split assignment and the write shuffle.")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="Reader processes (0: read in this process).")] = 2,
    step_size: Annotated[int, typer.Option(min=1, help="Examples read per work unit (bounds memory).")] = 20000,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset or interrupted run at --out.")] = False,
) -> None:
    """Convert ROOT/parquet files into shards. Rerun the same command to resume an interrupted conversion."""
    loaded = load_schema(schema)
    fractions = parse_fractions(fractions, "--fractions")
    with _progress() as progress:
        task = progress.add_task(f"convert ({loaded.name})", total=None)

        def update(done: int, total: int, examples: int) -> None:
            progress.update(task, completed=done, total=total,
                            description=f"convert ({loaded.name}): {examples:,} examples")

        manifest = convert(inputs, out, loaded, splits=fractions, shard_size=shard_size, chunk_size=chunk_size,
                           seed=seed, step_size=step_size, workers=workers, overwrite=overwrite,
                           on_progress=update)
    _print_summary(manifest, f"{out}")


def _print_summary(manifest, title: str) -> None:
    table = Table(title=title)
    for column in ("split", "shards", "examples", "MB", "classes"):
        table.add_column(column, justify="right" if column in ("shards", "examples", "MB") else "left")
    for name, info in manifest.splits.items():
        classes = "; ".join(f"{label}: " + ", ".join(f"{k}={v:,}" for k, v in counts.items())
                            for label, counts in info.class_counts.items())
        table.add_row(name, str(len(info.shards)), f"{info.examples:,}",
                      f"{sum(s.bytes for s in info.shards) / 1e6:,.1f}", classes)
    _console().print(table)


@app.command("verify")
def verify_command(
    directory: Annotated[Path, typer.Argument(help="Dataset directory (with manifest.json).")],
    quick: Annotated[bool, typer.Option(help="Checksums and sizes only; do not decode the chunks.")] = False,
) -> None:
    """Check every shard's size, sha256 and example counts against the manifest; exit 1 naming bad shards."""
    manifest = read_manifest(directory)
    total = sum(s.bytes for info in manifest.splits.values() for s in info.shards)
    with _progress() as progress:
        task = progress.add_task("verify (bytes)", total=total)
        _, problems = verify_dataset(directory, decode=not quick, on_bytes=lambda n: progress.advance(task, n))
    shards = sum(len(info.shards) for info in manifest.splits.values())
    for problem in problems:
        typer.echo(f"{directory / problem.shard}: {problem.problem}", err=True)
    if problems:
        typer.echo(f"{len({p.shard for p in problems})} of {shards} shard(s) bad", err=True)
        raise typer.Exit(1)
    examples = sum(info.examples for info in manifest.splits.values())
    typer.echo(f"{shards} shard(s), {examples:,} examples: all match the manifest")


@app.command("inspect")
def inspect_command(
    directory: Annotated[Path, typer.Argument(help="Dataset directory (with manifest.json).")],
    split: Annotated[SplitName, typer.Option(help="Split whose columns are summarised.")] = "train",
    max_shards: Annotated[int, typer.Option(min=1, help="Shards read for the column ranges.")] = 2,
) -> None:
    """Counts per split and class, and the range of every column (padding excluded)."""
    manifest = read_manifest(directory)
    _print_summary(manifest, f"{directory} (schema {manifest.schema}, converter {manifest.converter_version}, "
                             f"seed {manifest.seed})")
    if split not in manifest.splits or not manifest.splits[split].shards:
        raise UserError(f"--split {split}: the dataset has no shards in that split")
    ranges = column_ranges(directory, split=split, max_shards=max_shards)
    table = Table(title=f"columns ({split}, first {max_shards} shard(s))")
    for column in ("column", "dtype", "shape", "min", "mean", "max", "values"):
        table.add_column(column, justify="left" if column in ("column", "dtype", "shape") else "right")
    for name, info in manifest.columns.items():
        lo, mean, hi, n = ranges.get(name, (float("nan"),) * 3 + (0,))
        shape = "[" + ", ".join(map(str, info.shape)) + "]" + (" padded" if info.padded else "")
        table.add_row(name, info.dtype, shape, f"{lo:.4g}", f"{mean:.4g}", f"{hi:.4g}", f"{n:,}")
    _console().print(table)


@app.command("weights")
def weights_command(
    directory: Annotated[Path, typer.Argument(help="Dataset directory (with manifest.json).")],
    job: Annotated[Path, typer.Option(help="Job file whose data.reweight settings to use.")],
    splits: Annotated[list[Split] | None, typer.Option("--split", help="Split whose histograms define the weights "
                                                         "(repeatable; default train).")] = None,
    overrides: Overrides = None,
) -> None:
    """Compute Sophon-style flat 2D weights per class group and store them with the dataset."""
    spec = load_job(job, overrides or [])
    if spec.data.reweight is None:
        raise UserError(f"{job}: data.reweight is not set; add it (variables, bins, groups) to compute weights")
    with _progress() as progress:
        path = compute_weights(directory, spec.data.reweight, splits=[s.value for s in splits] if splits else ["train"],
                               progress=progress, plot=plot_weighted_groups)
    stored = json.loads(path.read_text())
    table = Table(title=f"weights written to {path}")
    for column in ("group", "weight", "examples", "sampled share"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for group in spec.data.reweight.groups:
        table.add_row(group.name, f"{group.weight:g}", f"{stored['group_counts'][group.name]:,}",
                      f"{stored['group_sampled_share'][group.name]:.3f}")
    _console().print(table)
    means = ", ".join(f"{k}: {v:.3f}" for k, v in stored["mean_weight"].items())
    typer.echo(f"mean weight (fraction kept by sampling) {means}")
    variables = " and ".join(spec.data.reweight.variables)
    typer.echo(f"weighted yield of each group in {variables}: {path.with_suffix('.png')}")


@app.command()
def plot(
    dataset: Annotated[Path, typer.Argument(help="Dataset directory (with manifest.json).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the PNG files (default DIR/plots).")
                   ] = None,
    split: Annotated[SplitName, typer.Option(help="Split to read.")] = "train",
    max_examples: Annotated[int, typer.Option(help="Read at most this many examples.")] = 200_000,
) -> None:
    """Histograms of every stored feature and label, one curve per class, as PNG files."""
    files = plot_dataset(dataset, out or dataset / "plots", split=split, max_examples=max_examples)
    typer.echo(f"{len(files)} plots in {out or dataset / 'plots'}")
