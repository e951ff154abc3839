"""Checks `hepml train` makes before it starts anything: a job that cannot run here fails at once, clearly."""

import torch
from typer.testing import CliRunner

from hepml_dist.cli import app


def test_job_asking_for_gpus_this_machine_lacks_fails_before_starting(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    run_dir = tmp_path / "run"
    # multipartau.yaml: 1 worker x 1 A100 (an embedded Ray would wait for it forever)
    result = CliRunner().invoke(app, ["train", "jobs/multipartau.yaml", "--run-dir", str(run_dir)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "parallel:" in text and "GPU(s), and this machine has 0" in text
    assert "--set parallel.accelerator=cpu --set parallel.gpus_per_worker=0" in text
    assert not run_dir.exists()  # nothing written for a job that never started
