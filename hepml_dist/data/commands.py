"""The `hepml data ...` command group. Each data tool adds its command to `data_app`."""

import typer

data_app = typer.Typer(
    no_args_is_help=True,
    help="Make, check and look at datasets: convert, generate, verify, inspect, weights, tokenize, plot.",
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
