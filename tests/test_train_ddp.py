"""End to end on Ray Train: a 2-worker DDP run of a quickstart-like job learns, writes the run-directory contract
(checkpoints, best.json, metrics.jsonl, an offline Comet archive), evaluates to metrics.json and plots, and a run
stopped by SIGUSR1 and resumed ends with the same weights as the uninterrupted one."""

import json
import os
import signal
import threading
import time
import zipfile

import pytest
from train_helpers import final_weights, max_difference, ray_session, tiny_job, write_jet_dataset  # noqa: F401

from hepml_dist.runs import list_checkpoints, load_trained, read_best
from hepml_dist.spec import parse_spec
from hepml_dist.track.tracker import read_metrics
from hepml_dist.train.launch import launch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jet_dataset(tmp_path_factory.mktemp("jets") / "data")


def ddp_job(dataset, **overrides):
    return parse_spec(tiny_job(dataset, parallel={"num_workers": 2}, **overrides))


@pytest.fixture(scope="module")
def reference_run(ray_session, dataset, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    start = time.perf_counter()
    result = launch(ddp_job(dataset), run_dir=run_dir, progress=False)
    print(f"2-worker DDP fit: {time.perf_counter() - start:.1f} s")
    return result


def test_two_workers_learn(reference_run):
    assert reference_run.finished and reference_run.step == 24
    records = read_metrics(reference_run.run_dir)
    train = [r["train_loss"] for r in records if "train_loss" in r]
    assert train[-1] < 0.5 * train[0]
    val = [r for r in records if "val_loss" in r]
    assert len(val) == 3 and val[-1]["val_loss"] < val[0]["val_loss"]
    assert val[-1]["val_is_signal_auc"] > 0.9
    assert all(r["jets_per_s"] > 0 for r in records if "jets_per_s" in r)


def test_run_directory_contract(reference_run):
    run_dir = reference_run.run_dir
    names = [p.name for p in list_checkpoints(run_dir)]
    best = read_best(run_dir)
    assert names[-2:] == ["step-00000016", "step-00000024"]  # keep_last: 2 ...
    assert best["checkpoint"] in names and best["metric"] == "val_is_signal_auc"  # ... plus the best
    assert not list((run_dir / "checkpoints").glob(".step-*"))  # no temporary folders left behind
    state = json.loads((run_dir / "checkpoints" / "step-00000024" / "state.json").read_text())
    assert state["finished"] and state["world_size"] == 2 and len(state["rng"]) == 2
    assert "val_loss" in state["metrics"]
    spec, model = load_trained(run_dir)
    assert spec.name == "tiny" and not model.training


def test_offline_comet_archive_holds_the_metrics(reference_run):
    archives = list((reference_run.run_dir / "comet").glob("*.zip"))
    assert len(archives) == 1
    with zipfile.ZipFile(archives[0]) as z:
        messages = z.read("messages.json").decode()
    assert '"val_is_signal_auc"' in messages and '"train_loss"' in messages
    assert "git_commit" in messages


def test_tensorboard_events_follow_metrics_jsonl_and_the_run_is_listed_finished(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hepml_dist.track.summary import summarize

    run_dir = reference_run.run_dir
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    for metric, tag in (("train_loss", "train/train_loss"), ("val_is_signal_auc", "val/val_is_signal_auc")):
        logged = [(r["step"], r[metric]) for r in read_metrics(run_dir) if metric in r]
        assert [(e.step, e.value) for e in accumulator.Scalars(tag)] == [(s, pytest.approx(v)) for s, v in logged]
    row = summarize(run_dir)
    assert (row.state, row.step, row.total_steps, row.best_metric) == ("finished", 24, 24, "val_is_signal_auc")
    assert not (run_dir / "running.json").exists()


def test_evaluate_writes_metrics_and_plots(reference_run):
    from hepml_dist.evaluate.runner import evaluate_run

    report = evaluate_run(reference_run.run_dir, "test")
    assert report["metrics"]["test_is_signal_auc"] > 0.9
    saved = json.loads((reference_run.run_dir / "metrics.json").read_text())
    assert saved["split"] == "test" and len(saved["confusion_matrices"]["is_signal"]) == 2
    plots = {p.name for p in (reference_run.run_dir / "plots").glob("*.png")}
    assert {"roc_is_signal.png", "confusion_is_signal.png", "response_size.png", "training_curves.png"} <= plots


def test_stopped_and_resumed_run_matches_uninterrupted(ray_session, dataset, tmp_path):  # noqa: F811
    # 60 steps, not the reference run's 24: on an idle machine 16 steps take well under a second, less than the
    # driver may need to act on a signal while it waits in Ray (the stop then came after the last step).
    spec = ddp_job(dataset, data={"steps_per_epoch": 20},
                   training={"epochs": 3, "eval_interval": 20, "log_interval": 4, "seed": 7})
    uninterrupted = launch(spec, run_dir=tmp_path / "uninterrupted", progress=False)
    assert uninterrupted.finished and uninterrupted.step == 60
    run_dir = tmp_path / "interrupted"

    def signal_when_running():
        # SIGUSR1 to the driver (as SLURM does before the time limit) once training has passed step 8.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
            if steps and steps[-1] >= 8:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=signal_when_running, daemon=True)
    watcher.start()
    first = launch(spec, run_dir=run_dir, progress=False)
    watcher.join()
    assert first.stopped and not first.finished and 8 <= first.step < 60, first

    second = launch(spec, run_dir=run_dir, progress=False)  # the same command again resumes
    assert second.finished and second.step == 60
    resumed = [r for r in read_metrics(run_dir) if "resumed_from" in r]
    assert resumed and resumed[0]["resumed_from"] == first.step
    assert max_difference(final_weights(run_dir), final_weights(uninterrupted.run_dir)) < 1e-5
