"""docs/cli.md is the commands' own help, and every command follows one option vocabulary."""

from pathlib import Path

import pytest

from hepml_dist.cli.reference import RETIRED, VOCABULARY, choices, leaf_commands, render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
COMMANDS = leaf_commands()
OPTIONS = [(" ".join(words), param) for words, command in COMMANDS for param in command.params
           if param.param_type_name == "option" and param.name != "help"]


def test_docs_cli_md_is_current():
    assert DOC.read_text() == render(), "docs/cli.md is stale: python -m hepml_dist.cli.reference > docs/cli.md"


@pytest.mark.parametrize(("command", "param"), OPTIONS, ids=[f"{c} {p.opts[0]}" for c, p in OPTIONS])
def test_option_follows_the_vocabulary(command, param):
    for spelling in param.opts:
        assert spelling not in RETIRED, f"hepml {command} {spelling}: use {RETIRED[spelling]}"
    long = param.opts[0]
    declared = {name.split("/")[0]: name for name in VOCABULARY}
    if long in declared:  # the same short form wherever the long one appears
        assert "/".join(param.opts) == declared[long], f"hepml {command}: {param.opts} should be {declared[long]}"
    if long == "--split":
        assert choices(param) == ["train", "val", "test"], f"hepml {command} --split must take a split name"
    if long == "--json":
        assert param.is_flag


def test_fixed_value_sets_show_their_choices():
    by_name = {" ".join(words): command for words, command in COMMANDS}
    expected = {("tune", "mode"): ["min", "max"], ("tune", "scheduler"): ["asha", "fifo"],
                ("evaluate", "split"): ["train", "val", "test"]}
    for (command, name), values in expected.items():
        param = next(p for p in by_name[command].params if p.name == name)
        assert choices(param) == values, (command, name)
    process = next(p for p in by_name["data generate"].params if p.name == "process")
    assert {"fcc-tau", "jetclass-lite", "clic-events"} <= set(choices(process))
