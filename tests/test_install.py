"""The install is reproducible: every package in the environment is pinned in requirements.lock at the version
installed (torch aside: TORCH_SPEC picks it, with the CUDA/ROCm runtime wheels that come with a GPU build)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
NOT_LOCKED = re.compile(r"^(torch|hepml-dist|pip|setuptools|wheel|nvidia-.*|triton|pytorch-triton-rocm)$")


def frozen() -> list[str]:
    """`pip freeze` of this environment, from a fresh interpreter: in this process setuptools may have put its
    vendored packages (jaraco.*, more-itertools, ...) on sys.path, and they are not installed packages."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [line for line in out.splitlines() if "==" in line]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_installed_package_is_pinned_at_its_installed_version():
    pinned = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[normalized(name)] = version.strip()
    installed = {normalized(name): version for name, _, version in (line.partition("==") for line in frozen())}
    unpinned = sorted(n for n in installed if n not in pinned and not NOT_LOCKED.match(n))
    assert not unpinned, f"installed but not in requirements.lock (run `make lock`): {unpinned}"
    moved = {n: (pinned[n], installed[n]) for n in pinned if n in installed and installed[n] != pinned[n]}
    assert not moved, f"installed versions differ from the lock (lock, installed): {moved}"


def test_every_extra_the_code_names_is_declared_and_the_base_imports_none_at_top_level():
    import ast
    import tomllib

    from hepml_dist.extras import EXTRAS

    declared = tomllib.loads((LOCK.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (extra, _) in EXTRAS.items():
        assert extra in declared, f"{module}: extra {extra!r} is not in pyproject.toml"
        assert extra in declared["all"][0].partition("[")[2].rstrip("]").split(","), f"`all` lacks {extra!r}"
    # optional modules are only imported through hepml_dist.extras.require, which names the extra when missing
    for path in (LOCK.parent / "hepml_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            optional = [n for n in names if n.split(".")[0] in EXTRAS]
            assert not optional, f"{path}:{node.lineno} imports {optional}: use hepml_dist.extras.require"


def test_a_missing_extra_is_named_with_the_pip_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hepml_dist.cli import app

    monkeypatch.setitem(sys.modules, "pythia8mc", None)  # as if the `gen` extra were not installed
    result = CliRunner().invoke(app, ["data", "generate", "fcc-tau", "--events", "10", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert "pip install 'hepml-dist[gen]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_without_the_comet_extra_runs_track_locally_unless_they_can_upload(tmp_path, monkeypatch, capsys):
    from hepml_dist.errors import UserError
    from hepml_dist.extras import require
    from hepml_dist.spec import load_job
    from hepml_dist.track.tracker import dashboards

    monkeypatch.setitem(sys.modules, "comet_ml", None)  # as if the `comet` extra were not installed
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    spec = load_job(LOCK.parent / "jobs" / "part-quickstart.yaml", ["tracking.mode=online", "tracking.tensorboard=false"])
    assert dashboards(spec, tmp_path) == []
    assert "pip install 'hepml-dist[comet]'" in capsys.readouterr().out
    monkeypatch.setenv("COMET_API_KEY", "not-a-real-key")
    with pytest.raises(UserError, match=r"hepml-dist\[comet\]"):
        dashboards(spec, tmp_path)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(UserError, match=r"parallel.strategy = deepspeed.*hepml-dist\[deepspeed\]"):
        require("deepspeed")
