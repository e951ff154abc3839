"""Command groups whose commands are imported only when they run, so `hepml --help` and `hepml validate` start fast.

A group lists its commands in a table: name -> (module, one-line help). The module defines a Typer `app` with the
command (or the sub-group) of that name, and imports at its top whatever the command needs (torch, ray, ...);
only the module of the command being run is imported. The group's help lists the table's lines without importing
anything (tests/test_cli.py keeps them equal to the commands' own first help lines).
"""

import importlib
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from hepml_dist.errors import UserError
from hepml_dist.spec import SpecError


@dataclass(frozen=True)
class LazyCommand:
    module: str
    """Module whose Typer `app` defines the command."""
    help: str
    """The command's first help line, shown in the group's --help."""


def load_command(name: str, entry: LazyCommand) -> Any:
    """The Typer command (or group) `name` of the entry's module."""
    group = typer.main.get_group(importlib.import_module(entry.module).app)
    command = group.commands.get(name)
    if command is None:
        raise RuntimeError(f"internal error: {entry.module}.app has no command {name!r}")
    return command


def lazy_group(table: dict[str, LazyCommand], *, catch_errors: bool = False) -> type[TyperGroup]:
    """A TyperGroup class serving the commands of `table` on demand; with `catch_errors` (the top level) it turns
    UserError and SpecError into a clear message and exit status 2, with no traceback."""

    class LazyGroup(TyperGroup):
        listing = False  # True while the group's own help is written

        def list_commands(self, ctx: Any) -> list[str]:
            return [*table, *(name for name in super().list_commands(ctx) if name not in table)]

        def get_command(self, ctx: Any, name: str) -> Any:
            if name in self.commands or name not in table:
                return super().get_command(ctx, name)
            if self.listing:  # the group's help: a stand-in that imports nothing
                return TyperCommand(name, help=table[name].help)
            return load_command(name, table[name])

        def format_help(self, ctx: Any, formatter: Any) -> None:
            self.listing = True
            try:
                super().format_help(ctx, formatter)
            finally:
                self.listing = False

        def invoke(self, ctx: Any) -> Any:
            if not catch_errors:
                return super().invoke(ctx)
            try:
                return super().invoke(ctx)
            except SpecError as err:
                for problem in err.problems:
                    typer.echo(str(problem), err=True)
                raise typer.Exit(2) from None
            except UserError as err:
                typer.echo(f"error: {err}", err=True)
                raise typer.Exit(2) from None

    return LazyGroup
