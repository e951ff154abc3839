"""`hepml tune`: the search space is parsed and checked before Ray starts; a tiny search on CPU runs each trial as
a normal run (own run dir, metrics.jsonl, Comet archive), Tune receives the trials' validation reports, and the
trial with the best reported metric is written out as a job that `hepml validate` accepts."""

import json
import zipfile

import pytest
from train_helpers import ray_session, tiny_job, write_jet_dataset, write_job  # noqa: F401 (fixture)
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.errors import UserError
from hepml_dist.spec import load_job
from hepml_dist.track.tracker import read_metrics
from hepml_dist.tune.search import load_space, parse_distribution, run_tune


def test_space_parsing_and_errors(tmp_path):
    assert parse_distribution("optim.lr", "loguniform(1e-4, 3e-3)") == ("loguniform", [1e-4, 3e-3])
    assert parse_distribution("model.num_layers", "choice([1, 2])") == ("choice", [[1, 2]])
    assert parse_distribution("data.batch_size", "randint(16, 65)") == ("randint", [16, 65])
    assert parse_distribution("optim.weight_decay", 0.01) == ("fixed", [0.01])
    for bad, message in [("loguniform(0, 1)", "positive"), ("uniform(2, 1)", "lower bound"),
                         ("choice(1, 2)", "one non-empty list"), ("normal(0, 1)", "use one of"),
                         ("__import__('os')", "use one of"), ("randint(1.5, 3)", "integers")]:
        with pytest.raises(UserError, match=message):
            parse_distribution("optim.lr", bad)
    (tmp_path / "space.yaml").write_text("- optim.lr\n")
    with pytest.raises(UserError, match="mapping"):
        load_space(tmp_path / "space.yaml")


def test_unknown_fields_fail_before_any_trial(tmp_path):
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "data"))
    (tmp_path / "space.yaml").write_text("optim.learning_rate: loguniform(1e-4, 1e-2)\n")
    result = CliRunner().invoke(app, ["tune", str(job), "--space", str(tmp_path / "space.yaml"), "--trials", "2"])
    assert result.exit_code == 2 and "optim.learning_rate" in result.output
    (tmp_path / "space.yaml").write_text("model.num_heads: choice([2, 3])\n")  # 16 dims / 3 heads: invalid job
    result = CliRunner().invoke(app, ["tune", str(job), "--space", str(tmp_path / "space.yaml"), "--trials", "2"])
    assert result.exit_code == 2 and "model.num_heads = 3" in result.output
    (tmp_path / "space.yaml").write_text("optim.lr: loguniform(1e-4, 1e-2)\n")
    result = CliRunner().invoke(app, ["tune", str(job), "--space", str(tmp_path / "space.yaml"), "--trials", "2",
                                      "--set", "cluster.launcher=processes"])
    assert result.exit_code == 2 and "hepml tune runs its trials on Ray Train" in " ".join(result.output.split())


@pytest.mark.integration
def test_tiny_search_picks_the_trial_with_the_best_validation_loss(tmp_path, ray_session):
    data = write_jet_dataset(tmp_path / "data", examples=900)
    job = write_job(tmp_path / "job.yaml", tiny_job(
        data, training={"epochs": None, "steps": 6, "eval_interval": 3, "log_interval": 3},
        checkpoint={"keep_best_by": "val_loss", "best_mode": "min"}))
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: loguniform(1e-4, 3e-2)\nmodel.num_layers: choice([1, 2])\n")

    result = run_tune(job, space, trials=3, tune_dir=tmp_path / "tune", seed=3)

    rows = result["trials"]
    assert len(rows) == 3 and all(isinstance(r["value"], float) and r["error"] is None for r in rows), rows
    assert len({r["config"]["optim.lr"] for r in rows}) == 3
    for row in rows:  # each trial is a normal run, and Tune saw what its workers reported
        records = [r for r in read_metrics(row["run_dir"]) if "val_loss" in r]
        assert records, row
        reported = next(r for r in records if r["step"] == row["step"])
        assert reported["val_loss"] == pytest.approx(row["value"], rel=1e-6)
        archives = list((tmp_path / "tune" / "trials" / row["name"] / "comet").glob("*.zip"))
        assert len(archives) == 1, archives  # its own tracker entry, complete even when ASHA stopped the trial
        with zipfile.ZipFile(archives[0]) as archive:
            messages = archive.read("messages.json").decode()
        assert '"val_loss"' in messages and f'"paramValue":{row["config"]["optim.lr"]!r}' in messages
        spec = load_job(f"{row['run_dir']}/spec.yaml")
        assert spec.optim.lr == pytest.approx(row["config"]["optim.lr"])
        assert spec.model.num_layers == row["config"]["model.num_layers"]
    best = min(rows, key=lambda r: r["value"])
    assert result["best"]["name"] == best["name"]

    validated = CliRunner().invoke(app, ["validate", result["best_job"]])
    assert validated.exit_code == 0, validated.output
    tuned = load_job(result["best_job"])
    assert tuned.optim.lr == pytest.approx(best["config"]["optim.lr"])
    assert tuned.model.num_layers == best["config"]["model.num_layers"]
    assert tuned.name.endswith("-tuned")
    summary = json.loads((tmp_path / "tune" / "trials.json").read_text())
    assert summary["best"] == best["name"]
    plot = tmp_path / "tune" / "search.png"
    assert result["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000


@pytest.mark.integration
def test_a_stopped_trial_checkpoints_and_closes_its_tracker(tmp_path, ray_session):
    """What ASHA's cut does to a trial: Tune calls stop() on its trainable and then ends the actor. The run must
    checkpoint and close its Comet archive before that, not be killed mid-write."""
    from ray import tune

    from hepml_dist.runs import latest_checkpoint, read_state
    from hepml_dist.train.session import STOP_FILE
    from hepml_dist.tune.search import TrialRun

    data = write_jet_dataset(tmp_path / "data", examples=900)
    base = load_job(write_job(tmp_path / "job.yaml", tiny_job(
        data, training={"epochs": None, "steps": 400, "eval_interval": 3, "log_interval": 3}))).model_dump(mode="json")
    trial = tune.with_parameters(TrialRun, base=base, source="job.yaml", name="tiny",
                                 trials_dir=tmp_path / "trials")(config={"optim.lr": 1e-3})
    first = trial.train()  # one Tune result: the run's first validation report
    assert first["step"] == 3 and isinstance(first["val_loss"], float)
    trial.stop()

    run_dir = tmp_path / "trials" / "tiny-default"  # no Tune trial id outside a search
    state = read_state(latest_checkpoint(run_dir))
    assert state["stopped"] and not state["finished"] and 3 <= state["step"] < 400
    assert not (run_dir / STOP_FILE).exists()
    archives = list((run_dir / "comet").glob("*.zip"))
    assert len(archives) == 1
    with zipfile.ZipFile(archives[0]) as archive:
        assert '"val_loss"' in archive.read("messages.json").decode()
