"""Options that several `hepml` commands share, declared once."""

from typing import Annotated

import typer

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field, e.g. --set optim.lr=1e-4 (repeatable)."),
]
JobsApiAddress = Annotated[
    str | None,
    typer.Option("--address", help="Ray Jobs API address, e.g. http://HOST:8265 (default: $RAY_ADDRESS, else http://127.0.0.1:8265)."),
]
JsonOutput = Annotated[
    bool,
    typer.Option("--json", help="Print machine-readable JSON instead of a table."),
]
