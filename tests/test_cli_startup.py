"""The CLI starts fast (the light commands import no torch, Ray or DeepSpeed), and finds the shipped jobs and cluster
files from any folder: through `extends`, by bare name, with $HEPML_JOBS_PATH, and from a built wheel."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.locations import shipped_jobs_dir
from hepml_dist.spec import SpecError, load_job

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
HEAVY = ("torch", "ray", "deepspeed", "comet_ml", "matplotlib", "sklearn")

PROBE = """
import sys
from hepml_dist.cli import app
try:
    app(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print("MODULES", " ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["validate", "jobs/part-quickstart.yaml"], ["show", "jobs/sophon.yaml"], ["jobs"], ["data", "--help"],
    ["train", "--help"],
], ids=lambda argv: " ".join(argv))
def test_light_commands_import_no_heavy_module(argv):
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    modules = next(line for line in result.stdout.splitlines() if line.startswith("MODULES")).split()[1:]
    assert "hepml_dist" in modules
    assert not set(HEAVY) & set(modules), f"`hepml {' '.join(argv)}` imported {set(HEAVY) & set(modules)}"


FORK_SERVER_PROBE = """
import sys
import hepml_dist.train.environment as environment
def started(spec):
    print("FORK SERVER STARTED, torch imported:", "torch" in sys.modules, "ray imported:", "ray" in sys.modules)
    raise SystemExit(0)
environment.start_fork_server = started
from hepml_dist.cli import app
app(sys.argv[1:])
"""


def test_hepml_train_starts_the_fork_server_of_the_processes_launcher_before_it_imports_torch():
    """So the server's imports (torch, the loop) and the driver's run at the same time on two cores."""
    result = subprocess.run([sys.executable, "-c", FORK_SERVER_PROBE, "train", "jobs/multipartau-quickstart.yaml",
                             "--set", "cluster.launcher=processes"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert "FORK SERVER STARTED, torch imported: False ray imported: False" in result.stdout, result.stderr


def test_shipped_jobs_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HEPML_JOBS_PATH", raising=False)
    assert load_job("part-quickstart").name == "part-quickstart"
    (tmp_path / "mine.yaml").write_text("name: mine\nextends: multipartau-quickstart.yaml\noptim: {lr: 3.0e-4}\n")
    mine = load_job(tmp_path / "mine.yaml")
    assert mine.optim.lr == 3.0e-4 and mine.model.family == "part"


def test_jobs_path_comes_before_the_shipped_jobs(tmp_path, monkeypatch):
    own = tmp_path / "own-jobs"
    own.mkdir()
    # a user's job of the same name as a shipped one wins, and is found by name and through extends
    (own / "part-quickstart.yaml").write_text(f"name: my-part\nextends: {shipped_jobs_dir() / 'part-quickstart.yaml'}\n")
    (tmp_path / "child.yaml").write_text("name: child\nextends: part-quickstart.yaml\n")
    monkeypatch.setenv("HEPML_JOBS_PATH", f"{tmp_path / 'missing'}{os.pathsep}{own}")
    monkeypatch.chdir(tmp_path)
    assert load_job("part-quickstart").name == "my-part"
    assert load_job("child.yaml").data.batch_size == load_job(shipped_jobs_dir() / "part-quickstart.yaml").data.batch_size
    result = runner.invoke(app, ["jobs", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["job"]: row for row in json.loads(result.stdout)}
    assert rows["part-quickstart"]["file"] == str(own / "part-quickstart.yaml")
    assert {p.stem for p in shipped_jobs_dir().glob("*.yaml")} <= set(rows)


def test_a_missing_base_names_the_folders_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("HEPML_JOBS_PATH", str(tmp_path / "extra"))
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nextends: no-such-base.yaml\n")
    with pytest.raises(SpecError) as err:
        load_job(job)
    message = str(err.value)
    assert "no-such-base.yaml" in message and str(tmp_path / "extra") in message and "HEPML_JOBS_PATH" in message


def test_a_built_wheel_ships_jobs_and_cluster_files_and_finds_them(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    for name in ("hepml_dist", "jobs", "cluster"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("hepml_dist-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for job in (ROOT / "jobs").glob("*.yaml"):
        assert f"hepml_dist/_shipped/jobs/{job.name}" in names
    for path in (ROOT / "cluster").rglob("*"):
        if path.is_file():
            assert f"hepml_dist/_shipped/cluster/{path.relative_to(ROOT / 'cluster')}" in names
    # unpacked away from the checkout, the package finds its own copies
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("from hepml_dist.locations import cluster_dir, shipped_jobs_dir; from hepml_dist.spec import load_job; "
             "print(shipped_jobs_dir()); print(cluster_dir()); print(load_job('sophon').name)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("HEPML_CLUSTER_DIR", None)
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site)) and out[2] == "sophon"
    assert (Path(out[1]) / "sites" / "lumi.yaml").is_file() and (Path(out[1]) / "slurm").is_dir()
