"""`hepml chain submit`: a chain's stages as SLURM jobs that wait for the stages they need, on the real SLURM that
tests/test_cluster_slurm.py starts on this host (its `slurm` fixture, with the stand-in `apptainer`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import typer
from test_cluster_slurm import FakeSlurm, slurm  # noqa: F401 - the throw-away SLURM of the cluster tests
from typer.testing import CliRunner

from hepml_dist.chain.plan import PlannedStage
from hepml_dist.chain.slurm import (
    RECORD_FILE,
    parse_train_command,
    render_stage,
    submit_chain,
    submit_command,
    topological,
)
from hepml_dist.errors import UserError
from hepml_dist.launch.slurm import load_site

REPO = Path(__file__).resolve().parents[1]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def step(name: str, script: str, needs: tuple[str, ...] = ()) -> PlannedStage:
    return PlannedStage(name=name, kind="step", needs=needs, argv=("bash", "-c", script), outputs={}, cpus=1, gpus=0)


@pytest.fixture
def submit_here(slurm: FakeSlurm, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:  # noqa: F811
    """sbatch from this process reaches the fake SLURM; the jobs see the stand-in apptainer."""
    for name in ("SLURM_CONF", "PATH", "APPTAINER_STANDIN_LOG", "PYTHONPATH"):
        monkeypatch.setenv(name, slurm.env[name])
    monkeypatch.chdir(slurm.root)
    return slurm


def _submit(slurm: FakeSlurm, stages: list[PlannedStage], chain_dir: Path) -> dict[str, str]:  # noqa: F811
    return submit_chain(stages, str(slurm.site), chain_dir, site_overrides=[f"container.image={slurm.image}"],
                        chain="test-chain")


def _ended(slurm: FakeSlurm, job_id: str) -> dict[str, str]:  # noqa: F811
    return slurm.wait_job(job_id, lambda f: f["JobState"] in FINAL, "the end of the job", 60)


@pytest.mark.integration
def test_stage_b_starts_after_stage_a_has_completed(submit_here: FakeSlurm, tmp_path: Path) -> None:
    a_end, b_start = tmp_path / "a.end", tmp_path / "b.start"
    # b first: the submission order comes from `needs`, not from the list
    stages = [step("b", f"date +%s%N > {b_start}", needs=("a",)),
              step("a", f"sleep 2; date +%s%N > {a_end}")]
    ids = _submit(submit_here, stages, tmp_path / "chain")
    assert set(ids) == {"a", "b"} and int(ids["b"]) > int(ids["a"])  # a went to sbatch first
    waiting = submit_here.job(ids["b"])
    assert waiting["Dependency"] == f"afterok:{ids['a']}(unfulfilled)" or waiting["JobState"] != "PENDING"
    a, b = _ended(submit_here, ids["a"]), _ended(submit_here, ids["b"])
    assert a["JobState"] == b["JobState"] == "COMPLETED", submit_here.log(ids["b"])
    assert int(b_start.read_text()) > int(a_end.read_text())
    assert b["JobName"] == "test-chain.b"
    record = json.loads((tmp_path / "chain" / RECORD_FILE).read_text())
    assert record["jobs"] == ids and record["stages"]["b"]["needs"] == ["a"]
    assert Path(record["stages"]["b"]["script"]).is_file()
    output = submit_here.root / record["stages"]["b"]["output"]
    assert "stage b exited with status 0" in output.read_text()
    # both ran through the site's container prefix
    calls = submit_here.apptainer_log.read_text()
    assert f"image={submit_here.image} command=bash -c sleep 2" in calls and f"command=bash -c date +%s%N > {b_start}" in calls


@pytest.mark.integration
def test_a_failing_stage_cancels_the_stages_that_need_it(submit_here: FakeSlurm, tmp_path: Path) -> None:
    ran = tmp_path / "b.ran"
    ids = _submit(submit_here, [step("a", "exit 3"), step("b", f"touch {ran}", needs=("a",))], tmp_path / "chain")
    a = _ended(submit_here, ids["a"])
    assert a["JobState"] == "FAILED" and a["ExitCode"] == "3:0"
    b = _ended(submit_here, ids["b"])
    assert b["JobState"] == "CANCELLED" and b["Reason"] == "DependencyNeverSatisfied", b
    assert not ran.exists()


def test_a_job_stage_renders_like_slurm_submit_with_the_planned_run_dir(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "runs" / "pretrain")
    stage = PlannedStage(
        name="pretrain", kind="job", needs=(),
        argv=("hepml", "train", str(REPO / "jobs/part-quickstart.yaml"), "--set", "cluster.slurm.nodes=2",
              "--set=cluster.slurm.container_image=/images/hepml-cpu.sif", "--run-dir", run_dir, "--plain"),
        outputs={"run_dir": run_dir}, cpus=2, gpus=0,
    )  # fmt: skip
    command = parse_train_command(stage)
    assert command.overrides == ["cluster.slurm.nodes=2", "cluster.slurm.container_image=/images/hepml-cpu.sif"]
    rendered = render_stage(stage, load_site("local"), chain="c")
    assert "#SBATCH --nodes=2" in rendered.script and "IMAGE=/images/hepml-cpu.sif" in rendered.script
    assert f"HEPML_RUN_DIR=$(realpath -m {run_dir})" in rendered.script
    assert "hepml train" in rendered.script and rendered.output == "slurm-logs/part-quickstart-%j.out"


def test_bad_chains_are_refused_before_anything_is_submitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: a submission would fail differently
    with pytest.raises(UserError, match="cycle"):
        topological([step("a", "true", needs=("b",)), step("b", "true", needs=("a",))])
    with pytest.raises(UserError, match="unknown stage"):
        topological([step("a", "true", needs=("tokens",))])
    greedy = PlannedStage(name="eval", kind="evaluate", needs=(), argv=("hepml", "evaluate", "runs/x"), outputs={},
                          cpus=1, gpus=4)
    with pytest.raises(UserError, match="needs 4 GPUs"):
        submit_chain([greedy], "local", tmp_path / "chain", site_overrides=["container.image=/x.sif"])
    with pytest.raises(UserError, match="name the image"):
        submit_chain([step("a", "true")], "local", tmp_path / "chain")
    assert not (tmp_path / "chain" / RECORD_FILE).exists() and shutil.which("sbatch") is None


STANDIN_SBATCH = """#!/usr/bin/env bash
# Stand-in sbatch --parsable: logs its arguments, answers job ids 101, 102, ...
id=$(( $(cat "$SBATCH_LOG" 2>/dev/null | wc -l) + 101 ))
echo "$id $*" >> "$SBATCH_LOG"
echo "$id"
"""


def test_chain_submit_plans_the_chain_file_and_chains_the_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text(STANDIN_SBATCH)
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(tmp_path / "sbatch.log"))
    monkeypatch.chdir(tmp_path)
    chain = tmp_path / "tiny.yaml"
    chain.write_text(f"""\
name: tiny
stages:
  evaluate: {{step: evaluate, run: '${{stages.pretrain.run_dir}}'}}
  pretrain:
    job: {REPO / 'jobs/part-quickstart.yaml'}
    set: {{cluster.slurm.container_image: /images/hepml-cpu.sif, cluster.slurm.nodes: 2}}
""")
    app = typer.Typer()
    app.command("submit")(submit_command)
    app.command("other")(lambda: None)  # two commands: the app takes the command's name, as `hepml chain` does
    result = CliRunner().invoke(app, ["submit", str(chain), "--site", "local", "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert calls[0].startswith("101 --parsable --job-name=tiny.pretrain ")
    assert calls[1].startswith("102 --parsable --job-name=tiny.evaluate --dependency=afterok:101 --kill-on-invalid-dep=yes ")
    record = json.loads((tmp_path / "work" / RECORD_FILE).read_text())
    assert record["jobs"] == {"pretrain": "101", "evaluate": "102"} and record["site"] == "local"
    step_script = Path(record["stages"]["evaluate"]["script"]).read_text()
    run_dir = tmp_path / "work" / "runs" / "pretrain"
    # the step runs in the image the jobs name, on the run directory the job stage writes
    assert "IMAGE=/images/hepml-cpu.sif" in step_script and f"COMMAND=(hepml evaluate {run_dir} --split test)" in step_script
    job_script = Path(record["stages"]["pretrain"]["script"]).read_text()
    assert f"HEPML_RUN_DIR=$(realpath -m {run_dir})" in job_script and "name: part-quickstart" in job_script
    assert "evaluate: job 102 (after pretrain)" in result.output
