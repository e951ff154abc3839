"""OmniJet-alpha commands: `hepml data tokenize` (jets -> token shards) and `hepml sample` (sample jets from a
trained backbone; `hepml data generate` is the Pythia generators)."""

from pathlib import Path
from typing import Annotated

import typer

from hepml_dist.errors import UserError
from hepml_dist.omnijet.generate import generate_jets
from hepml_dist.omnijet.tokenize import tokenize_dataset

app = typer.Typer()


@app.command()
def tokenize(
    run_dir: Annotated[Path, typer.Argument(help="Trained tokenizer: run directory or checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="Jet dataset (folder with manifest.json) or one split folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the token dataset.")],
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", help="Tokens per jet, start and stop included (default: the tokenizer job's max_length)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Jets per tokenizer forward pass.")] = 2048,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    where: Annotated[str | None, typer.Option(
        "--where", help="Keep only the jets where this expression of per-jet columns holds, e.g. 'label_is_tau == 1'.")] = None,
) -> None:
    """Turn a jet dataset into OmniJet token shards with a trained tokenizer (resumes an interrupted run)."""
    manifest = tokenize_dataset(run_dir, data, out, max_length, batch_size, device, where)
    counts = ", ".join(f"{split} {info.examples}" for split, info in manifest.splits.items())
    typer.echo(f"wrote {out} ({counts} jets, vocabulary {manifest.meta['vocab_size']})")


@app.command("sample")
def sample(
    run_dir: Annotated[Path, typer.Argument(help="Trained OmniJet backbone: run directory or checkpoint folder.")],
    jets: Annotated[int, typer.Option("--jets", help="Number of jets to sample.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output parquet file (RUN_DIR/generated/jets-N.parquet).")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer run (default: as recorded with the tokens).")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the sampling.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed of the sampling.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Jets sampled in parallel.")] = 512,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Sample jets from a trained OmniJet-alpha backbone and decode them to constituents (pT, Delta eta, Delta phi)."""
    if temperature <= 0:
        raise UserError("--temperature must be positive")
    path = generate_jets(run_dir, jets, out, tokenizer, batch_size, temperature, seed, device)
    typer.echo(f"wrote {jets} jets to {path}")
