"""Tracking: rank 0 only, metrics.jsonl always, the offline Comet archive holds the metrics, the API key is never
written, and a resumed run drops the records of steps it will train again."""

import json
import zipfile

import pytest

from hepml_dist.spec import load_job
from hepml_dist.track.tracker import NullTracker, make_tracker, read_metrics


@pytest.fixture
def spec():
    return load_job("jobs/part-quickstart.yaml")


def comet_messages(run_dir) -> list[dict]:
    archives = sorted((run_dir / "comet").glob("*.zip"))
    assert archives, "no offline Comet archive written"
    with zipfile.ZipFile(archives[-1]) as z:
        return [json.loads(line) for line in z.read("messages.json").decode().splitlines() if line.strip()]


def test_other_ranks_log_nothing(spec, tmp_path):
    assert isinstance(make_tracker(spec, tmp_path, rank=1), NullTracker)
    assert not any(tmp_path.iterdir())


def test_offline_archive_holds_the_metrics_and_no_key(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_API_KEY", "")  # set but empty: offline
    tracker = make_tracker(spec, tmp_path, rank=0, info={"git_commit": "abc123"})
    tracker.log_metrics({"train_loss": 0.75, "lr": 1e-3}, step=10, epoch=0)
    tracker.log_metrics({"val_loss": 0.5}, step=20, epoch=1)
    tracker.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [10, 20] and records[1]["val_loss"] == 0.5
    messages = json.dumps(comet_messages(tmp_path))
    assert '"train_loss"' in messages and '"val_loss"' in messages and "abc123" in messages


def test_api_key_is_never_written(spec, tmp_path, monkeypatch):
    import comet_ml

    secret = "sekr1t-k3y-value"
    monkeypatch.setenv("COMET_API_KEY", secret)

    # No network here: make the online experiment fail at once so the tracker falls back to an offline archive.
    def refuse(*args, **kwargs):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(comet_ml, "Experiment", refuse)
    tracker = make_tracker(spec, tmp_path, rank=0)
    tracker.log_metrics({"train_loss": 1.0}, step=1)
    tracker.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as z:
                    data = b"".join(z.read(n) for n in z.namelist())
            assert secret.encode() not in data, path


def test_resume_drops_records_after_the_checkpoint(spec, tmp_path):
    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"mode": "disabled"})})
    first = make_tracker(spec, tmp_path, rank=0)
    for step in (10, 20, 30):
        first.log_metrics({"train_loss": 1.0 / step}, step=step)
    first.close()
    resumed = make_tracker(spec, tmp_path, rank=0, resume_step=20)
    resumed.log_metrics({"train_loss": 0.01}, step=30)
    resumed.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]
    assert not (tmp_path / "comet").exists()
