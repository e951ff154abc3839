"""Options that several `hepml` commands share, declared once."""

from enum import Enum
from typing import Annotated, Literal

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
SplitName = Literal["train", "val", "test"]


class Split(str, Enum):
    """SplitName for repeatable options (Typer takes lists of enums, not of literals); use `.value`."""

    train = "train"
    val = "val"
    test = "test"


Fractions = Annotated[
    str,
    typer.Option("--fractions", help="Fractions of the examples in train, val and test, e.g. 0.7,0.1,0.2."),
]
