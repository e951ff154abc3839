"""`hepml runs [DIR]`: a table of the run directories under DIR (state, step, epoch, best metric, last val_loss, start);
`hepml runs compare RUN...`: their curves of one metric overlaid (hepml_dist.track.compare, imported only for it).

Reads the run directories' small files only (hepml_dist.track.summary), so the table needs neither torch nor Ray.
"""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hepml_dist.cli.lazy import LazyCommand, lazy_group
from hepml_dist.cli.options import JsonOutput
from hepml_dist.track.summary import summarize_all

DEFAULT_ROOT = Path("runs")
RUNS_COMMANDS: dict[str, LazyCommand] = {
    "compare": LazyCommand("hepml_dist.track.compare", "Overlay one metric of several runs against the step in one "
                                                       "plot (PNG, PDF or SVG), one curve per run."),
}
STATE_STYLES = {"running": "bold cyan", "starting": "cyan", "finished": "green", "stopped": "yellow",
                "failed": "bold red", "interrupted": "magenta"}


class RunsGroup(lazy_group(RUNS_COMMANDS)):
    """`hepml runs [DIR] [--json]` lists; a first word naming a sub-command (`compare`, `list`) runs that instead."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.list_commands(ctx) and args[0] not in ctx.help_option_names):
            args = ["list", *args]
        return super().parse_args(ctx, args)


app = typer.Typer()
runs_app = typer.Typer(
    cls=RunsGroup,
    help="Table of the runs under a folder (default runs/): state, step, epoch, best metric, last val_loss, start.\n\n"
         "`hepml runs compare RUN...` overlays their curves of one metric.",
)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def list_runs(
    root: Annotated[Path, typer.Argument(help="Folder holding run directories (searched 4 levels deep), or one run "
                                              "directory.")] = DEFAULT_ROOT,
    as_json: JsonOutput = False,
) -> None:
    """Table of the runs under a folder: state, step, epoch, best metric, last val_loss, start time."""
    rows = summarize_all(root)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    elif not rows:
        typer.echo(f"no run directories (folders with a spec.yaml written by `hepml train`) under {root}")
    else:
        print_table(rows, title=f"runs in {root}")


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    for column in ("family", "state", "step", "epoch", "best", "val_loss", "started"):
        table.add_column(column, justify="right" if column in ("step", "epoch", "val_loss") else "left")
    for row in rows:
        style = STATE_STYLES.get(row["state"], "")
        table.add_row(
            row["name"], row["family"] or "?", f"[{style}]{row['state']}[/]",
            _of(row["step"], row["total_steps"]), _of(row["epoch"], row["epochs"]), _best(row),
            _number(row["last_val_loss"]), (row["started"] or "").replace("T", " "),
        )
    Console(width=200 if not Console().is_terminal else None).print(table)
    failed = [row for row in rows if row["error"]]
    for row in failed:
        typer.echo(f"{row['name']}: {row['error']}", err=True)


def _of(value: int | None, total: int | None) -> str:
    if value is None:
        return "-"
    return f"{value}/{total}" if total else str(value)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"


def _best(row: dict[str, Any]) -> str:
    if not row["best_metric"]:
        return "-"
    at = f" @{row['best_step']}" if row["best_step"] is not None else ""
    return f"{row['best_metric']} {_number(row['best_value'])}{at}"
