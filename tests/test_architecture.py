"""The layout rules of docs/architecture.md, checked on the source: no import cycles, layers imported downward only,
files a reader can hold in mind, model code free of distributed calls, and a CLI whose help imports nothing."""

import ast
import inspect
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from typer.core import TyperCommand, TyperGroup

from hepml_dist.cli import COMMANDS, DATA_COMMANDS
from hepml_dist.cli.lazy import load_command
from hepml_dist.models import get_family
from hepml_dist.spec import MODEL_FAMILIES

PACKAGE = Path(__file__).resolve().parents[1] / "hepml_dist"
MAX_LINES = 500
# Function-level imports that stay: heavy or optional dependencies that only one path needs.
ALLOWED_LAZY = {
    ("spec/commands.py", "hepml_dist.models.commands"),
    # scikit-learn (and the pandas it loads) only when metrics are computed: not in every training worker's start-up
    ("evaluate/metrics.py", "sklearn.metrics"),
    # Ray Train (seconds to import) only for runs on Ray: `cluster.launcher: processes` starts without it
    ("train/launch.py", "hepml_dist.train.ray_workers"),
    # torch: `hepml train` starts the processes launcher's fork server first, which imports it on the other core
    ("train/commands.py", "hepml_dist.train.launch"),
}
# Besides the training package itself, only the launchers and the tuner may import hepml_dist.train.
MAY_IMPORT_TRAIN = ("hepml_dist.train", "hepml_dist.tune", "hepml_dist.launch", "hepml_dist.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """Internal modules an import statement loads (the module, or module.name when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("hepml_dist")]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    if not base.startswith("hepml_dist"):
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> internal modules it imports, [(file, line, module) of every import inside a function])."""
    found = sources()
    known = set(found)
    graph: dict[str, set[str]] = defaultdict(set)
    lazy = []
    for module, (path, tree) in found.items():
        in_functions = {id(sub) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for sub in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = imported(module, path, node, known)
                graph[module].update(t for t in targets if t != module)
                if id(node) in in_functions:
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    lazy.append((str(path.relative_to(PACKAGE)), node.lineno, name))
    return graph, lazy


def test_no_import_cycles():
    graph, _ = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target] if target in trail else [module, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_only_launchers_and_the_tuner_import_the_training_engine():
    graph, _ = import_graph()
    wrong = {m: sorted(t for t in targets if t.startswith("hepml_dist.train"))
             for m, targets in graph.items() if not m.startswith(MAY_IMPORT_TRAIN)}
    assert not {m: t for m, t in wrong.items() if t}


def test_function_level_imports_are_the_few_optional_ones_and_say_why():
    _, lazy = import_graph()
    assert {(path, module) for path, _, module in lazy} <= ALLOWED_LAZY, lazy
    for path, line, module in lazy:
        text = (PACKAGE / path).read_text().splitlines()[line - 1]
        assert "#" in text, f"{path}:{line}: say why {module} is imported here, not at the top"


def test_files_stay_short():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_model_code_is_single_device():
    for path in (PACKAGE / "models").rglob("*.py"):
        text = path.read_text()
        assert "torch.distributed" not in text and "import distributed" not in text, path


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_every_family_of_the_spec_has_a_package_that_registers_it(family):
    assert (PACKAGE / "models" / family / "__init__.py").is_file()
    assert get_family(family).name == family


@pytest.mark.parametrize("group, name", [*(("", n) for n in COMMANDS), *(("data", n) for n in DATA_COMMANDS)])
def test_the_help_listing_says_what_each_command_says_of_itself(group, name):
    entry = (DATA_COMMANDS if group else COMMANDS)[name]
    command = load_command(name, entry)
    own = inspect.cleandoc(command.help or "").splitlines()[0]
    assert own == entry.help
    assert isinstance(command, (TyperCommand, TyperGroup))


def test_help_and_validate_import_neither_torch_nor_ray():
    """Only the module of the command that runs is imported: `hepml --help` and `hepml validate` stay fast."""
    jobs = sorted(str(p) for p in (PACKAGE.parent / "jobs").glob("*.yaml"))
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from hepml_dist.cli import app\n"
        "runner = CliRunner()\n"
        "assert runner.invoke(app, ['--help']).exit_code == 0\n"
        "assert runner.invoke(app, ['data', '--help']).exit_code == 0\n"
        f"result = runner.invoke(app, ['validate', *{jobs!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('torch', 'ray', 'matplotlib', 'deepspeed') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_version_and_shell_completion_of_lazy_commands():
    from hepml_dist import __version__

    out = subprocess.run([sys.executable, "-m", "hepml_dist.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"hepml_dist {__version__}"
    for words, cword, expected in (("hepml tr", "1", "train"), ("hepml data ge", "2", "generate"), ("hepml ex", "1", "export")):
        env = {**os.environ, "_HEPML_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword}
        done = subprocess.run([shutil.which("hepml") or "hepml"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.split() == [expected], (words, done.stdout, done.stderr)
