"""The command-line reference (docs/cli.md), generated from the Typer app, and the option vocabulary it follows.

`python -m hepml_dist.cli.reference > docs/cli.md` rewrites the page; tests/test_cli_reference.py fails when the
page and the commands disagree, and when an option breaks the vocabulary below.
"""

import enum
import types
import typing

import typer

from hepml_dist import __version__
from hepml_dist.cli import app

# One name per meaning, across every command.
VOCABULARY: dict[str, str] = {
    "--set/-s": "override a job field, `section.field=value` (repeatable)",
    "--out/-o": "where the command writes its result (file or folder)",
    "--split": "the name of one split of a dataset: train, val or test",
    "--fractions": "how a new dataset is divided into train, val, test (three fractions)",
    "--address": "the Ray cluster: the Jobs API URL for submit/status/logs/..., a GCS address for train/predict/tune",
    "--run-dir": "the run directory of a training run",
    "--json": "machine-readable JSON on stdout instead of a table",
    "--overwrite": "replace an existing output instead of refusing",
    "--seed": "random seed of the command's own sampling",
    "--workers": "local worker processes",
    "--device": "cpu, cuda or cuda:N for a command that runs a model in this process",
    "--batch-size": "examples per forward pass",
    "--timeout": "seconds to wait before giving up (exit status says so)",
}
# Spellings replaced by the vocabulary: an option may not use them.
RETIRED = {"--output": "--out", "--splits": "--fractions or --split", "--dir": "a named --*-dir"}


def _commands(command, prefix: tuple[str, ...] = ()):
    """(words, click command) of every leaf command, in help order."""
    ctx = typer.Context(command)
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            yield from _commands(command.get_command(ctx, name), (*prefix, name))
    else:
        yield prefix, command


def leaf_commands() -> list[tuple[tuple[str, ...], object]]:
    return list(_commands(typer.main.get_command(app)))


def _spelling(param) -> str:
    return "/".join([*param.opts, *param.secondary_opts])


def choices(param) -> list[str]:
    """The values a Literal- or Enum-typed parameter accepts (shown in --help as <a|b|c>); [] for free values."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), None)
    if typing.get_origin(annotation) is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return []


def _choices(param) -> str:
    return " | ".join(choices(param))


def _cell(text: str) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def render() -> str:
    """docs/cli.md: every command with its arguments and options (spelling, choices, default, help)."""
    lines = [
        "# Command-line reference",
        "",
        f"Generated from hepml_dist {__version__}'s Typer app by `python -m hepml_dist.cli.reference > docs/cli.md`;",
        "tests/test_cli_reference.py keeps it current. `hepml COMMAND --help` shows the same text.",
        "",
        "## Option vocabulary",
        "",
        "Options with the same name mean the same thing in every command:",
        "",
        "| option | meaning |",
        "| --- | --- |",
        *(f"| `{name}` | {meaning} |" for name, meaning in VOCABULARY.items()),
        "",
        "Exit status: 0 success, 2 a problem with the input (a message names the file or field and what to do);",
        "commands that follow jobs document their other codes in their help.",
        "",
        "## Commands",
    ]
    for words, command in leaf_commands():
        lines += ["", f"### `hepml {' '.join(words)}`", "", _cell((command.help or "").split("\n\n")[0]), ""]
        rows = []
        for param in command.params:
            if param.param_type_name == "argument":
                name = param.name.upper() + ("..." if param.nargs == -1 else "")
                rows.append((f"`{name}`", _choices(param), "", param.help if hasattr(param, "help") else ""))
            elif not param.hidden and param.name != "help":
                default = "" if param.default in (None, False, (), []) or param.is_flag else f"`{param.default}`"
                rows.append((f"`{_spelling(param)}`", _choices(param), default, param.help or ""))
        if rows:
            lines += ["| argument / option | choices | default | help |", "| --- | --- | --- | --- |"]
            lines += [f"| {a} | {_cell(b)} | {_cell(c)} | {_cell(d)} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
